#include "model/kv_cache.h"

namespace amoeba {

KVCache::KVCache(const Model& model, int64_t slots, int64_t max_len) : max_len_(max_len) {
  const int64_t hd = model.config.head_dim;
  for (const auto& l : model.layers) {
    k_.push_back(at::zeros({slots, l.kv_heads(hd), max_len, hd}));
    v_.push_back(at::zeros({slots, l.kv_heads(hd), max_len, hd}));
  }
  lengths_.assign(slots, 0);
}

int64_t KVCache::bytes() const {
  int64_t b = 0;
  for (size_t i = 0; i < k_.size(); ++i) b += (k_[i].numel() + v_[i].numel()) * sizeof(float);
  return b;
}

}  // namespace amoeba
