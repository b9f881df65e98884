// Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.
#pragma once
#include <functional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace amoeba {

// Writes `contents` to `path` atomically.
absl::Status WriteFileAtomic(const std::string& path, std::string_view contents);

// Calls `write(fd)` on a temp file next to `path`, then fsyncs and renames it into place.
absl::Status WriteFileAtomicWith(const std::string& path,
                                 const std::function<absl::Status(int fd)>& write);

// Writes all of `data` to `fd`, retrying short writes.
absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& what);

absl::StatusOr<std::string> ReadFile(const std::string& path);

// Replaces directory `dst` by `src` (both on one filesystem) as atomically as POSIX allows:
// dst is first moved aside, src renamed into place, then the old copy removed.
absl::Status ReplaceDirectory(const std::string& src, const std::string& dst);

// True when no process `pid` exists (and it is not this one): what it left behind is stale.
bool ProcessIsGone(long pid);

// Removes the temp files that WriteFileAtomic* left next to `path` ("<path>.tmp.<pid>.<n>") when
// process <pid> was killed mid-write and no longer runs. Returns how many were removed.
int RemoveStaleTempFiles(const std::string& path);

// Fsyncs a directory so a rename inside it is durable.
absl::Status SyncDirectory(const std::string& dir);

// Calls `fn` with each non-blank line of JSONL `text` parsed as a JSON object. A line that is not a
// JSON object, or an error from `fn`, stops the walk with an INVALID_ARGUMENT "path:line: why".
absl::Status ForEachJsonLine(const std::string& path, std::string_view text,
                             const std::function<absl::Status(const nlohmann::json&)>& fn);

}  // namespace amoeba
