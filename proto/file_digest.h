// SHA-256 of streamed files (OpenSSL): an export sends each file's digest on its last chunk and
// the client checks what it wrote against it. Shared by both ends of the protocol.
#pragma once
#include <memory>
#include <string>
#include <string_view>

namespace amoeba {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void Update(std::string_view data);
  // Lower-case hex of the digest; the hasher starts over afterwards.
  std::string HexDigest();

 private:
  struct Ctx;
  std::unique_ptr<Ctx> ctx_;
};

}  // namespace amoeba
