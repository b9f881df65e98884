// Built as a separate shared module and loaded with dlopen(RTLD_LOCAL | RTLD_DEEPBIND):
// Debian's libsentencepiece exports its own bundled protobuf, which would otherwise interpose on
// the libprotobuf that libtorch loads and crash at start-up. Plain C ABI across the boundary.
#include <sentencepiece_processor.h>

#include <cstring>
#include <string>

namespace {
void CopyError(const std::string& s, char* err, size_t cap) {
  if (!err || cap == 0) return;
  std::strncpy(err, s.c_str(), cap - 1);
  err[cap - 1] = '\0';
}
}  // namespace

extern "C" {

void* amoeba_sp_new() {
  return new sentencepiece::SentencePieceProcessor();
}
void amoeba_sp_free(void* p) {
  delete static_cast<sentencepiece::SentencePieceProcessor*>(p);
}

int amoeba_sp_load(void* p, const char* path, char* err, size_t cap) {
  auto st = static_cast<sentencepiece::SentencePieceProcessor*>(p)->Load(path);
  if (!st.ok()) CopyError(st.ToString(), err, cap);
  return st.ok() ? 1 : 0;
}

// Returns the number of ids; writes at most `cap` of them.
size_t amoeba_sp_encode(void* p, const char* text, size_t len, int* out, size_t cap) {
  std::vector<int> ids;
  static_cast<sentencepiece::SentencePieceProcessor*>(p)
      ->Encode(std::string(text, len), &ids)
      .IgnoreError();
  for (size_t i = 0; i < ids.size() && i < cap; ++i) out[i] = ids[i];
  return ids.size();
}

int amoeba_sp_size(void* p) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(p)->GetPieceSize();
}
int amoeba_sp_is_control(void* p, int id) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(p)->IsControl(id);
}
int amoeba_sp_is_unknown(void* p, int id) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(p)->IsUnknown(id);
}
int amoeba_sp_is_byte(void* p, int id) {
  return static_cast<sentencepiece::SentencePieceProcessor*>(p)->IsByte(id);
}

// Returns the piece length; writes at most `cap` bytes.
size_t amoeba_sp_id_to_piece(void* p, int id, char* buf, size_t cap) {
  const std::string s = static_cast<sentencepiece::SentencePieceProcessor*>(p)->IdToPiece(id);
  std::memcpy(buf, s.data(), std::min(cap, s.size()));
  return s.size();
}

}  // extern "C"
