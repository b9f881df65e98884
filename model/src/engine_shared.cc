// Engine::ForwardShared: one pass over several models whose layers share weight storage at
// per-layer prefixes. At each layer key the groups that have it are split by storage; a storage
// serving several groups streams its panels once for all of their rows, widest model first, each
// panel computing only the rows whose model keeps it (PackedOutput::panel_rows). Rows past a
// model's width on the input side (o, down) are zero, so every row sums exactly what its own
// model's pass sums.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "decode_attention.h"
#include "model/engine.h"
#include "model/packed_linear.h"
#include "model/step_profile.h"
#include "model/team.h"

namespace amoeba {

namespace {

float* Grow(at::Tensor& t, int64_t numel) {
  if (!t.defined() || t.numel() < numel) t = at::empty({std::max<int64_t>(numel, 1)});
  return t.data_ptr<float>();
}

struct GroupState {
  size_t next_layer = 0;    // the group's next layer to run
  int64_t base = 0, n = 0;  // its rows of x
  int64_t out_base = 0, out_rows = 0;
  bool one_token_each = true;
  int64_t layer = -1;  // its layer at the current key
  int64_t offset = 0;  // first row in the compact buffers of its storage class
};

const float* BiasOf(const LayerWeights& l, Proj p) {
  const at::Tensor& t = l.bias(p);
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

// Rows [0, panel_rows[p]) for each panel p of an output `width` wide, rows grouped widest first.
void FillPanelRows(std::span<const int64_t> widths, std::span<const int64_t> rows, int64_t panels,
                   int64_t* out) {
  constexpr int64_t kRows = 16;
  for (int64_t p = 0; p < panels; ++p) {
    int64_t r = 0;
    for (size_t g = 0; g < widths.size() && widths[g] > p * kRows; ++g) r += rows[g];
    out[p] = r;
  }
}

}  // namespace

absl::Status Engine::ForwardShared(std::span<SharedForwardGroup> groups, SharedWorkspace& ws,
                                   SharedPassStats* stats) {
  PassTimer pass_timer;  // counts the pass in an attached step profile
  if (groups.empty()) return absl::InvalidArgumentError("ForwardShared: no groups");
  const size_t G = groups.size();
  const ModelConfig& c0 = groups[0].engine->model().config;
  const int64_t H = c0.hidden_size, hd = c0.head_dim, V = c0.vocab_size;
  int64_t N = 0, out_total = 0, qmax = 0, kvmax = 0, imax = 0, scratch = 0, per_head = 0;
  std::vector<GroupState> st(G);
  for (size_t g = 0; g < G; ++g) {
    SharedForwardGroup& gr = groups[g];
    if (!gr.engine || !gr.cache)
      return absl::InvalidArgumentError(absl::StrCat("ForwardShared: group ", g, " is empty"));
    const Engine& e = *gr.engine;
    const Model& m = e.model();
    if (m.config.hidden_size != H || m.config.head_dim != hd || m.config.vocab_size != V) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ForwardShared: group ", g, "'s model differs in hidden size, head size or vocabulary"));
    }
    if (gr.layer_keys.size() != m.layers.size() ||
        !std::is_sorted(gr.layer_keys.begin(), gr.layer_keys.end()) ||
        std::adjacent_find(gr.layer_keys.begin(), gr.layer_keys.end()) != gr.layer_keys.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("ForwardShared: group ", g, " needs one increasing key per layer"));
    }
    if (gr.seqs.empty())
      return absl::InvalidArgumentError(absl::StrCat("ForwardShared: group ", g, " has no rows"));
    if (absl::Status s = e.CheckInputs(*gr.cache, gr.seqs); !s.ok())
      return absl::Status(s.code(), absl::StrCat("group ", g, ": ", s.message()));
    for (size_t j = 0; j < g; ++j)
      if (groups[j].cache == gr.cache)
        return absl::InvalidArgumentError("ForwardShared: two groups share one KV cache");
    st[g].base = N;
    for (const SeqInput& s : gr.seqs) {
      const int64_t T = static_cast<int64_t>(s.tokens.size());
      st[g].n += T;
      st[g].out_rows += gr.all_logits || s.all_logits ? T : 1;
    }
    st[g].out_base = out_total;
    st[g].one_token_each = Engine::OneTokenEach(gr.seqs);
    N += st[g].n;
    out_total += st[g].out_rows;
    int64_t kv_heads = 0, q_heads = 0;
    for (const LayerWeights& l : m.layers) {
      qmax = std::max(qmax, l.q_heads(hd) * hd);
      q_heads = std::max(q_heads, l.q_heads(hd));
      kv_heads = std::max(kv_heads, l.kv_heads(hd));
      imax = std::max(imax, l.intermediate());
    }
    kvmax = std::max(kvmax, kv_heads * hd);
    // Attention's scratch, one share per (decode row, query head) of the group in turn (a
    // prompt's rows attend in blocks and take none), each share as long as the longest cache's.
    per_head = std::max(per_head, DecodeAttentionScratchPerHead(gr.cache->max_len()));
    scratch = std::max(scratch, Engine::DecodeAttentionRows(gr.seqs) * q_heads);
  }
  scratch *= per_head;

  // Buffers before any parallel region (a team must not allocate).
  float* x = Grow(ws.x, N * H);
  float* h = Grow(ws.h, std::max(N, out_total) * H);
  float* q = Grow(ws.q, N * qmax);
  float* k = Grow(ws.k, N * kvmax);
  float* v = Grow(ws.v, N * kvmax);
  float* att = Grow(ws.att, N * qmax);
  float* tmp = Grow(ws.tmp, N * H);
  float* gate = Grow(ws.gate, N * imax);
  float* up = Grow(ws.up, N * imax);
  float* logits = Grow(ws.logits, out_total * V);
  float* scores = Grow(ws.scores, scratch);
  if (static_cast<int64_t>(ws.pos.size()) < N) ws.pos.resize(N);
  const int64_t max_panels = (std::max({qmax, kvmax, imax}) + 15) / 16;
  if (static_cast<int64_t>(ws.panel_rows.size()) < 3 * max_panels)
    ws.panel_rows.resize(3 * max_panels);
  int64_t* pos = ws.pos.data();
  for (size_t g = 0; g < G; ++g)
    for (const SeqInput& s : groups[g].seqs)
      groups[g].cache->Reserve(
          s.slot, groups[g].cache->length(s.slot) + static_cast<int64_t>(s.tokens.size()));

  SharedPassStats counted;
  counted.rows = N;
  bool one_region = true;
  for (size_t g = 0; g < G; ++g)
    one_region = one_region && groups[g].engine->RunsInOneRegion(groups[g].seqs);

  // The storage classes at one key: groups whose layer reads the same panels (one class of
  // several), or any other group alone. `order` holds the active groups, classes back to back.
  std::vector<size_t> active, order;
  std::vector<std::pair<size_t, size_t>> classes;  // [begin, end) of `order`
  std::vector<int64_t> widths, rows;
  active.reserve(G);
  order.reserve(G);
  classes.reserve(G);
  widths.reserve(G);
  rows.reserve(G);
  auto panels_of = [&](size_t g, Proj p) -> const at::Tensor& {
    return groups[g].engine->model().layers[st[g].layer].panels[static_cast<int>(p)];
  };
  auto layer_of = [&](size_t g) -> const LayerWeights& {
    return groups[g].engine->model().layers[st[g].layer];
  };
  // Whether group g's layer runs on panels alone (deltas ride along separately).
  auto packed = [&](size_t g) {
    if (groups[g].engine->options_.linear_path != LinearPath::kAuto) return false;
    for (int p = 0; p < kNumProj; ++p)
      if (!layer_of(g).panels[p].defined()) return false;
    return true;
  };
  // Panel bytes of an out x in prefix: streamed (`read`), and what a pass of its own would read.
  auto add_bytes = [&](const at::Tensor& panels, int64_t out, int64_t in, bool read, bool alone) {
    const auto b =
        static_cast<int64_t>(static_cast<double>(out * in) * BytesPerWeight(PanelsFormat(panels)));
    if (read) counted.weight_bytes += b;
    if (alone) counted.weight_bytes_alone += b;
  };
  std::vector<char> taken;
  taken.reserve(G);

  // Splits `active` into classes, each sorted by `width_of` (widest first), with compact offsets.
  auto make_classes = [&](auto width_of) {
    order.clear();
    classes.clear();
    taken.assign(active.size(), 0);
    for (size_t i = 0; i < active.size(); ++i) {
      if (taken[i]) continue;
      const size_t begin = order.size();
      order.push_back(active[i]);
      taken[i] = 1;
      if (packed(active[i])) {
        const void* key = panels_of(active[i], Proj::kQ).data_ptr();
        for (size_t j = i + 1; j < active.size(); ++j)
          if (!taken[j] && packed(active[j]) && panels_of(active[j], Proj::kQ).data_ptr() == key) {
            order.push_back(active[j]);
            taken[j] = 1;
          }
      }
      // Widest first, stable (an insertion sort: a handful of groups, and no allocation).
      for (size_t j = begin + 1; j < order.size(); ++j)
        for (size_t i2 = j; i2 > begin && width_of(order[i2 - 1]) < width_of(order[i2]); --i2)
          std::swap(order[i2 - 1], order[i2]);
      int64_t offset = 0;
      for (size_t j = begin; j < order.size(); ++j) {
        st[order[j]].offset = offset;
        offset += st[order[j]].n;
      }
      classes.emplace_back(begin, order.size());
    }
  };

  // Runs projections `ps` of the class [b, e) over compact rows `in_buf` (stride `in`) into
  // `outs` (row stride `out_w[i]`, the class's widest): one stream of the shared panels, then each
  // group's biases and deltas; a class of one runs its engine's own Project.
  auto project = [&](size_t b, size_t e, const float* in_buf, int64_t in, std::span<const Proj> ps,
                     std::span<float* const> outs, std::span<const int64_t> out_w,
                     auto width_of_proj) {
    const size_t first = order[b];
    const LayerWeights& l0 = layer_of(first);
    int64_t nrows = 0;
    for (size_t j = b; j < e; ++j) nrows += st[order[j]].n;
    if (e - b == 1) {
      groups[first].engine->Project(in_buf, nrows, l0, ps, outs);
      if (packed(first))
        Serially([&] {
          for (size_t i = 0; i < ps.size(); ++i)
            add_bytes(l0.panels[static_cast<int>(ps[i])], out_w[i], in, true, true);
        });
      return;
    }
    // Every member of a team builds the same outputs; the row counts are written once.
    std::array<PackedOutput, kNumProj> po;
    for (size_t i = 0; i < ps.size(); ++i)
      po[i] = {&l0.panels[static_cast<int>(ps[i])], out_w[i], nullptr, outs[i],
               ws.panel_rows.data() + i * max_panels};
    Serially([&] {
      for (size_t i = 0; i < ps.size(); ++i) {
        widths.clear();
        rows.clear();
        for (size_t j = b; j < e; ++j) {
          widths.push_back(width_of_proj(order[j], ps[i]));
          rows.push_back(st[order[j]].n);
        }
        FillPanelRows(widths, rows, (out_w[i] + 15) / 16, ws.panel_rows.data() + i * max_panels);
        add_bytes(l0.panels[static_cast<int>(ps[i])], out_w[i], in, true, false);
        for (size_t j = b; j < e; ++j)
          add_bytes(l0.panels[static_cast<int>(ps[i])], width_of_proj(order[j], ps[i]),
                    layer_of(order[j]).proj(ps[i]).size(1), false, true);
      }
    });
    LinearPackedMany(in_buf, nrows, in, {po.data(), ps.size()});
    Serially([&] {
      for (size_t j = b; j < e; ++j) {
        const size_t g = order[j];
        const LayerWeights& l = layer_of(g);
        for (size_t i = 0; i < ps.size(); ++i) {
          float* y = outs[i] + st[g].offset * out_w[i];
          const int64_t w = l.proj(ps[i]).size(0);
          if (const float* bias = BiasOf(l, ps[i]))
            for (int64_t r = 0; r < st[g].n; ++r) AddInPlace(y + r * out_w[i], bias, w);
        }
      }
    });
    // Each group's own deltas over its rows: a few rows per group, so each group runs on one
    // member alone (8 shapes of 100m q8_0 with adapters: a team's barriers around every small
    // product cost more than the products).
    ForEachItemAlone(static_cast<int64_t>(e - b), [&](int64_t j) {
      const size_t g = order[b + j];
      std::array<float*, kNumProj> ys;
      for (size_t i = 0; i < ps.size(); ++i) ys[i] = outs[i] + st[g].offset * out_w[i];
      groups[g].engine->ApplyDeltas(in_buf + st[g].offset * in, in, st[g].n, layer_of(g), ps,
                                    {ys.data(), ps.size()}, out_w);
    });
  };

  // The pieces both blocks of a layer (attention, MLP) share. start_block: the groups at this key
  // whose layer drops the block add its bias alone; the rest form classes by `width_of`.
  auto start_block = [&](auto width_of, const at::Tensor LayerWeights::*bias) {
    Serially([&] {
      active.clear();
      for (size_t g = 0; g < G; ++g)
        if (st[g].layer >= 0) active.push_back(g);
      for (size_t g : active) {
        const at::Tensor& b = layer_of(g).*bias;
        if (width_of(g) == 0 && b.defined())
          for (int64_t r = 0; r < st[g].n; ++r)
            AddInPlace(x + (st[g].base + r) * H, b.data_ptr<float>(), H);
      }
      std::erase_if(active, [&](size_t g) { return width_of(g) == 0; });
      make_classes(width_of);
    });
  };
  // fn(g, r0, r1) for each group g of the class's groups [b, e) and its rows [r0, r1), the
  // class's rows split over the team (row-wise work: each row is computed as alone).
  auto for_class_rows = [&](size_t b, size_t e, const auto& fn) {
    int64_t total = 0;
    for (size_t j = b; j < e; ++j) total += st[order[j]].n;
    ParallelRows(total, [&](int64_t lo, int64_t hi) {
      int64_t first = 0;  // the class's index of group order[j]'s first row
      for (size_t j = b; j < e && first < hi; ++j) {
        const size_t g = order[j];
        const int64_t r0 = std::max(lo, first) - first, r1 = std::min(hi, first + st[g].n) - first;
        if (r0 < r1) fn(g, r0, r1);
        first += st[g].n;
      }
    });
  };
  // The class's rows of x through each group's norm, into its compact rows of h.
  auto norm_rows = [&](size_t b, size_t e, const at::Tensor LayerWeights::*norm) {
    for_class_rows(b, e, [&](size_t g, int64_t r0, int64_t r1) {
      RmsNorm(x + (st[g].base + r0) * H, (layer_of(g).*norm).data_ptr<float>(), r1 - r0, H,
              groups[g].engine->model().config.rms_norm_eps, h + (st[g].offset + r0) * H);
    });
  };
  // Zero each group's rows of `buf` (row stride `stride`, the class's width) past its own width:
  // the next projection reads the class's width.
  auto zero_tails = [&](size_t b, size_t e, float* buf, int64_t stride, auto width_of) {
    if (e - b == 1) return;  // a class of one is as wide as its group
    Serially([&] {
      for (size_t j = b; j < e; ++j) {
        const size_t g = order[j];
        if (width_of(g) < stride)
          for (int64_t r = 0; r < st[g].n; ++r)
            std::fill(buf + (st[g].offset + r) * stride + width_of(g),
                      buf + (st[g].offset + r + 1) * stride, 0.f);
      }
    });
  };
  // The residual: each group's compact rows of tmp added to its rows of x.
  auto add_residual = [&](size_t b, size_t e) {
    for_class_rows(b, e, [&](size_t g, int64_t r0, int64_t r1) {
      AddInPlace(x + (st[g].base + r0) * H, tmp + (st[g].offset + r0) * H, (r1 - r0) * H);
    });
  };

  bool done = false;  // shared: written on the team's first thread, read by all
  auto compute = [&] {
    PhaseTimer timer;  // records on the calling thread when a profile is attached
    Serially([&] {
      for (size_t g = 0; g < G; ++g)
        groups[g].engine->Embed(*groups[g].cache, groups[g].seqs, x + st[g].base * H,
                                pos + st[g].base);
    });
    timer.Mark(StepPhase::kEmbed);
    for (;;) {
      // The next key, the smallest among the groups' next layers, and the groups that have it
      // (every member of a team reads the result after the barrier).
      Serially([&] {
        int64_t key = 0;
        bool any = false;
        for (size_t g = 0; g < G; ++g) {
          if (st[g].next_layer >= groups[g].layer_keys.size()) continue;
          const int64_t kg = groups[g].layer_keys[st[g].next_layer];
          if (!any || kg < key) key = kg;
          any = true;
        }
        done = !any;
        active.clear();
        for (size_t g = 0; g < G; ++g) {
          st[g].layer = -1;
          if (any && st[g].next_layer < groups[g].layer_keys.size() &&
              groups[g].layer_keys[st[g].next_layer] == key) {
            st[g].layer = static_cast<int64_t>(st[g].next_layer++);
            active.push_back(g);
          }
        }
      });
      if (done) break;

      // Attention.
      auto qdim = [&](size_t g) { return layer_of(g).q_heads(hd) * hd; };
      auto qkv_width = [&](size_t g, Proj p) {
        return p == Proj::kQ ? qdim(g) : layer_of(g).kv_heads(hd) * hd;
      };
      start_block(qdim, &LayerWeights::o_bias);
      timer.Mark(StepPhase::kResidual);
      for (const auto& [b, e] : classes) {
        const int64_t qs = qdim(order[b]), kvs = qkv_width(order[b], Proj::kK);
        norm_rows(b, e, &LayerWeights::attn_norm);
        timer.Mark(StepPhase::kNorm);
        constexpr std::array<Proj, 3> kQkv = {Proj::kQ, Proj::kK, Proj::kV};
        const std::array<float*, 3> qkv_out = {q, k, v};
        const std::array<int64_t, 3> qkv_w = {qs, kvs, kvs};
        project(b, e, h, H, kQkv, qkv_out, qkv_w, qkv_width);
        timer.Mark(StepPhase::kQkv);
        for (size_t j = b; j < e; ++j) {
          const size_t g = order[j];
          Engine& eng = *groups[g].engine;
          const int64_t hq = layer_of(g).q_heads(hd), hkv = layer_of(g).kv_heads(hd);
          float* qg = q + st[g].offset * qs;
          float* kg = k + st[g].offset * kvs;
          if (!st[g].one_token_each) {
            Serially([&] {
              for (int64_t r = 0; r < st[g].n; ++r) {
                ApplyRope(qg + r * qs, hq, hd, eng.rope_, pos[st[g].base + r]);
                ApplyRope(kg + r * kvs, hkv, hd, eng.rope_, pos[st[g].base + r]);
              }
            });
            timer.Mark(StepPhase::kRope);
          }
          float* ag = att + st[g].offset * qs;
          const AttentionIo io{
              qg,     kg,       v + st[g].offset * kvs, ag, qs, kvs, pos + st[g].base,
              scores, per_head, &ws.prefill_scores};
          eng.Attention(st[g].layer, *groups[g].cache, groups[g].seqs, st[g].one_token_each, io);
          timer.Mark(StepPhase::kAttention);
        }
        zero_tails(b, e, att, qs, qdim);
        timer.Mark(StepPhase::kResidual);
        const std::array<Proj, 1> kO = {Proj::kO};
        const std::array<float*, 1> o_out = {tmp};
        const std::array<int64_t, 1> o_w = {H};
        project(b, e, att, qs, kO, o_out, o_w, [&](size_t, Proj) { return H; });
        timer.Mark(StepPhase::kO);
        add_residual(b, e);
        timer.Mark(StepPhase::kResidual);
      }

      // MLP: the same groups that have this key, now widest MLP first.
      auto inter = [&](size_t g) { return layer_of(g).intermediate(); };
      start_block(inter, &LayerWeights::down_bias);
      timer.Mark(StepPhase::kResidual);
      for (const auto& [b, e] : classes) {
        const int64_t is = inter(order[b]);
        int64_t nrows = 0;
        for (size_t j = b; j < e; ++j) nrows += st[order[j]].n;
        norm_rows(b, e, &LayerWeights::mlp_norm);
        timer.Mark(StepPhase::kNorm);
        constexpr std::array<Proj, 2> kGateUp = {Proj::kGate, Proj::kUp};
        const std::array<float*, 2> gu_out = {gate, up};
        const std::array<int64_t, 2> gu_w = {is, is};
        project(b, e, h, H, kGateUp, gu_out, gu_w, [&](size_t g, Proj) { return inter(g); });
        timer.Mark(StepPhase::kGateUp);
        SiluMul(gate, up, nrows * is);
        timer.Mark(StepPhase::kSiluMul);
        zero_tails(b, e, gate, is, inter);
        timer.Mark(StepPhase::kResidual);
        const std::array<Proj, 1> kDown = {Proj::kDown};
        const std::array<float*, 1> d_out = {tmp};
        const std::array<int64_t, 1> d_w = {H};
        project(b, e, gate, is, kDown, d_out, d_w, [&](size_t, Proj) { return H; });
        timer.Mark(StepPhase::kDown);
        add_residual(b, e);
        timer.Mark(StepPhase::kResidual);
      }
    }

    // Final norms into consecutive rows, then the LM head: one stream when every group reads the
    // same head panels, else each its own.
    Serially([&] {
      for (size_t g = 0; g < G; ++g)
        groups[g].engine->FinalNorm(groups[g].seqs, groups[g].all_logits, x + st[g].base * H,
                                    h + st[g].out_base * H);
    });
    timer.Mark(StepPhase::kNorm);
    bool one_head = true;
    for (size_t g = 0; g < G; ++g) {
      const Model& m = groups[g].engine->model();
      one_head = one_head && m.head_panels.defined() &&
                 groups[g].engine->options_.linear_path == LinearPath::kAuto &&
                 m.head_panels.data_ptr() == groups[0].engine->model().head_panels.data_ptr() &&
                 m.lm_head.size(1) == H;
    }
    if (one_head) {
      const Model& m = groups[0].engine->model();
      LinearPacked(h, out_total, m.head_panels, V, H, nullptr, logits);
      Serially([&] {
        add_bytes(m.head_panels, V, H, true, false);
        for (size_t g = 0; g < G; ++g) add_bytes(m.head_panels, V, H, false, true);
      });
      timer.Mark(StepPhase::kHead);
      return;
    }
    for (size_t g = 0; g < G; ++g) {
      const Model& m = groups[g].engine->model();
      const float* hg = h + st[g].out_base * H;
      float* lg = logits + st[g].out_base * V;
      if (m.head_panels.defined() && groups[g].engine->options_.linear_path == LinearPath::kAuto) {
        LinearPacked(hg, st[g].out_rows, m.head_panels, V, H, nullptr, lg);
        Serially([&] { add_bytes(m.head_panels, V, H, true, true); });
      } else {
        Serially([&] {
          Linear(hg, st[g].out_rows, m.lm_head, nullptr, lg,
                 groups[g].engine->options_.linear_path);
        });
      }
    }
    timer.Mark(StepPhase::kHead);
  };
  if (one_region) {
    RunInTeam(compute);
  } else {
    compute();
  }
  for (size_t g = 0; g < G; ++g) {
    for (const SeqInput& s : groups[g].seqs)
      groups[g].cache->set_length(
          s.slot, groups[g].cache->length(s.slot) + static_cast<int64_t>(s.tokens.size()));
    groups[g].logits =
        ws.logits.narrow(0, st[g].out_base * V, st[g].out_rows * V).view({st[g].out_rows, V});
  }
  pass_timer.Done(N);
  if (stats) *stats = counted;
  return absl::OkStatus();
}

}  // namespace amoeba
