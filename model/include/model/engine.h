// The inference engine: runs a Model over a batch of sequences that each append tokens to their
// own KV-cache slot. One call mixes prefill (many tokens) and decode (one token) freely, which is
// what continuous batching needs. Buffers are reused across calls, so a steady decode loop does not
// allocate.
#pragma once
#include <ATen/ATen.h>

#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "model/kernels.h"
#include "model/kv_cache.h"
#include "model/rope.h"
#include "model/weights.h"

namespace amoeba {

struct SeqInput {
  int64_t slot = 0;                 // KV-cache slot; tokens append at cache.length(slot)
  std::span<const int32_t> tokens;  // new tokens (>= 1)
  bool all_logits = false;          // logits for every new token, not only the last
};

// Runs of up to this many new tokens attend token by token, with the decode kernel: each row's
// logits are then bit for bit what that many single-token steps would give (checking drafted
// tokens must agree with decoding them one by one); longer runs (prefill) attend in query
// blocks with GEMMs (model/src/prefill_attention.h).
inline constexpr int64_t kTokenByTokenAttentionMax = 16;

// Activation buffers of a forward pass (grown on demand, never shrunk). Engines that run on one
// thread, one after another (the server's lanes), can share one, so memory does not grow with
// the number of shapes in use.
struct EngineWorkspace {
  int64_t cap_tokens = 0, cap_logits = 0, cap_decode_rows = 0, signature = 0;
  at::Tensor x, h, q, k, v, att, tmp, gate, up, logits, scores;
  at::Tensor prefill_scores;  // per-thread score blocks of prefill attention
  std::vector<int64_t> pos;
  std::vector<float> delta_mid, delta_out;  // low-rank delta scratch
};

struct EngineOptions {
  int64_t max_len = 2048;                      // longest sequence (RoPE table and cache length)
  LinearPath linear_path = LinearPath::kAuto;  // kTorch = libtorch linear baseline
  // Shared by engines used from one thread, one after another; null = the engine's own.
  std::shared_ptr<EngineWorkspace> workspace = nullptr;
  // KV cache storage: kFloat, or kHalf (half the KV memory and attention reads; K/V rounded).
  at::ScalarType kv_dtype = at::kFloat;
  // Decode steps (runs of up to kTokenByTokenAttentionMax tokens per sequence, weights in panels,
  // no low-rank deltas) in one parallel region with spin barriers between the kernels
  // (model/team.h); false: one region per kernel call. The results are the same bits.
  bool one_region_decode = true;
  // Prefill attention (runs longer than kTokenByTokenAttentionMax tokens) takes bf16 inputs to its
  // two products, with fp32 sums, softmax and output, where the CPU has AVX512-BF16 (Zen 4+,
  // Sapphire Rapids+): about twice their rate, which long prompts need. Logits then differ from an
  // fp32 prefill's at bf16's rounding scale. false: fp32 throughout, as decode steps are.
  bool bf16_prefill_attention = true;
};

class Engine;

// One model's part of a shared pass (Engine::ForwardShared).
struct SharedForwardGroup {
  Engine* engine = nullptr;
  KVCache* cache = nullptr;
  std::span<const SeqInput> seqs;
  // One key per layer of the engine's model, increasing. Layers with the same key across groups
  // are one weight storage seen at per-layer prefixes (views of one model, each keeping the first
  // rows of q/k/v/gate/up and the first columns of o/down): their panels are streamed once for all
  // of those groups' rows. Any other layers still run in the same walk, on their own panels.
  std::span<const int64_t> layer_keys;
  bool all_logits = false;
  at::Tensor logits{};  // out: as Forward returns, a view valid until the next pass
};

// Activation buffers of shared passes (grown on demand).
struct SharedWorkspace {
  at::Tensor x, h, q, k, v, att, tmp, gate, up, logits, scores, prefill_scores;
  std::vector<int64_t> pos;
  std::vector<int64_t> panel_rows;  // per projection, per panel: rows that panel computes
};

// What a shared pass did (for metrics): the rows of each group and the panel bytes it streamed.
struct SharedPassStats {
  int64_t rows = 0;
  int64_t weight_bytes = 0;        // panel bytes read once for every model they serve
  int64_t weight_bytes_alone = 0;  // what each model reading its own would have read
};

class Engine {
 public:
  Engine(std::shared_ptr<const Model> model, EngineOptions options = {});

  const Model& model() const { return *model_; }
  const EngineOptions& options() const { return options_; }
  KVCache NewCache(int64_t slots) const {
    return KVCache(*model_, slots, options_.max_len, options_.kv_dtype);
  }

  // Appends each sequence's tokens to its slot and returns logits for the last new token of each
  // sequence, or for all of its new tokens where SeqInput::all_logits (or `all_logits` here) asks,
  // rows in input order: [rows, vocab]. The returned tensor is a view of an internal buffer, valid
  // until the next call. With the fp32/fp16 panel kernels on AVX2 and the portable path, and with
  // q8_0/q4_0 panels on every path, a row's values do not depend on the other rows of the call.
  // Errors: INVALID_ARGUMENT for inputs that do not fit the cache (slot, token id), OUT_OF_RANGE
  // past the cache; it may also throw — c10::Error from libtorch (TORCH_CHECK, allocation failures)
  // or std::bad_alloc — and callers that must not stop catch those and map them with
  // model/errors.h.
  absl::StatusOr<at::Tensor> Forward(KVCache& cache, std::span<const SeqInput> seqs,
                                     bool all_logits = false);

  // One forward pass over several models at once (model/src/engine_shared.cc): the layers are
  // walked in key order, and at each key the rows of every group whose model has that layer go
  // through one stream of its panels; each row keeps its own model's widths, biases, low-rank
  // deltas, attention and KV cache. A group's logits equal its own Forward's: bit for bit where a
  // row's values do not depend on its batch-mates (see Forward), else to rounding. Errors as
  // Forward's (INVALID_ARGUMENT names the group); on error no cache has changed.
  static absl::Status ForwardShared(std::span<SharedForwardGroup> groups, SharedWorkspace& ws,
                                    SharedPassStats* stats = nullptr);

 private:
  void EnsureWorkspace(int64_t tokens, int64_t logit_rows, int64_t decode_rows);
  // Rows of the new tokens' embeddings into x and their positions into pos.
  void Embed(const KVCache& cache, std::span<const SeqInput> seqs, float* x, int64_t* pos) const;
  // The final norm of the rows whose logits are wanted (the last of each sequence, or all), into
  // consecutive rows of h.
  void FinalNorm(std::span<const SeqInput> seqs, bool all_logits, const float* x, float* h) const;
  // A pure decode step: every sequence brings one new token.
  static bool OneTokenEach(std::span<const SeqInput> seqs);
  // Rows that attend token by token with the decode kernel (runs of up to
  // kTokenByTokenAttentionMax tokens): each needs its share of the attention scratch.
  static int64_t DecodeAttentionRows(std::span<const SeqInput> seqs);
  // Forward's input checks (slot, tokens, room in the cache).
  absl::Status CheckInputs(const KVCache& cache, std::span<const SeqInput> seqs) const;
  // Whether every kernel of `m` reads panels (no row-major weights, no low-rank deltas).
  static bool PanelsOnly(const Model& m, const EngineOptions& options);
  // Whether a Forward over `seqs` can run as one team (EngineOptions::one_region_decode).
  bool RunsInOneRegion(std::span<const SeqInput> seqs) const;
  // Where one layer's attention reads and writes: rows in `seqs` order, q and att with row stride
  // q_stride, k and v with kv_stride (at least the layer's widths: a shared pass's rows are as
  // wide as its widest model), positions per row, decode-attention scratch: `scores_per_head`
  // floats per (decode row, query head), as the caller sized it.
  struct AttentionIo {
    float* q;
    float* k;
    const float* v;
    float* att;
    int64_t q_stride, kv_stride;
    const int64_t* pos;
    float* scores;
    int64_t scores_per_head;
    at::Tensor* prefill_scores;
  };
  // one_token_each (a pure decode step): RoPE is applied here, per KV head, not by Forward.
  void Attention(int64_t layer, KVCache& cache, std::span<const SeqInput> seqs, bool one_token_each,
                 const AttentionIo& io);
  // y_i[n, out_i] = x W_i^T + bias_i (+ U_i D_i x where projection i carries a low-rank delta)
  // for projections `ps` of one input (q, k, v; gate, up; or one): with panels (PackWeights) in
  // one pass (LinearPackedMany), else with the row-major kernels one by one.
  void Project(const float* x, int64_t n, const LayerWeights& l, std::span<const Proj> ps,
               std::span<float* const> ys);
  void Project(const float* x, int64_t n, const LayerWeights& l, Proj p, float* y) {
    Project(x, n, l, {&p, 1}, {&y, 1});
  }
  // ys[i] += the low-rank delta of projection ps[i] applied to x (nothing where absent), x and
  // ys[i] rows at their strides (at least the deltas' input and output sizes). Packed deltas run
  // as panel products, the down products of all of them in one pass (inside a team every member
  // calls this); the others row-major, on one thread.
  void ApplyDeltas(const float* x, int64_t x_stride, int64_t n, const LayerWeights& l,
                   std::span<const Proj> ps, std::span<float* const> ys,
                   std::span<const int64_t> y_strides);
  // y += the projection's low-rank delta applied to x (nothing when absent); x and y rows at
  // their strides (at least the delta's input and output sizes).
  void ApplyDelta(const float* x, int64_t x_stride, int64_t n, const LowRankDelta& delta, float* y,
                  int64_t y_stride);

  std::shared_ptr<const Model> model_;
  EngineOptions options_;
  RopeTable rope_;
  // PanelsOnly(model, options), once: the model is const (were it changed anyway, the Serially
  // guards keep a team correct, only slower).
  bool panels_only_;
  // The prefetch trial (format and size class) this model's batch-1 steps take part in, or -1
  // (not all panels, or small enough to stay in the cache).
  static int PrefetchTrialKeyOf(const Model& m, bool panels_only);
  int prefetch_trial_key_;
  std::shared_ptr<EngineWorkspace> ws_;
  struct DecodeTask {
    int64_t row, slot, len;
  };
  std::vector<DecodeTask> decode_tasks_;  // reused: no allocation per decode step
};

// Batch-1 decode latency of `model` on this host (short context, after warm-up), in ms per token.
double MeasureDecodeMsPerToken(std::shared_ptr<const Model> model, int steps = 16);

}  // namespace amoeba
