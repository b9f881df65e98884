#include "sentencepiece_bridge.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>

namespace amoeba::sp {
namespace {

struct Api {
  void* (*make)() = nullptr;
  void (*free)(void*) = nullptr;
  int (*load)(void*, const char*, char*, size_t) = nullptr;
  size_t (*encode)(void*, const char*, size_t, int*, size_t) = nullptr;
  int (*size)(void*) = nullptr;
  int (*is_control)(void*, int) = nullptr;
  int (*is_unknown)(void*, int) = nullptr;
  int (*is_byte)(void*, int) = nullptr;
  size_t (*id_to_piece)(void*, int, char*, size_t) = nullptr;
  std::string error;
};

// Candidates: $AMOEBA_SP_MODULE, next to the executable, the build-time path.
const Api& GetApi() {
  static Api api;
  static std::once_flag once;
  std::call_once(once, [] {
#if defined(__SANITIZE_ADDRESS__)
    // The sanitizer runtime refuses RTLD_DEEPBIND, and without it Debian's libsentencepiece
    // clashes with libtorch's protobuf: sanitizer builds have no SentencePiece tokenizer.
    api.error = "SentencePiece is not available in sanitizer builds (RTLD_DEEPBIND)";
    return;
#endif
    std::vector<std::string> paths;
    if (const char* env = std::getenv("AMOEBA_SP_MODULE")) paths.push_back(env);
    std::error_code ec;
    auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) {
      paths.push_back((exe.parent_path() / "libamoeba_sentencepiece.so").string());
      paths.push_back((exe.parent_path() / "../lib/libamoeba_sentencepiece.so").string());
    }
    paths.push_back(AMOEBA_SP_MODULE_PATH);
    void* h = nullptr;
    for (const auto& p : paths) {
      if (!std::filesystem::exists(p, ec)) continue;
      h = dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (h) break;
      api.error = dlerror();
    }
    if (!h) {
      if (api.error.empty())
        api.error = "libamoeba_sentencepiece.so not found (set AMOEBA_SP_MODULE)";
      return;
    }
    auto sym = [&](const char* name) { return dlsym(h, name); };
    api.make = reinterpret_cast<void* (*)()>(sym("amoeba_sp_new"));
    api.free = reinterpret_cast<void (*)(void*)>(sym("amoeba_sp_free"));
    api.load = reinterpret_cast<int (*)(void*, const char*, char*, size_t)>(sym("amoeba_sp_load"));
    api.encode = reinterpret_cast<size_t (*)(void*, const char*, size_t, int*, size_t)>(
        sym("amoeba_sp_encode"));
    api.size = reinterpret_cast<int (*)(void*)>(sym("amoeba_sp_size"));
    api.is_control = reinterpret_cast<int (*)(void*, int)>(sym("amoeba_sp_is_control"));
    api.is_unknown = reinterpret_cast<int (*)(void*, int)>(sym("amoeba_sp_is_unknown"));
    api.is_byte = reinterpret_cast<int (*)(void*, int)>(sym("amoeba_sp_is_byte"));
    api.id_to_piece =
        reinterpret_cast<size_t (*)(void*, int, char*, size_t)>(sym("amoeba_sp_id_to_piece"));
    if (!api.make || !api.encode) api.error = "libamoeba_sentencepiece.so: missing symbols";
  });
  return api;
}

bool Available(std::string* error) {
  const Api& a = GetApi();
  if (!a.make) {
    *error = a.error;
    return false;
  }
  return true;
}

}  // namespace

struct ProcessorHandle {
  void* p = nullptr;
};

Processor::Processor() = default;
Processor::~Processor() {
  if (handle_ && handle_->p) GetApi().free(handle_->p);
}

bool Processor::Load(const std::string& path, std::string* error) {
  if (!Available(error)) return false;
  const Api& a = GetApi();
  handle_ = std::make_unique<ProcessorHandle>();
  handle_->p = a.make();
  char err[1024] = {0};
  if (!a.load(handle_->p, path.c_str(), err, sizeof(err))) {
    *error = err;
    return false;
  }
  return true;
}

std::vector<int> Processor::Encode(std::string_view text) const {
  std::vector<int> ids(text.size() + 8);
  size_t n = GetApi().encode(handle_->p, text.data(), text.size(), ids.data(), ids.size());
  if (n > ids.size()) {
    ids.resize(n);
    GetApi().encode(handle_->p, text.data(), text.size(), ids.data(), ids.size());
  }
  ids.resize(n);
  return ids;
}

int Processor::size() const {
  return GetApi().size(handle_->p);
}
bool Processor::IsControl(int id) const {
  return GetApi().is_control(handle_->p, id);
}
bool Processor::IsUnknown(int id) const {
  return GetApi().is_unknown(handle_->p, id);
}
bool Processor::IsByte(int id) const {
  return GetApi().is_byte(handle_->p, id);
}

std::string Processor::IdToPiece(int id) const {
  std::string s(64, '\0');
  size_t n = GetApi().id_to_piece(handle_->p, id, s.data(), s.size());
  if (n > s.size()) {
    s.resize(n);
    GetApi().id_to_piece(handle_->p, id, s.data(), s.size());
  }
  s.resize(n);
  return s;
}

}  // namespace amoeba::sp
