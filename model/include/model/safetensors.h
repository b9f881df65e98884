// Hugging Face safetensors: memory-mapped reader (single file or sharded via
// model.safetensors.index.json) and an atomic writer. Every malformed input is an error that names
// the file and the tensor; nothing here throws or aborts.
#pragma once
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace amoeba {

struct TensorInfo {
  std::string dtype;  // "F32", "F16", "BF16", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets into the data section
};

class SafetensorsFile {
 public:
  static absl::StatusOr<std::shared_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* info(const std::string& name) const;

  // The tensor as fp32. F32 data is mapped copy-on-write without a copy; F16/BF16 are converted.
  absl::StatusOr<at::Tensor> GetF32(const std::string& name) const;
  // The tensor in its stored dtype (zero-copy view of the mapping).
  absl::StatusOr<at::Tensor> Get(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  size_t data_offset_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  std::weak_ptr<SafetensorsFile> self_;
};

// A set of safetensors files addressed by tensor name: one file, or the shards listed in an
// index file.
class TensorStore {
 public:
  // `dir` holds model.safetensors or model.safetensors.index.json.
  static absl::StatusOr<TensorStore> OpenDir(const std::string& dir);
  static absl::StatusOr<TensorStore> OpenFile(const std::string& path);

  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  std::vector<std::string> names() const;
  // fp32, with an optional expected shape: a mismatch is an error naming file and tensor.
  absl::StatusOr<at::Tensor> GetF32(const std::string& name,
                                    const std::vector<int64_t>& expect_shape = {}) const;

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;
};

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes tensors atomically. `dtype` picks the on-disk type: kFloat, kHalf or kBFloat16.
absl::Status WriteSafetensors(const std::string& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata = {},
                              at::ScalarType dtype = at::kFloat);

}  // namespace amoeba
