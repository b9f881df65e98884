#include "model/safetensors.h"

#include <limits>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/file_util.h"
#include "model/status_macros.h"

namespace amoeba {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

int64_t DtypeSize(const std::string& d) {
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "I8" || d == "U8" || d == "BOOL") return 1;
  return 0;
}

std::optional<at::ScalarType> DtypeToScalar(const std::string& d) {
  if (d == "F32") return at::kFloat;
  if (d == "F16") return at::kHalf;
  if (d == "BF16") return at::kBFloat16;
  if (d == "F64") return at::kDouble;
  if (d == "I64") return at::kLong;
  if (d == "I32") return at::kInt;
  if (d == "I16") return at::kShort;
  if (d == "I8") return at::kChar;
  if (d == "U8") return at::kByte;
  if (d == "BOOL") return at::kBool;
  return std::nullopt;
}

const char* ScalarToDtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "F32";
    case at::kHalf:
      return "F16";
    case at::kBFloat16:
      return "BF16";
    case at::kDouble:
      return "F64";
    case at::kLong:
      return "I64";
    case at::kInt:
      return "I32";
    case at::kShort:
      return "I16";
    case at::kChar:
      return "I8";
    case at::kByte:
      return "U8";
    case at::kBool:
      return "BOOL";
    default:
      return nullptr;
  }
}

}  // namespace

absl::StatusOr<std::shared_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat(path, ": fstat failed"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": truncated (", size, " bytes, no header)"));
  }
  // MAP_PRIVATE + PROT_WRITE: copy-on-write, so an accidental in-place op cannot corrupt the file.
  void* map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) return absl::InternalError(absl::StrCat(path, ": mmap failed"));

  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = map;
  f->map_size_ = size;
  f->self_ = f;

  uint64_t header_len = 0;
  std::memcpy(&header_len, map, 8);  // little-endian on every platform we target
  if (header_len > size - 8) {
    return absl::DataLossError(absl::StrCat(path, ": header length ", header_len,
                                            " exceeds file size ", size,
                                            " (truncated or corrupt)"));
  }
  f->data_offset_ = 8 + header_len;
  const char* hp = static_cast<const char*>(map) + 8;
  json header = json::parse(hp, hp + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return absl::DataLossError(absl::StrCat(path, ": header is not a JSON object"));
  }
  const uint64_t data_size = size - f->data_offset_;
  for (auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      if (v.is_object()) {
        for (auto& [k, mv] : v.items())
          if (mv.is_string()) f->metadata_[k] = mv.get<std::string>();
      }
      continue;
    }
    auto bad = [&](const std::string& why) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", name, "': ", why));
    };
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") ||
        !v.contains("data_offsets")) {
      return bad("header entry needs dtype, shape and data_offsets");
    }
    TensorInfo ti;
    try {
      ti.dtype = v["dtype"].get<std::string>();
      ti.shape = v["shape"].get<std::vector<int64_t>>();
      auto off = v["data_offsets"].get<std::vector<uint64_t>>();
      if (off.size() != 2) return bad("data_offsets must have two entries");
      ti.begin = off[0];
      ti.end = off[1];
    } catch (const json::exception& e) {
      return bad(std::string("malformed header entry: ") + e.what());
    }
    const int64_t es = DtypeSize(ti.dtype);
    if (es == 0) return bad("unknown dtype " + ti.dtype);
    // Checked as it grows, so a crafted shape cannot overflow the element or byte count.
    int64_t numel = 1;
    for (int64_t d : ti.shape) {
      if (d < 0) return bad("negative dimension");
      if (d != 0 && numel > std::numeric_limits<int64_t>::max() / es / d)
        return bad("shape overflows the element count");
      numel *= d;
    }
    if (ti.end < ti.begin || ti.end > data_size) {
      return bad(absl::StrCat("data_offsets [", ti.begin, ", ", ti.end, ") outside data of ",
                              data_size, " bytes (truncated file?)"));
    }
    if (ti.end - ti.begin != static_cast<uint64_t>(numel * es)) {
      return bad(absl::StrCat("byte size ", ti.end - ti.begin, " does not match shape × dtype (",
                              numel * es, ")"));
    }
    f->tensors_[name] = std::move(ti);
  }
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  for (auto& [k, v] : tensors_) out.push_back(k);
  return out;
}

const TensorInfo* SafetensorsFile::info(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::StatusOr<at::Tensor> SafetensorsFile::Get(const std::string& name) const {
  const TensorInfo* ti = info(name);
  if (!ti) return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", name, "'"));
  auto st = DtypeToScalar(ti->dtype);
  if (!st)
    return absl::UnimplementedError(
        absl::StrCat(path_, ": tensor '", name, "': dtype ", ti->dtype));
  char* p = static_cast<char*>(map_) + data_offset_ + ti->begin;
  const int64_t es = DtypeSize(ti->dtype);
  if (reinterpret_cast<uintptr_t>(p) % es != 0) {
    // Misaligned data (legal in the format): copy it out.
    at::Tensor t = at::empty(ti->shape, at::TensorOptions().dtype(*st));
    std::memcpy(t.data_ptr(), p, ti->end - ti->begin);
    return t;
  }
  // The deleter keeps the mapping alive as long as any tensor views it.
  std::shared_ptr<const SafetensorsFile> keep = self_.lock();
  return at::from_blob(
      p, ti->shape, [keep](void*) mutable { keep.reset(); }, at::TensorOptions().dtype(*st));
}

absl::StatusOr<at::Tensor> SafetensorsFile::GetF32(const std::string& name) const {
  ASSIGN_OR_RETURN(at::Tensor t, Get(name));
  if (t.scalar_type() == at::kFloat) return t;
  if (!at::isFloatingType(t.scalar_type())) {
    return absl::InvalidArgumentError(
        absl::StrCat(path_, ": tensor '", name, "' is not floating point"));
  }
  return t.to(at::kFloat);
}

absl::StatusOr<TensorStore> TensorStore::OpenFile(const std::string& path) {
  TensorStore s;
  ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(path));
  for (auto& n : f->names()) s.where_[n] = 0;
  s.files_.push_back(std::move(f));
  return s;
}

absl::StatusOr<TensorStore> TensorStore::OpenDir(const std::string& dir) {
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) return OpenFile(single.string());
  if (!fs::exists(index)) {
    return absl::NotFoundError(
        absl::StrCat(dir, ": neither model.safetensors nor model.safetensors.index.json"));
  }
  ASSIGN_OR_RETURN(std::string text, ReadFile(index.string()));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    return absl::DataLossError(absl::StrCat(index.string(), ": missing or invalid weight_map"));
  }
  TensorStore s;
  std::map<std::string, size_t> shard_ids;
  for (auto& [name, shard] : j["weight_map"].items()) {
    if (!shard.is_string())
      return absl::DataLossError(absl::StrCat(index.string(), ": bad entry for ", name));
    const std::string sh = shard.get<std::string>();
    if (!shard_ids.count(sh)) {
      ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open((fs::path(dir) / sh).string()));
      shard_ids[sh] = s.files_.size();
      s.files_.push_back(std::move(f));
    }
    const size_t id = shard_ids[sh];
    if (!s.files_[id]->contains(name)) {
      return absl::DataLossError(absl::StrCat(index.string(), ": tensor '", name,
                                              "' listed in shard ", sh, " but not in it"));
    }
    s.where_[name] = id;
  }
  return s;
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  for (auto& [k, v] : where_) out.push_back(k);
  return out;
}

absl::StatusOr<at::Tensor> TensorStore::GetF32(const std::string& name,
                                               const std::vector<int64_t>& expect_shape) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    std::string where = files_.empty() ? "tensor store" : files_[0]->path();
    return absl::NotFoundError(absl::StrCat(where, ": missing tensor '", name, "'"));
  }
  const auto& f = files_[it->second];
  if (!expect_shape.empty()) {
    const TensorInfo* ti = f->info(name);
    if (ti->shape != expect_shape) {
      return absl::InvalidArgumentError(absl::StrCat(f->path(), ": tensor '", name, "' has shape [",
                                                     absl::StrJoin(ti->shape, ","), "], expected [",
                                                     absl::StrJoin(expect_shape, ","), "]"));
    }
  }
  return f->GetF32(name);
}

absl::Status WriteSafetensors(const std::string& path, const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata,
                              at::ScalarType dtype) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    at::Tensor c = t.detach();
    if (at::isFloatingType(c.scalar_type())) c = c.to(dtype);
    c = c.contiguous();
    const char* d = ScalarToDtype(c.scalar_type());
    if (!d)
      return absl::InvalidArgumentError(absl::StrCat("cannot write tensor '", name, "': dtype"));
    const uint64_t bytes = c.numel() * c.element_size();
    header[name] = {
        {"dtype", d}, {"shape", c.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    data.push_back(std::move(c));
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h.push_back(' ');  // keep data 8-byte aligned
  const uint64_t hl = h.size();
  return WriteFileAtomicWith(path, [&](int fd) -> absl::Status {
    RETURN_IF_ERROR(WriteAll(fd, &hl, 8, path));
    RETURN_IF_ERROR(WriteAll(fd, h.data(), h.size(), path));
    for (const auto& c : data)
      RETURN_IF_ERROR(WriteAll(fd, c.data_ptr(), c.numel() * c.element_size(), path));
    return absl::OkStatus();
  });
}

}  // namespace amoeba
