#include "model/errors.h"

#include <c10/util/Exception.h>

#include <new>
#include <string>

#include "absl/strings/str_cat.h"

namespace amoeba {
namespace {

// libtorch's CPU allocator reports failure as a c10::Error ("DefaultCPUAllocator: not enough
// memory: you tried to allocate N bytes" / "can't allocate memory"), not as std::bad_alloc.
bool IsAllocationFailure(const std::string& m) {
  return m.find("DefaultCPUAllocator") != std::string::npos ||
         m.find("not enough memory") != std::string::npos ||
         m.find("can't allocate memory") != std::string::npos;
}

}  // namespace

absl::Status StatusFromException(std::exception_ptr e, std::string_view what,
                                 absl::StatusCode code) {
  try {
    std::rethrow_exception(e);
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError("out of memory");
  } catch (const c10::Error& err) {
    const std::string m = err.what_without_backtrace();
    if (IsAllocationFailure(m)) return absl::ResourceExhaustedError("out of memory");
    return absl::Status(code, absl::StrCat(std::string(what), ": ", m.substr(0, 200)));
  } catch (const std::exception& err) {
    return absl::Status(
        code, absl::StrCat(std::string(what), ": ", std::string(err.what()).substr(0, 200)));
  } catch (...) {
    return absl::Status(code, std::string(what));
  }
}

}  // namespace amoeba
