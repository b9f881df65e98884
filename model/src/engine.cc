#include "model/engine.h"

#include <ATen/Parallel.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "decode_attention.h"
#include "model/packed_linear.h"
#include "model/step_profile.h"
#include "model/team.h"
#include "prefill_attention.h"
#include "stream_prefetch.h"

namespace amoeba {

Engine::Engine(std::shared_ptr<const Model> model, EngineOptions options)
    : model_(std::move(model)),
      options_(options),
      rope_(model_->config, options.max_len),
      panels_only_(PanelsOnly(*model_, options)),
      prefetch_trial_key_(PrefetchTrialKeyOf(*model_, panels_only_)),
      ws_(options.workspace ? options.workspace : std::make_shared<EngineWorkspace>()) {}

void Engine::EnsureWorkspace(int64_t tokens, int64_t logit_rows, int64_t decode_rows) {
  const ModelConfig& c = model_->config;
  // A shared workspace may have been sized for another model: start over if the widths differ.
  const int64_t signature = c.hidden_size ^ (c.num_attention_heads << 16) ^
                            (c.num_key_value_heads << 24) ^ (c.intermediate_size << 32) ^
                            (options_.max_len << 48) ^ (c.vocab_size * 7919);
  if (signature != ws_->signature) {
    *ws_ = EngineWorkspace{};
    ws_->signature = signature;
  }
  if (tokens > ws_->cap_tokens) {
    const int64_t n = std::max<int64_t>(tokens, 1);
    ws_->x = at::empty({n, c.hidden_size});
    ws_->h = at::empty({n, c.hidden_size});
    ws_->tmp = at::empty({n, c.hidden_size});
    ws_->q = at::empty({n, c.num_attention_heads * c.head_dim});
    ws_->att = at::empty({n, c.num_attention_heads * c.head_dim});
    ws_->k = at::empty({n, c.num_key_value_heads * c.head_dim});
    ws_->v = at::empty({n, c.num_key_value_heads * c.head_dim});
    ws_->gate = at::empty({n, c.intermediate_size});
    ws_->up = at::empty({n, c.intermediate_size});
    ws_->pos.resize(n);
    ws_->cap_tokens = n;
  }
  if (decode_rows > ws_->cap_decode_rows || !ws_->scores.defined()) {
    // Per decode row and query head (a prompt's rows attend in blocks and take none).
    const int64_t rows = std::max<int64_t>(decode_rows, 1);
    ws_->scores =
        at::empty({rows * c.num_attention_heads, DecodeAttentionScratchPerHead(options_.max_len)});
    ws_->cap_decode_rows = rows;
  }
  if (logit_rows > ws_->cap_logits) {
    ws_->logits = at::empty({logit_rows, c.vocab_size});
    ws_->cap_logits = logit_rows;
  }
}

void Engine::Project(const float* x, int64_t n, const LayerWeights& l, std::span<const Proj> ps,
                     std::span<float* const> ys) {
  auto bias = [&](Proj p) {
    const at::Tensor& t = l.bias(p);
    return t.defined() ? t.data_ptr<float>() : nullptr;
  };
  auto panels = [&](Proj p) -> const at::Tensor& { return l.panels[static_cast<int>(p)]; };
  // Packed weights serve every batch size (prefill too), so the row-major pages stay unread.
  bool packed = options_.linear_path == LinearPath::kAuto;
  for (Proj p : ps)
    packed =
        packed && panels(p).defined() && panels(p).scalar_type() == panels(ps[0]).scalar_type();
  if (packed) {
    std::array<PackedOutput, kNumProj> outs;
    for (size_t i = 0; i < ps.size(); ++i)
      outs[i] = {&panels(ps[i]), l.proj(ps[i]).size(0), bias(ps[i]), ys[i]};
    LinearPackedMany(x, n, l.proj(ps[0]).size(1), {outs.data(), ps.size()});
  } else {
    Serially([&] {
      for (size_t i = 0; i < ps.size(); ++i)
        Linear(x, n, l.proj(ps[i]), bias(ps[i]), ys[i], options_.linear_path);
    });
  }
  std::array<int64_t, kNumProj> strides;
  for (size_t i = 0; i < ps.size(); ++i) strides[i] = l.proj(ps[i]).size(0);
  ApplyDeltas(x, l.proj(ps[0]).size(1), n, l, ps, ys, {strides.data(), ps.size()});
}

void Engine::ApplyDeltas(const float* x, int64_t x_stride, int64_t n, const LayerWeights& l,
                         std::span<const Proj> ps, std::span<float* const> ys,
                         std::span<const int64_t> y_strides) {
  std::array<size_t, kNumProj> packed;
  size_t np = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    const LowRankDelta& d = l.deltas[static_cast<int>(ps[i])];
    if (!d.defined()) continue;
    if (d.packed()) {
      packed[np++] = i;
    } else {
      Serially([&] { ApplyDelta(x, x_stride, n, d, ys[i], y_strides[i]); });
    }
  }
  if (np == 0 || n == 0) return;
  auto delta = [&](size_t k) -> const LowRankDelta& {
    return l.deltas[static_cast<int>(ps[packed[k]])];
  };
  // Projections of one input share the deltas' input size. Scratch: each delta's D x, then the
  // input's rows compacted (rows of a shared pass are wider than this shape's), then U (D x).
  const int64_t in = delta(0).in();
  const bool compact = x_stride != in;
  int64_t mids = 0, widest = 0;
  for (size_t k = 0; k < np; ++k) {
    mids += n * delta(k).rank();
    widest = std::max(widest, delta(k).out());
  }
  // In a team the members share the workspace's scratch. Alone (outside a team, or one group per
  // member in a shared pass: ForEachItemAlone, whose engines may share one workspace) each
  // thread has its own.
  thread_local std::vector<float> own_mid, own_out;
  const bool in_team = CurrentTeam() != nullptr;
  std::vector<float>& mid_buf = in_team ? ws_->delta_mid : own_mid;
  std::vector<float>& out_buf = in_team ? ws_->delta_out : own_out;
  Serially([&] {
    const int64_t need = mids + (compact ? n * in : 0);
    if (static_cast<int64_t>(mid_buf.size()) < need) mid_buf.resize(need);
    if (static_cast<int64_t>(out_buf.size()) < n * widest) out_buf.resize(n * widest);
    if (compact)
      for (int64_t r = 0; r < n; ++r)
        std::copy_n(x + r * x_stride, in, mid_buf.data() + mids + r * in);
  });
  float* const mid = mid_buf.data();
  float* const part = out_buf.data();
  std::array<PackedOutput, kNumProj> downs;
  float* m = mid;
  for (size_t k = 0; k < np; ++k) {
    downs[k] = {&delta(k).down_panels, delta(k).rank(), nullptr, m};
    m += n * delta(k).rank();
  }
  LinearPackedMany(compact ? mid + mids : x, n, in, {downs.data(), np});
  for (size_t k = 0; k < np; ++k) {
    const LowRankDelta& d = delta(k);
    const PackedOutput up{&d.up_panels, d.out(), nullptr, part};
    LinearPackedMany(downs[k].y, n, d.rank(), {&up, 1});
    float* y = ys[packed[k]];
    const int64_t stride = y_strides[packed[k]], out = d.out();
    ParallelRows(n, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) AddInPlace(y + r * stride, part + r * out, out);
    });
  }
}

namespace {
// The torch baseline path stays on at::linear.
void LinearRowwiseOr(const float* x, int64_t n, const at::Tensor& W, float* y, LinearPath path) {
  if (path == LinearPath::kTorch) {
    Linear(x, n, W, nullptr, y, path);
  } else {
    LinearRowwise(x, n, W, y);
  }
}
}  // namespace

void Engine::ApplyDelta(const float* x, int64_t x_stride, int64_t n, const LowRankDelta& delta,
                        float* y, int64_t y_stride) {
  if (!delta.defined()) return;
  const LinearPath path = options_.linear_path;
  // mid = Σ a_i (D_i x), then y += Σ b_j (U_j mid): two small products per factor, row by row
  // (a row's delta must not depend on its batch-mates: see Forward).
  const int64_t r = delta.downs[0].size(0), out = delta.ups[0].size(0);
  const int64_t in = delta.downs[0].size(1);
  const int64_t big = std::max(r, out);
  if (static_cast<int64_t>(ws_->delta_mid.size()) < n * r) ws_->delta_mid.resize(n * r);
  if (static_cast<int64_t>(ws_->delta_out.size()) < n * big) ws_->delta_out.resize(n * big);
  float* mid = ws_->delta_mid.data();
  float* part = ws_->delta_out.data();
  // Inputs wider than the delta's (rows of a shared pass, zero past this shape's width) go one row
  // at a time; the rows are independent either way.
  auto down = [&](const at::Tensor& D, float* dst) {
    if (x_stride == in) {
      LinearRowwiseOr(x, n, D, dst, path);
    } else {
      for (int64_t row = 0; row < n; ++row)
        LinearRowwiseOr(x + row * x_stride, 1, D, dst + row * r, path);
    }
  };
  for (size_t i = 0; i < delta.downs.size(); ++i) {
    down(delta.downs[i], i == 0 ? mid : part);
    if (i == 0) {
      Scale(mid, delta.down_weights[0], n * r);
    } else {
      Axpy(delta.down_weights[i], part, mid, n * r);
    }
  }
  for (size_t j = 0; j < delta.ups.size(); ++j) {
    LinearRowwiseOr(mid, n, delta.ups[j], part, path);
    if (y_stride == out) {
      Axpy(delta.up_weights[j], part, y, n * out);
    } else {
      for (int64_t row = 0; row < n; ++row)
        Axpy(delta.up_weights[j], part + row * out, y + row * y_stride, out);
    }
  }
}

int64_t Engine::DecodeAttentionRows(std::span<const SeqInput> seqs) {
  int64_t rows = 0;
  for (const SeqInput& s : seqs) {
    const int64_t T = static_cast<int64_t>(s.tokens.size());
    if (T <= kTokenByTokenAttentionMax) rows += T;
  }
  return rows;
}

bool Engine::OneTokenEach(std::span<const SeqInput> seqs) {
  for (const SeqInput& s : seqs)
    if (s.tokens.size() != 1) return false;
  return true;
}

void Engine::Attention(int64_t layer, KVCache& cache, std::span<const SeqInput> seqs,
                       bool one_token_each, const AttentionIo& io) {
  const LayerWeights& lw = model_->layers[layer];
  const int64_t hd = model_->config.head_dim;
  const int64_t hq = lw.q_heads(hd), hkv = lw.kv_heads(hd);
  if (hq == 0) return;
  const int64_t group = hq / hkv;
  const int64_t qdim = io.q_stride, kvdim = io.kv_stride;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const float* q = io.q;
  const float* kn = io.k;
  const float* vn = io.v;
  float* att = io.att;
  // Slot storage is [capacity, hkv, hd] per layer, position-major (Forward reserved room for the
  // new tokens), fp32 or fp16.
  const bool half = cache.dtype() == at::kHalf;
  const int64_t row_stride = hkv * hd;

  // Row r's new keys and values of KV heads [h0, h1), into `slot` at `pos`: one run.
  auto append = [&](int64_t r, int64_t slot, int64_t h0, int64_t h1, int64_t pos) {
    const float* kr = kn + r * kvdim + h0 * hd;
    const float* vr = vn + r * kvdim + h0 * hd;
    const int64_t at_row = pos * row_stride + h0 * hd, n = (h1 - h0) * hd;
    at::Tensor& K = cache.k(layer, slot);
    at::Tensor& V = cache.v(layer, slot);
    if (half) {
      FloatToHalf(kr, K.data_ptr<at::Half>() + at_row, n);
      FloatToHalf(vr, V.data_ptr<at::Half>() + at_row, n);
    } else {
      std::memcpy(K.data_ptr<float>() + at_row, kr, n * sizeof(float));
      std::memcpy(V.data_ptr<float>() + at_row, vr, n * sizeof(float));
    }
  };
  // Row r's query heads of KV heads [h0, h1) over the first `len` positions of `slot`, with the
  // scratch of those query heads in the share of decode row `d` (< DecodeAttentionRows).
  auto attend = [&](int64_t r, int64_t d, int64_t slot, int64_t h0, int64_t h1, int64_t len) {
    const int64_t first = h0 * hd;
    const int64_t first_q = r * qdim + h0 * group * hd;  // the range's query heads
    float* scratch = io.scores + (d * hq + h0 * group) * io.scores_per_head;
    const at::Tensor& K = cache.k(layer, slot);
    const at::Tensor& V = cache.v(layer, slot);
    if (half) {
      DecodeAttention(q + first_q, h1 - h0, group, K.data_ptr<at::Half>() + first,
                      V.data_ptr<at::Half>() + first, row_stride, len, hd, scale, scratch,
                      att + first_q);
    } else {
      DecodeAttention(q + first_q, h1 - h0, group, K.data_ptr<float>() + first,
                      V.data_ptr<float>() + first, row_stride, len, hd, scale, scratch,
                      att + first_q);
    }
  };
  // KV heads per task: all of a row's (one run of its cache) when the rows split evenly over the
  // threads; else the fewest equal shares of the heads that do (fewer rows than threads, or an
  // odd count: 7 rows on 2 threads would leave one thread a task short). More shares than that
  // were slower at batch 1: each core's prefetcher also fetches the rest of every position's run,
  // which the other cores' heads use.
  auto chunks_for = [&](int64_t rows) {
    const int64_t threads = std::max(1, at::get_num_threads());
    const int64_t least = std::clamp<int64_t>((threads + rows - 1) / rows, 1, hkv);
    for (int64_t c = least; c <= hkv; ++c)
      if (rows * c % threads == 0) return c;
    return least;
  };
  auto head_range = [&](int64_t c, int64_t chunks) {
    return std::pair<int64_t, int64_t>{c * hkv / chunks, (c + 1) * hkv / chunks};
  };

  // A decode step (one new token per sequence): each (sequence, head range) task rotates its
  // query groups and keys, appends its keys and values and attends, all in parallel (done one
  // after another on one thread, RoPE and the append's cache misses left the other core idle).
  if (one_token_each) {
    float* qr = io.q;
    float* kr = io.k;
    const int64_t n = static_cast<int64_t>(seqs.size()), chunks = chunks_for(n);
    // Stealing: sequences differ in length (and vCPUs in speed), so equal counts of tasks are
    // not equal work.
    ParallelForStealing(0, n * chunks, 1, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t r = t / chunks, slot = seqs[r].slot, pos = io.pos[r];
        const auto [h0, h1] = head_range(t % chunks, chunks);
        ApplyRope(qr + r * qdim + h0 * group * hd, (h1 - h0) * group, hd, rope_, pos);
        ApplyRope(kr + r * kvdim + h0 * hd, h1 - h0, hd, rope_, pos);
        append(r, slot, h0, h1, pos);
        attend(r, r, slot, h0, h1, pos + 1);
      }
    });
    return;
  }

  // 1. Append the new keys/values (rotated by Forward). 2a's task list is built here too (both on
  // one thread).
  std::vector<DecodeTask>& single = decode_tasks_;
  Serially([&] {
    int64_t row = 0;
    for (const SeqInput& s : seqs) {
      const int64_t p0 = cache.length(s.slot), T = static_cast<int64_t>(s.tokens.size());
      for (int64_t t = 0; t < T; ++t) append(row + t, s.slot, 0, hkv, p0 + t);
      row += T;
    }

    // 2a. Decode and short runs: one task per (new token, KV head), each token attending to the
    // positions up to its own, as a decode step would; no allocation.
    single.clear();
    row = 0;
    for (const SeqInput& s : seqs) {
      const int64_t T = static_cast<int64_t>(s.tokens.size());
      if (T <= kTokenByTokenAttentionMax)
        for (int64_t t = 0; t < T; ++t)
          single.push_back({row + t, s.slot, cache.length(s.slot) + t + 1});
      row += T;
    }
  });
  if (!single.empty()) {
    const int64_t chunks = chunks_for(static_cast<int64_t>(single.size()));
    ParallelForStealing(0, static_cast<int64_t>(single.size()) * chunks, 1, 1,
                        [&](int64_t b, int64_t e) {
                          for (int64_t t = b; t < e; ++t) {
                            const DecodeTask& tk = single[t / chunks];
                            const auto [h0, h1] = head_range(t % chunks, chunks);
                            attend(tk.row, t / chunks, tk.slot, h0, h1, tk.len);
                          }
                        });
  }

  // 2b. Longer runs (prefill): query blocks against the keys they see, in bounded memory.
  Serially([&] {
    int64_t row = 0;
    for (const SeqInput& s : seqs) {
      const int64_t T = static_cast<int64_t>(s.tokens.size());
      if (T > kTokenByTokenAttentionMax) {
        const int64_t p0 = cache.length(s.slot), L = p0 + T;
        // Slot storage is [capacity, hkv, hd]; an fp16 cache is widened once per layer.
        at::Tensor K = cache.k(layer, s.slot), V = cache.v(layer, s.slot);
        if (half) {
          K = K.narrow(0, 0, L).to(at::kFloat).contiguous();
          V = V.narrow(0, 0, L).to(at::kFloat).contiguous();
        }
        PrefillAttentionArgs a;
        a.q = q + row * qdim;
        a.q_stride = qdim;
        a.k = K.data_ptr<float>();
        a.v = V.data_ptr<float>();
        a.kv_head_stride = hd;
        a.kv_row_stride = row_stride;
        a.kv_heads = hkv;
        a.group = group;
        a.head_dim = hd;
        a.p0 = p0;
        a.T = T;
        a.scale = scale;
        a.out = att + row * qdim;
        a.out_stride = qdim;
        a.bf16 = options_.bf16_prefill_attention;
        PrefillAttention(a, *io.prefill_scores);
      }
      row += T;
    }
  });
}

bool Engine::PanelsOnly(const Model& m, const EngineOptions& options) {
  // Prefill attention and the row-major kernels and unpacked deltas are libtorch or split their
  // own way (Serially would run them on one thread).
  if (options.linear_path != LinearPath::kAuto || !m.head_panels.defined()) return false;
  for (const LayerWeights& l : m.layers)
    for (int p = 0; p < kNumProj; ++p)
      if (!l.panels[p].defined() || (l.deltas[p].defined() && !l.deltas[p].packed())) return false;
  return true;
}

int Engine::PrefetchTrialKeyOf(const Model& m, bool panels_only) {
  if (!panels_only || m.layers.empty()) return -1;
  // The bytes a step reads: a sliced subnet reads a prefix of its supernet's panels.
  return PrefetchTrialKey(PanelsFormat(m.layers[0].panels[0]),
                          static_cast<size_t>(m.DecodeWeightBytes()));
}

bool Engine::RunsInOneRegion(std::span<const SeqInput> seqs) const {
  if (!options_.one_region_decode || !panels_only_) return false;
  for (const SeqInput& s : seqs)  // decode and short runs only
    if (static_cast<int64_t>(s.tokens.size()) > kTokenByTokenAttentionMax) return false;
  return true;
}

void Engine::Embed(const KVCache& cache, std::span<const SeqInput> seqs, float* x,
                   int64_t* pos) const {
  const Model& m = *model_;
  const int64_t H = m.config.hidden_size;
  const bool half_embed = m.embed.scalar_type() == at::kHalf;
  int64_t row = 0;
  for (const SeqInput& s : seqs) {
    const int64_t p0 = cache.length(s.slot);
    for (size_t t = 0; t < s.tokens.size(); ++t, ++row) {
      const int64_t id = s.tokens[t];
      if (half_embed) {
        const at::Half* e = m.embed.data_ptr<at::Half>() + id * H;
        for (int64_t i = 0; i < H; ++i) x[row * H + i] = static_cast<float>(e[i]);
      } else {
        std::memcpy(x + row * H, m.embed.data_ptr<float>() + id * H, H * sizeof(float));
      }
      pos[row] = p0 + static_cast<int64_t>(t);
    }
  }
}

void Engine::FinalNorm(std::span<const SeqInput> seqs, bool all_logits, const float* x,
                       float* h) const {
  const Model& m = *model_;
  const int64_t H = m.config.hidden_size;
  const float* fn = m.final_norm.data_ptr<float>();
  int64_t row = 0, out = 0;
  for (const SeqInput& s : seqs) {
    const int64_t T = static_cast<int64_t>(s.tokens.size());
    const int64_t keep = all_logits || s.all_logits ? T : 1;
    RmsNorm(x + (row + T - keep) * H, fn, keep, H, m.config.rms_norm_eps, h + out * H);
    row += T;
    out += keep;
  }
}

absl::Status Engine::CheckInputs(const KVCache& cache, std::span<const SeqInput> seqs) const {
  const Model& m = *model_;
  if (cache.num_layers() != static_cast<int64_t>(m.layers.size())) {
    return absl::InvalidArgumentError("Forward: KV cache was built for a different model");
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    const SeqInput& s = seqs[i];
    if (s.slot < 0 || s.slot >= cache.slots())
      return absl::InvalidArgumentError(absl::StrCat("Forward: slot ", s.slot, " out of range"));
    if (s.tokens.empty()) return absl::InvalidArgumentError("Forward: a sequence has no tokens");
    for (size_t j = 0; j < i; ++j)
      if (seqs[j].slot == s.slot) return absl::InvalidArgumentError("Forward: slot used twice");
    const int64_t end = cache.length(s.slot) + static_cast<int64_t>(s.tokens.size());
    if (end > cache.max_len()) {
      return absl::OutOfRangeError(absl::StrCat("Forward: sequence length ", end,
                                                " exceeds the cache length ", cache.max_len()));
    }
    // RoPE's tables and the attention scratch are sized by the engine's own max_len.
    if (end > options_.max_len) {
      return absl::OutOfRangeError(absl::StrCat(
          "Forward: sequence length ", end, " exceeds the engine's max_len ", options_.max_len));
    }
    for (int32_t t : s.tokens)
      if (t < 0 || t >= m.config.vocab_size)
        return absl::InvalidArgumentError(absl::StrCat("Forward: token id ", t, " out of range"));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> Engine::Forward(KVCache& cache, std::span<const SeqInput> seqs,
                                           bool all_logits) {
  const Model& m = *model_;
  const ModelConfig& c = m.config;
  if (seqs.empty()) return absl::InvalidArgumentError("Forward: no sequences");
  PassTimer pass_timer;  // counts the pass in an attached step profile
  if (absl::Status st = CheckInputs(cache, seqs); !st.ok()) return st;
  int64_t n = 0;
  for (const SeqInput& s : seqs) n += static_cast<int64_t>(s.tokens.size());
  int64_t out_rows = 0;
  for (const SeqInput& s : seqs)
    out_rows += all_logits || s.all_logits ? static_cast<int64_t>(s.tokens.size()) : 1;
  EnsureWorkspace(n, out_rows, DecodeAttentionRows(seqs));
  for (const SeqInput& s : seqs)
    cache.Reserve(s.slot, cache.length(s.slot) + static_cast<int64_t>(s.tokens.size()));

  const int64_t H = c.hidden_size, hd = c.head_dim;
  float* x = ws_->x.data_ptr<float>();
  float* h = ws_->h.data_ptr<float>();
  float* tmp = ws_->tmp.data_ptr<float>();
  // Written once for both ways of running: in a team (one parallel region for the whole pass,
  // team.h) the kernels split by the team and the serial pieces run on its first thread; else
  // each kernel opens its own region.
  const bool one_token_each = OneTokenEach(seqs);
  // Norms and residual adds go by rows over the team (each row is computed as alone: the bits do
  // not depend on the split); on one thread they were ~2% of a 16-row step with the other idle.
  auto norm_rows = [&](const at::Tensor& w) {
    ParallelRows(n, [&](int64_t b, int64_t e) {
      RmsNorm(x + b * H, w.data_ptr<float>(), e - b, H, c.rms_norm_eps, h + b * H);
    });
  };
  auto add_rows = [&](const float* y) {
    ParallelRows(n, [&](int64_t b, int64_t e) { AddInPlace(x + b * H, y + b * H, (e - b) * H); });
  };
  auto compute = [&] {
    PhaseTimer timer;  // records on the calling thread when a profile is attached
    Serially([&] { Embed(cache, seqs, x, ws_->pos.data()); });
    timer.Mark(StepPhase::kEmbed);
    for (size_t li = 0; li < m.layers.size(); ++li) {
      const LayerWeights& l = m.layers[li];
      const int64_t hq = l.q_heads(hd), hkv = l.kv_heads(hd), inter = l.intermediate();
      norm_rows(l.attn_norm);
      timer.Mark(StepPhase::kNorm);
      float* q = ws_->q.data_ptr<float>();
      float* k = ws_->k.data_ptr<float>();
      {
        constexpr std::array<Proj, 3> kQkv = {Proj::kQ, Proj::kK, Proj::kV};
        const std::array<float*, 3> out = {q, k, ws_->v.data_ptr<float>()};
        Project(h, n, l, kQkv, out);
      }
      timer.Mark(StepPhase::kQkv);
      if (!one_token_each) {  // else Attention rotates per KV head, in parallel
        Serially([&] {
          for (int64_t r = 0; r < n; ++r) {
            ApplyRope(q + r * hq * hd, hq, hd, rope_, ws_->pos[r]);
            ApplyRope(k + r * hkv * hd, hkv, hd, rope_, ws_->pos[r]);
          }
        });
        timer.Mark(StepPhase::kRope);
      }
      {
        const AttentionIo io{q,
                             k,
                             ws_->v.data_ptr<float>(),
                             ws_->att.data_ptr<float>(),
                             hq * hd,
                             hkv * hd,
                             ws_->pos.data(),
                             ws_->scores.data_ptr<float>(),
                             ws_->scores.size(1),
                             &ws_->prefill_scores};
        Attention(static_cast<int64_t>(li), cache, seqs, one_token_each, io);
      }
      timer.Mark(StepPhase::kAttention);
      if (hq > 0) {
        Project(ws_->att.data_ptr<float>(), n, l, Proj::kO, tmp);
        timer.Mark(StepPhase::kO);
        add_rows(tmp);
      } else if (l.o_bias.defined()) {
        Serially([&] {
          for (int64_t r = 0; r < n; ++r) AddInPlace(x + r * H, l.o_bias.data_ptr<float>(), H);
        });
      }
      timer.Mark(StepPhase::kResidual);
      norm_rows(l.mlp_norm);
      timer.Mark(StepPhase::kNorm);
      if (inter > 0) {
        float* g = ws_->gate.data_ptr<float>();
        float* u = ws_->up.data_ptr<float>();
        constexpr std::array<Proj, 2> kGateUp = {Proj::kGate, Proj::kUp};
        const std::array<float*, 2> out = {g, u};
        Project(h, n, l, kGateUp, out);
        timer.Mark(StepPhase::kGateUp);
        SiluMul(g, u, n * inter);
        timer.Mark(StepPhase::kSiluMul);
        Project(g, n, l, Proj::kDown, tmp);
        timer.Mark(StepPhase::kDown);
        add_rows(tmp);
      } else if (l.down_bias.defined()) {
        Serially([&] {
          for (int64_t r = 0; r < n; ++r) AddInPlace(x + r * H, l.down_bias.data_ptr<float>(), H);
        });
      }
      timer.Mark(StepPhase::kResidual);
    }

    Serially([&] { FinalNorm(seqs, all_logits, x, h); });
    timer.Mark(StepPhase::kNorm);
    if (m.head_panels.defined() && options_.linear_path == LinearPath::kAuto) {
      LinearPacked(h, out_rows, m.head_panels, m.lm_head.size(0), m.lm_head.size(1), nullptr,
                   ws_->logits.data_ptr<float>());
    } else {
      Serially([&] {
        Linear(h, out_rows, m.lm_head, nullptr, ws_->logits.data_ptr<float>(),
               options_.linear_path);
      });
    }
    timer.Mark(StepPhase::kHead);
  };
  // Batch-1 steps of a model that streams from DRAM run the prefetch arm chosen for its format
  // and size, or while that is on trial the trial's next arm (stream_prefetch.h); each member
  // of a team sets it for itself.
  bool on_trial = false;
  const int arm = n == 1 ? PrefetchArmForStep(prefetch_trial_key_, &on_trial) : -1;
  const auto started = std::chrono::steady_clock::now();
  auto compute_with_arm = [&] {
    ScopedPrefetchArm scoped(arm);
    compute();
  };
  if (RunsInOneRegion(seqs)) {
    RunInTeam(compute_with_arm);
  } else {
    compute_with_arm();
  }
  pass_timer.Done(n);
  if (on_trial) {
    RecordPrefetchTrial(
        prefetch_trial_key_, arm,
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  }
  for (const SeqInput& s : seqs)
    cache.set_length(s.slot, cache.length(s.slot) + static_cast<int64_t>(s.tokens.size()));
  return ws_->logits.narrow(0, 0, out_rows);
}

double MeasureDecodeMsPerToken(std::shared_ptr<const Model> model, int steps) {
  at::InferenceMode guard;
  Engine e(std::move(model), {.max_len = steps + 8});
  KVCache c = e.NewCache(1);
  std::vector<int32_t> prompt = {static_cast<int32_t>(e.model().config.bos_token_id)};
  SeqInput in{0, prompt};
  (void)e.Forward(c, {&in, 1});
  int32_t next = 0;
  in.tokens = {&next, 1};
  (void)e.Forward(c, {&in, 1});  // warm-up step
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) (void)e.Forward(c, {&in, 1});
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
         steps;
}

}  // namespace amoeba
