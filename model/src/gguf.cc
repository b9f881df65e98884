#include "model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"

namespace amoeba {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint32_t kVersion = 3;
constexpr uint64_t kAlignment = 32;

template <typename T>
void Put(std::string* out, T v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(v));
}

void PutString(std::string* out, const std::string& s) {
  Put<uint64_t>(out, s.size());
  out->append(s);
}

uint64_t AlignUp(uint64_t n) {
  return (n + kAlignment - 1) / kAlignment * kAlignment;
}

// Bounds-checked reading of the mapped file.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size, const std::string& path)
      : data_(data), size_(size), path_(path) {}
  template <typename T>
  absl::StatusOr<T> Get(const std::string& what) {
    if (size_ - pos_ < sizeof(T)) return Truncated(what);
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  absl::StatusOr<std::string> GetString(const std::string& what) {
    auto n = Get<uint64_t>(what);
    if (!n.ok()) return n.status();
    if (*n > size_ - pos_) return Truncated(what);
    std::string s(reinterpret_cast<const char*>(data_ + pos_), *n);
    pos_ += *n;
    return s;
  }
  uint64_t pos() const { return pos_; }
  absl::Status Truncated(const std::string& what) const {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": truncated at byte ", pos_, " (reading ", what, ")"));
  }

 private:
  const uint8_t* data_;
  uint64_t size_, pos_ = 0;
  const std::string& path_;
};

absl::StatusOr<GgufValue> ReadValue(Cursor& c, GgufType type, const std::string& key, int depth) {
  GgufValue v;
  v.type = type;
  auto scalar = [&](auto tag) -> absl::Status {
    using T = decltype(tag);
    auto x = c.Get<T>(key);
    if (!x.ok()) return x.status();
    if constexpr (std::is_floating_point_v<T>) {
      v.f = *x;
    } else if constexpr (std::is_signed_v<T>) {
      v.i = *x;
    } else {
      v.u = *x;
      v.i = static_cast<int64_t>(*x);
    }
    return absl::OkStatus();
  };
  absl::Status st;
  switch (type) {
    case GgufType::kUint8:
      st = scalar(uint8_t{});
      break;
    case GgufType::kInt8:
      st = scalar(int8_t{});
      break;
    case GgufType::kUint16:
      st = scalar(uint16_t{});
      break;
    case GgufType::kInt16:
      st = scalar(int16_t{});
      break;
    case GgufType::kUint32:
      st = scalar(uint32_t{});
      break;
    case GgufType::kInt32:
      st = scalar(int32_t{});
      break;
    case GgufType::kFloat32:
      st = scalar(float{});
      break;
    case GgufType::kUint64:
      st = scalar(uint64_t{});
      break;
    case GgufType::kInt64:
      st = scalar(int64_t{});
      break;
    case GgufType::kFloat64:
      st = scalar(double{});
      break;
    case GgufType::kBool: {
      auto b = c.Get<uint8_t>(key);
      if (!b.ok()) return b.status();
      if (*b > 1) return absl::InvalidArgumentError(absl::StrCat(key, ": bool value ", *b));
      v.i = *b;
      v.u = *b;
      break;
    }
    case GgufType::kString: {
      auto s = c.GetString(key);
      if (!s.ok()) return s.status();
      v.s = std::move(*s);
      break;
    }
    case GgufType::kArray: {
      if (depth > 0) return absl::InvalidArgumentError(absl::StrCat(key, ": nested array"));
      auto et = c.Get<uint32_t>(key);
      auto n = c.Get<uint64_t>(key);
      if (!et.ok()) return et.status();
      if (!n.ok()) return n.status();
      if (*et > static_cast<uint32_t>(GgufType::kFloat64))
        return absl::InvalidArgumentError(absl::StrCat(key, ": array of unknown type ", *et));
      v.elem_type = static_cast<GgufType>(*et);
      if (*n > (1ull << 26))
        return absl::InvalidArgumentError(absl::StrCat(key, ": ", *n, " array elements"));
      v.array.reserve(*n);
      for (uint64_t k = 0; k < *n; ++k) {
        auto e = ReadValue(c, v.elem_type, key, depth + 1);
        if (!e.ok()) return e.status();
        v.array.push_back(std::move(*e));
      }
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(key, ": unknown value type ", static_cast<uint32_t>(type)));
  }
  if (!st.ok()) return st;
  return v;
}

bool IsInteger(GgufType t) {
  switch (t) {
    case GgufType::kUint8:
    case GgufType::kInt8:
    case GgufType::kUint16:
    case GgufType::kInt16:
    case GgufType::kUint32:
    case GgufType::kInt32:
    case GgufType::kUint64:
    case GgufType::kInt64:
      return true;
    default:
      return false;
  }
}

}  // namespace

const char* GgmlTypeName(GgmlType t) {
  switch (t) {
    case GgmlType::kF32:
      return "F32";
    case GgmlType::kF16:
      return "F16";
    case GgmlType::kQ4_0:
      return "Q4_0";
    case GgmlType::kQ8_0:
      return "Q8_0";
  }
  return "?";
}

int64_t GgmlTypeBytes(GgmlType t, int64_t n) {
  switch (t) {
    case GgmlType::kF32:
      return n * 4;
    case GgmlType::kF16:
      return n * 2;
    case GgmlType::kQ4_0:
      return n / 32 * 18;
    case GgmlType::kQ8_0:
      return n / 32 * 34;
  }
  return 0;
}

void GgufWriter::Key(const std::string& key, GgufType type) {
  PutString(&meta_, key);
  Put<uint32_t>(&meta_, static_cast<uint32_t>(type));
  ++num_kv_;
}

template <typename T>
void GgufWriter::Array(const std::string& key, GgufType type, const std::vector<T>& v) {
  Key(key, GgufType::kArray);
  Put<uint32_t>(&meta_, static_cast<uint32_t>(type));
  Put<uint64_t>(&meta_, v.size());
  for (const T& x : v) {
    if constexpr (std::is_same_v<T, std::string>) {
      PutString(&meta_, x);
    } else {
      Put<T>(&meta_, x);
    }
  }
}

void GgufWriter::SetString(const std::string& key, const std::string& v) {
  Key(key, GgufType::kString);
  PutString(&meta_, v);
}

void GgufWriter::SetU32(const std::string& key, uint32_t v) {
  Key(key, GgufType::kUint32);
  Put<uint32_t>(&meta_, v);
}

void GgufWriter::SetI32(const std::string& key, int32_t v) {
  Key(key, GgufType::kInt32);
  Put<int32_t>(&meta_, v);
}

void GgufWriter::SetF32(const std::string& key, float v) {
  Key(key, GgufType::kFloat32);
  Put<float>(&meta_, v);
}

void GgufWriter::SetBool(const std::string& key, bool v) {
  Key(key, GgufType::kBool);
  Put<uint8_t>(&meta_, v ? 1 : 0);
}

void GgufWriter::SetStringArray(const std::string& key, const std::vector<std::string>& v) {
  Array(key, GgufType::kString, v);
}

void GgufWriter::SetF32Array(const std::string& key, const std::vector<float>& v) {
  Array(key, GgufType::kFloat32, v);
}

void GgufWriter::SetI32Array(const std::string& key, const std::vector<int32_t>& v) {
  Array(key, GgufType::kInt32, v);
}

void GgufWriter::SetU8Array(const std::string& key, const std::string& bytes) {
  Array(key, GgufType::kUint8, std::vector<uint8_t>(bytes.begin(), bytes.end()));
}

void GgufWriter::AddTensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                           at::Tensor data) {
  tensors_.push_back({name, type, std::move(ne), data.contiguous()});
}

absl::Status GgufWriter::Write(const std::string& path) const {
  std::string head;
  Put<uint32_t>(&head, kMagic);
  Put<uint32_t>(&head, kVersion);
  Put<uint64_t>(&head, tensors_.size());
  Put<uint64_t>(&head, num_kv_);
  head += meta_;
  uint64_t offset = 0;
  for (const Pending& t : tensors_) {
    int64_t n = 1;
    for (int64_t d : t.ne) n *= d;
    const int64_t bytes = GgmlTypeBytes(t.type, n);
    if (bytes != static_cast<int64_t>(t.data.nbytes()))
      return absl::InternalError(absl::StrCat("GGUF tensor ", t.name, ": ", t.data.nbytes(),
                                              " bytes for ", n, " ", GgmlTypeName(t.type),
                                              " elements (want ", bytes, ")"));
    PutString(&head, t.name);
    Put<uint32_t>(&head, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) Put<uint64_t>(&head, static_cast<uint64_t>(d));
    Put<uint32_t>(&head, static_cast<uint32_t>(t.type));
    Put<uint64_t>(&head, offset);
    offset = AlignUp(offset + static_cast<uint64_t>(bytes));
  }
  head.resize(AlignUp(head.size()), '\0');
  return WriteFileAtomicWith(path, [&](int fd) -> absl::Status {
    absl::Status st = WriteAll(fd, head.data(), head.size(), path);
    if (!st.ok()) return st;
    static const char kZeros[kAlignment] = {};
    for (const Pending& t : tensors_) {
      const size_t bytes = t.data.nbytes();
      st = WriteAll(fd, t.data.data_ptr(), bytes, path);
      if (!st.ok()) return st;
      const size_t pad = AlignUp(bytes) - bytes;
      if (pad) st = WriteAll(fd, kZeros, pad, path);
      if (!st.ok()) return st;
    }
    return absl::OkStatus();
  });
}

const GgufTensorInfo* GgufFile::Find(const std::string& name) const {
  for (const GgufTensorInfo& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  auto it = meta.find(key);
  if (it == meta.end()) return absl::NotFoundError(absl::StrCat(path, ": no key ", key));
  if (it->second.type != GgufType::kString)
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", key, " is not a string"));
  return it->second.s;
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  auto it = meta.find(key);
  if (it == meta.end()) return absl::NotFoundError(absl::StrCat(path, ": no key ", key));
  if (!IsInteger(it->second.type))
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", key, " is not an integer"));
  return it->second.i;
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  auto it = meta.find(key);
  if (it == meta.end()) return absl::NotFoundError(absl::StrCat(path, ": no key ", key));
  if (it->second.type != GgufType::kFloat32 && it->second.type != GgufType::kFloat64)
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", key, " is not a float"));
  return it->second.f;
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(const std::string& key, size_t n) const {
  auto it = meta.find(key);
  if (it == meta.end()) return absl::NotFoundError(absl::StrCat(path, ": no key ", key));
  const GgufValue& v = it->second;
  if (IsInteger(v.type)) return std::vector<int64_t>(n, v.i);
  if (v.type != GgufType::kArray || !IsInteger(v.elem_type) || v.array.size() != n)
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", key, " must be an integer or ", n, " integers"));
  std::vector<int64_t> out;
  for (const GgufValue& e : v.array) out.push_back(e.i);
  return out;
}

absl::StatusOr<GgufFile> ReadGguf(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat(path, ": ", std::strerror(errno)));
  struct stat sb;
  if (fstat(fd, &sb) != 0 || sb.st_size < 24) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a GGUF file (too short)"));
  }
  const uint64_t size = static_cast<uint64_t>(sb.st_size);
  void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (p == MAP_FAILED) return absl::InternalError(absl::StrCat(path, ": mmap failed"));
  GgufFile f;
  f.path = path;
  f.mapping = std::shared_ptr<void>(p, [size](void* q) { munmap(q, size); });
  const auto* data = static_cast<const uint8_t*>(p);
  Cursor c(data, size, f.path);
  auto magic = c.Get<uint32_t>("magic");
  if (!magic.ok() || *magic != kMagic)
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a GGUF file (bad magic)"));
  auto version = c.Get<uint32_t>("version");
  if (!version.ok()) return version.status();
  if (*version != 2 && *version != 3)
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": GGUF version ", *version, " (2 or 3 supported)"));
  f.version = *version;
  auto n_tensors = c.Get<uint64_t>("tensor count");
  auto n_kv = c.Get<uint64_t>("metadata count");
  if (!n_tensors.ok()) return n_tensors.status();
  if (!n_kv.ok()) return n_kv.status();
  if (*n_tensors > (1u << 20) || *n_kv > (1u << 20))
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": implausible counts (", *n_tensors, " tensors, ", *n_kv, " keys)"));
  for (uint64_t i = 0; i < *n_kv; ++i) {
    auto key = c.GetString(absl::StrCat("key #", i));
    if (!key.ok()) return key.status();
    auto type = c.Get<uint32_t>(*key);
    if (!type.ok()) return type.status();
    auto v = ReadValue(c, static_cast<GgufType>(*type), *key, 0);
    if (!v.ok()) return absl::InvalidArgumentError(absl::StrCat(path, ": ", v.status().message()));
    if (!f.meta.emplace(*key, std::move(*v)).second)
      return absl::InvalidArgumentError(absl::StrCat(path, ": duplicate key ", *key));
  }
  uint64_t alignment = kAlignment;
  if (auto a = f.GetInt("general.alignment"); a.ok()) {
    if (*a <= 0 || (*a & (*a - 1)) != 0)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": general.alignment ", *a, " is not a power of two"));
    alignment = static_cast<uint64_t>(*a);
  }
  for (uint64_t i = 0; i < *n_tensors; ++i) {
    GgufTensorInfo t;
    auto name = c.GetString(absl::StrCat("tensor #", i));
    if (!name.ok()) return name.status();
    t.name = std::move(*name);
    auto dims = c.Get<uint32_t>(t.name);
    if (!dims.ok()) return dims.status();
    if (*dims < 1 || *dims > 4)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", t.name, " has ", *dims, " dimensions"));
    int64_t n = 1;
    for (uint32_t d = 0; d < *dims; ++d) {
      auto ne = c.Get<uint64_t>(t.name);
      if (!ne.ok()) return ne.status();
      if (*ne == 0 || *ne > (1ull << 40) || n > (1ll << 40) / static_cast<int64_t>(*ne))
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor ", t.name, " dimension ", d, " is ", *ne));
      t.ne.push_back(static_cast<int64_t>(*ne));
      n *= static_cast<int64_t>(*ne);
    }
    auto type = c.Get<uint32_t>(t.name);
    auto offset = c.Get<uint64_t>(t.name);
    if (!type.ok()) return type.status();
    if (!offset.ok()) return offset.status();
    const uint32_t ty = *type;
    if (ty != 0 && ty != 1 && ty != 2 && ty != 8)
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", t.name, " has ggml type ",
                                                     ty, " (F32, F16, Q8_0 and Q4_0 are read)"));
    t.type = static_cast<GgmlType>(ty);
    if ((t.type == GgmlType::kQ4_0 || t.type == GgmlType::kQ8_0) && t.ne[0] % 32 != 0)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", t.name, " row of ", t.ne[0], " is not a multiple of 32"));
    t.offset = *offset;
    t.bytes = GgmlTypeBytes(t.type, n);
    if (t.offset % alignment != 0)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", t.name, " offset ", t.offset, " is not aligned"));
    f.tensors.push_back(std::move(t));
  }
  const uint64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
  for (GgufTensorInfo& t : f.tensors) {
    if (data_start > size || t.offset > size - data_start ||
        static_cast<uint64_t>(t.bytes) > size - data_start - t.offset)
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": tensor ", t.name, " lies past the end of the file"));
    t.data = data + data_start + t.offset;
  }
  return f;
}

}  // namespace amoeba
