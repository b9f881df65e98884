// The one mapping from an exception to a status, used at every boundary that catches one (the
// scheduler's worker and builder threads, each front end's handlers, export jobs, training).
// Where exceptions come from: libtorch (c10::Error from TORCH_CHECK, allocation failures),
// std::bad_alloc, and the standard library. Code that returns absl::Status never throws on
// purpose; a status is never turned into an exception and back.
#pragma once
#include <exception>
#include <string_view>

#include "absl/status/status.h"

namespace amoeba {

// RESOURCE_EXHAUSTED "out of memory" for an allocation failure (std::bad_alloc, libtorch's
// allocator errors); `code` (INTERNAL unless the boundary knows better, e.g. UNAVAILABLE for a
// failed network rendezvous) with "<what>: <message>" for anything else, the message cut to 200
// bytes. `what` names the work that failed ("engine", "export", ...).
absl::Status StatusFromException(std::exception_ptr e, std::string_view what = "internal error",
                                 absl::StatusCode code = absl::StatusCode::kInternal);

}  // namespace amoeba
