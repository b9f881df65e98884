// SentencePiece behind a dlopen'ed module (see sentencepiece_module.cc for why); plain C++ types.
#pragma once
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace amoeba::sp {

struct ProcessorHandle;

class Processor {
 public:
  Processor();
  ~Processor();
  bool Load(const std::string& path, std::string* error);
  std::vector<int> Encode(std::string_view text) const;
  int size() const;
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  bool IsByte(int id) const;
  std::string IdToPiece(int id) const;

 private:
  std::unique_ptr<ProcessorHandle> handle_;
};

}  // namespace amoeba::sp
