// GGUF (version 3), the file format llama.cpp reads: a header, typed metadata key/values, tensor
// infos, then the tensor data, each tensor aligned to `general.alignment` (default 32).
// GgufWriter builds a file in memory order and writes it atomically; ReadGguf maps a file and
// checks every length, type, offset and size, naming the file and the key or tensor at fault.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace amoeba {

// Metadata value types (GGUF's gguf_metadata_value_type).
enum class GgufType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};

// Tensor element types (ggml_type) this project writes and reads.
enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ8_0 = 8 };

const char* GgmlTypeName(GgmlType t);
// Bytes of `n` elements (a multiple of 32 for the block types).
int64_t GgmlTypeBytes(GgmlType t, int64_t n);

// One metadata value: a scalar (integers in `i` or `u`, floats in `f`), a string, or an array of
// one element type.
struct GgufValue {
  GgufType type = GgufType::kUint32;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string s;
  GgufType elem_type = GgufType::kUint32;  // arrays
  std::vector<GgufValue> array;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // ne[0] is the row length (the fastest-varying dimension)
  GgmlType type = GgmlType::kF32;
  uint64_t offset = 0;  // from the start of the data section
  int64_t bytes = 0;
  const uint8_t* data = nullptr;  // into the mapped file (ReadGguf)
};

class GgufWriter {
 public:
  void SetString(const std::string& key, const std::string& v);
  void SetU32(const std::string& key, uint32_t v);
  void SetI32(const std::string& key, int32_t v);
  void SetF32(const std::string& key, float v);
  void SetBool(const std::string& key, bool v);
  void SetStringArray(const std::string& key, const std::vector<std::string>& v);
  void SetF32Array(const std::string& key, const std::vector<float>& v);
  void SetI32Array(const std::string& key, const std::vector<int32_t>& v);
  void SetU8Array(const std::string& key, const std::string& bytes);
  // `data` holds the tensor's bytes in GGUF order (contiguous; kept by reference until Write).
  void AddTensor(const std::string& name, GgmlType type, std::vector<int64_t> ne, at::Tensor data);
  absl::Status Write(const std::string& path) const;

 private:
  void Key(const std::string& key, GgufType type);  // a key and its value type
  template <typename T>
  void Array(const std::string& key, GgufType type, const std::vector<T>& v);

  std::string meta_;  // serialized key/values
  uint64_t num_kv_ = 0;
  struct Pending {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    at::Tensor data;
  };
  std::vector<Pending> tensors_;
};

struct GgufFile {
  std::string path;
  uint32_t version = 0;
  std::map<std::string, GgufValue> meta;
  std::vector<GgufTensorInfo> tensors;
  std::shared_ptr<void> mapping;  // keeps the mapped file alive

  const GgufTensorInfo* Find(const std::string& name) const;
  // Typed metadata lookups: NOT_FOUND / INVALID_ARGUMENT naming the file and key.
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;  // any integer type
  absl::StatusOr<double> GetFloat(const std::string& key) const;
  // An integer array, or an integer scalar repeated `n` times (llama.cpp's key-or-array rule).
  absl::StatusOr<std::vector<int64_t>> GetIntArray(const std::string& key, size_t n) const;
};

absl::StatusOr<GgufFile> ReadGguf(const std::string& path);

}  // namespace amoeba
