// A LLaMA-family model in memory: config + fp32 weight tensors. A subnet is an ordinary Model with
// fewer layers and narrower matrices (views that share the supernet's storage).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/config.h"

namespace amoeba {

// The seven projections of a layer, in this order wherever they are indexed.
enum class Proj { kQ, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumProj = 7;

// An additive low-rank term on a projection, y += U · (D · x), where D and U are weighted sums of
// factor matrices: D = Σ down_weights[i] · downs[i], U = Σ up_weights[j] · ups[j]. Runtime adapters
// (LoRA experts kept unmerged, mixed per subnet) run this way without copying the weight or even
// the factors: the factors are views (unit column stride, any row stride) of shared tensors.
struct LowRankDelta {
  std::vector<at::Tensor> downs;  // [r, in] each, fp32
  std::vector<float> down_weights;
  std::vector<at::Tensor> ups;  // [out, r] each, fp32
  std::vector<float> up_weights;
  // Optional decode copies (PackDeltas, model/packed_linear.h): D [r, in] and U [out, r] summed
  // and packed as panels, so the delta runs as two panel products (inside a decode step's team)
  // instead of two row-major products per factor.
  at::Tensor down_panels, up_panels;
  bool defined() const { return !downs.empty(); }
  bool packed() const { return down_panels.defined(); }
  int64_t rank() const { return downs[0].size(0); }
  int64_t in() const { return downs[0].size(1); }
  int64_t out() const { return ups[0].size(0); }
  // D and U as tensors (for merging and for the reference forward).
  at::Tensor Down() const;
  at::Tensor Up() const;
};

struct LayerWeights {
  at::Tensor attn_norm, mlp_norm;  // [hidden]
  at::Tensor q, k, v, o;           // [q_heads*hd, hidden], [kv*hd, hidden] x2, [hidden, q_heads*hd]
  at::Tensor gate, up, down;       // [inter, hidden] x2, [hidden, inter]
  at::Tensor q_bias, k_bias, v_bias, o_bias;  // optional (undefined when absent)
  at::Tensor gate_bias, up_bias, down_bias;   // optional
  std::array<LowRankDelta, kNumProj> deltas;  // by Proj; usually all absent
  // Decode copies of the projections packed as panels (model/packed_linear.h), by Proj; undefined
  // when not packed. Invariant: the row-major matrix is a prefix (a sliced view) of the matrix
  // that was packed, so a subnet shares its supernet's panels. Whoever changes a projection's
  // values must reset its panels.
  std::array<at::Tensor, kNumProj> panels;

  // The projection matrix `p`, and its bias (undefined when absent).
  const at::Tensor& proj(Proj p) const;
  at::Tensor& proj(Proj p);
  const at::Tensor& bias(Proj p) const;

  int64_t q_heads(int64_t head_dim) const { return q.size(0) / head_dim; }
  int64_t kv_heads(int64_t head_dim) const { return k.size(0) / head_dim; }
  int64_t intermediate() const { return gate.size(0); }
};

struct Model {
  ModelConfig config;
  at::Tensor embed;       // [vocab, hidden]
  at::Tensor final_norm;  // [hidden]
  at::Tensor lm_head;     // [vocab, hidden]; shares storage with embed when tied
  std::vector<LayerWeights> layers;
  at::Tensor head_panels;  // lm_head packed as panels, or undefined (same invariant as above)

  // A model running only `layer_ids` (in order), sharing all storage with this one.
  Model WithLayers(const std::vector<int>& layer_ids) const;
  // Bytes of weights one decode step reads (all layers, head; the embedding row is negligible).
  int64_t DecodeWeightBytes() const;
  // Multiply-adds of one decode step's projections and head per sequence (one per weight): what
  // a batch of n sequences multiplies by n, whatever format the weights are read in.
  int64_t DecodeMultiplyAdds() const;
  // Bytes of keys and values one cached position holds over all layers (what each decode step
  // reads per position attended), for a KV cache of `kv_element_bytes` per value.
  int64_t KvBytesPerPosition(int64_t kv_element_bytes) const;
  // Bytes of the projection matrices of all layers, plus their packed panels where present
  // (what a merged-adapter copy duplicates).
  int64_t ProjectionBytes() const;
  // Syncs config's per-layer widths and layer count with the tensors.
  void SyncConfigWithWeights();
};

// Loads config.json and model.safetensors[.index.json] from `dir`. Errors name file and tensor.
absl::StatusOr<Model> LoadModel(const std::string& dir);
// Writes config.json and model.safetensors into `dir` (created if needed), each file atomically.
absl::Status SaveModel(const Model& m, const std::string& dir, at::ScalarType dtype = at::kFloat);
// HF tensor names for all weights, in a stable order.
std::vector<std::pair<std::string, at::Tensor>> NamedWeights(const Model& m);
// A copy whose projection matrices, LM head and embedding are stored as `dtype` (kHalf halves
// the bytes each decode step reads); norms and biases stay fp32. Compute stays fp32. Panels, if
// any, are converted too.
Model ConvertWeights(const Model& m, at::ScalarType dtype);

// Random init as HF does it (normal(0, 0.02) for matrices, ones for norms), seeded.
Model RandomModel(const ModelConfig& config, uint64_t seed, double std = 0.02);

}  // namespace amoeba
