#include "tar_stream.h"

#include <cstdio>
#include <cstring>

namespace amoeba {
namespace {

void Octal(char* field, size_t width, uint64_t v) {
  // width-1 digits and a NUL.
  std::snprintf(field, width, "%0*llo", static_cast<int>(width - 1),
                static_cast<unsigned long long>(v));
}

}  // namespace

std::string TarHeader(const std::string& name, uint64_t size, int64_t mtime) {
  std::string h(512, '\0');
  char* p = h.data();
  std::memcpy(p, name.data(), std::min<size_t>(name.size(), 100));
  Octal(p + 100, 8, 0644);
  Octal(p + 108, 8, 0);
  Octal(p + 116, 8, 0);
  if (size < (1ull << 33)) {
    Octal(p + 124, 12, size);
  } else {  // base-256: high bit set, big-endian
    unsigned char* f = reinterpret_cast<unsigned char*>(p + 124);
    f[0] = 0x80;
    for (int i = 11; i >= 1; --i, size >>= 8) f[i] = static_cast<unsigned char>(size & 0xff);
  }
  Octal(p + 136, 12, static_cast<uint64_t>(mtime));
  p[156] = '0';
  std::memcpy(p + 257, "ustar", 6);
  std::memcpy(p + 263, "00", 2);
  std::memset(p + 148, ' ', 8);
  unsigned sum = 0;
  for (unsigned char c : h) sum += c;
  std::snprintf(p + 148, 8, "%06o", sum);  // six digits, NUL, and the space left in place
  return h;
}

std::string TarPadding(uint64_t size) {
  return std::string((512 - size % 512) % 512, '\0');
}

std::string TarEnd() {
  return std::string(1024, '\0');
}

}  // namespace amoeba
