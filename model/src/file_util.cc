#include "model/file_util.h"

#include <signal.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace amoeba {
namespace fs = std::filesystem;

namespace {
std::string ErrnoText() {
  return std::strerror(errno);
}

std::string TempNameFor(const std::string& path) {
  std::random_device rd;
  return absl::StrCat(path, ".tmp.", getpid(), ".", rd() % 1000000);
}
}  // namespace

bool ProcessIsGone(long pid) {
  return pid > 0 && pid != getpid() && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

int RemoveStaleTempFiles(const std::string& path) {
  const fs::path target(path);
  const std::string prefix = target.filename().string() + ".tmp.";
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  int removed = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) != 0 || !e.is_regular_file(ec)) continue;
    const std::string rest = name.substr(prefix.size());
    const size_t dot = rest.find('.');
    if (dot == std::string::npos) continue;
    char* end = nullptr;
    const long pid = std::strtol(rest.c_str(), &end, 10);
    if (end != rest.c_str() + dot || !ProcessIsGone(pid)) continue;
    if (fs::remove(e.path(), ec)) ++removed;
  }
  return removed;
}

absl::Status WriteAll(int fd, const void* data, size_t size, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("write to ", what, " failed: ", ErrnoText()));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status SyncDirectory(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return absl::InternalError(absl::StrCat("open directory ", dir, ": ", ErrnoText()));
  ::fsync(fd);
  ::close(fd);
  return absl::OkStatus();
}

absl::Status WriteFileAtomicWith(const std::string& path,
                                 const std::function<absl::Status(int fd)>& write) {
  const std::string tmp = TempNameFor(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", ErrnoText()));
  absl::Status st = write(fd);
  if (st.ok() && ::fsync(fd) != 0) {
    st = absl::InternalError(absl::StrCat("fsync ", tmp, ": ", ErrnoText()));
  }
  ::close(fd);
  if (st.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    st = absl::InternalError(absl::StrCat("rename ", tmp, " -> ", path, ": ", ErrnoText()));
  }
  if (!st.ok()) {
    ::unlink(tmp.c_str());
    return st;
  }
  return SyncDirectory(fs::path(path).parent_path().string());
}

absl::Status WriteFileAtomic(const std::string& path, std::string_view contents) {
  return WriteFileAtomicWith(
      path, [&](int fd) { return WriteAll(fd, contents.data(), contents.size(), path); });
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

absl::Status ForEachJsonLine(const std::string& path, std::string_view text,
                             const std::function<absl::Status(const nlohmann::json&)>& fn) {
  std::istringstream in{std::string(text)};
  std::string line;
  int64_t lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    absl::Status st = j.is_discarded() || !j.is_object()
                          ? absl::InvalidArgumentError("not a JSON object")
                          : fn(j);
    if (!st.ok())
      return absl::Status(st.code(), absl::StrCat(path, ":", lineno, ": ", st.message()));
  }
  return absl::OkStatus();
}

absl::Status ReplaceDirectory(const std::string& src, const std::string& dst) {
  std::error_code ec;
  const std::string old = dst + ".old";
  fs::remove_all(old, ec);
  const bool had_dst = fs::exists(dst);
  if (had_dst) {
    fs::rename(dst, old, ec);
    if (ec) return absl::InternalError(absl::StrCat("move aside ", dst, ": ", ec.message()));
  }
  fs::rename(src, dst, ec);
  if (ec) {
    if (had_dst) fs::rename(old, dst, ec);
    return absl::InternalError(absl::StrCat("rename ", src, " -> ", dst, ": ", ec.message()));
  }
  fs::remove_all(old, ec);
  return SyncDirectory(fs::absolute(dst).parent_path().string());
}

}  // namespace amoeba
