#include "server/export_job.h"

#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "background_thread.h"
#include "model/errors.h"
#include "model/file_util.h"

namespace amoeba {
namespace fs = std::filesystem;

namespace {
constexpr char kPrefix[] = "amoeba-export-";
}

ExportWorkers::ExportWorkers(int workers) : workers_(std::max(1, workers)) {
  for (int i = 0; i < workers_; ++i)
    threads_.emplace_back([this] {
      RunBelowTheDecodeLoop(Yield::kIdleCores);  // a bulk job: serving comes first
      Loop();
    });
}

ExportWorkers::~ExportWorkers() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

absl::Status ExportWorkers::TrySubmit(std::function<Delivery()> job) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stop_) return absl::UnavailableError("server is shutting down");
    if (busy_ >= workers_) {
      return absl::ResourceExhaustedError(
          absl::StrCat("every export worker is busy (", workers_, "); try again later"));
    }
    ++busy_;
    queue_.push_back(std::move(job));
  }
  cv_.notify_one();
  return absl::OkStatus();
}

void ExportWorkers::Loop() {
  for (;;) {
    std::function<Delivery()> job;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    Delivery deliver = job();  // jobs catch their own errors
    {
      std::lock_guard<std::mutex> l(mu_);
      --busy_;
    }
    // After the slot is free: delivering first let a fast client finish reading and ask for the
    // next export while this worker still counted as busy (RESOURCE_EXHAUSTED under ASan).
    if (deliver) deliver();
  }
}

ExportStream::ExportStream(std::string request_id, std::string staging, std::vector<fs::path> files)
    : request_id_(std::move(request_id)), staging_(std::move(staging)), files_(std::move(files)) {}

ExportStream::~ExportStream() {
  in_.close();
  std::error_code ec;
  if (!staging_.empty()) fs::remove_all(staging_, ec);
  if (ec)
    spdlog::warn("[{}] export: cannot remove {}: {}", request_id_, staging_,
                 std::string(ec.message()));
}

absl::StatusOr<bool> ExportStream::Next(ExportChunk& out) {
  try {
    if (fault_hook_) fault_hook_();
    return ReadNext(out);
  } catch (...) {
    const absl::Status st = StatusFromException(std::current_exception(), "export stream");
    spdlog::error("[{}] export: {}", request_id_, std::string(st.message()));
    return st.code() == absl::StatusCode::kInternal
               ? absl::InternalError("export failed while streaming")
               : st;
  }
}

absl::StatusOr<bool> ExportStream::ReadNext(ExportChunk& out) {
  constexpr uint64_t kChunk = 1 << 20;
  if (file_ >= files_.size()) return false;
  std::error_code ec;
  if (!in_.is_open()) {
    in_.open(files_[file_], std::ios::binary);
    size_ = fs::file_size(files_[file_], ec);
    offset_ = 0;
  }
  const uint64_t n = ec ? 0 : std::min(kChunk, size_ - offset_);
  out.data.resize(n);
  if (ec || !in_.read(out.data.data(), static_cast<std::streamsize>(n))) {
    spdlog::error("[{}] export: reading {} failed", request_id_, files_[file_].string());
    return absl::InternalError("export failed while streaming");
  }
  digest_.Update(out.data);
  out.path = files_[file_].filename().string();
  out.offset = offset_;
  out.total_size = size_;
  offset_ += n;
  out.last_chunk = offset_ >= size_;
  out.sha256.clear();
  if (out.last_chunk) {
    out.sha256 = digest_.HexDigest();
    in_.close();
    ++file_;
  }
  return true;
}

absl::StatusOr<std::string> MakeStagingDir(const std::string& base) {
  std::string templ =
      (fs::path(base) / absl::StrCat(kPrefix, static_cast<int64_t>(getpid()), "-XXXXXX")).string();
  if (::mkdtemp(templ.data()) == nullptr) {
    return absl::InternalError(
        absl::StrCat("cannot create an export staging directory: ", std::strerror(errno)));
  }
  return templ;
}

int RemoveStaleStagingDirs(const std::string& base) {
  int removed = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(base, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(kPrefix, 0) != 0 || !e.is_directory(ec) || e.is_symlink(ec)) continue;
    const std::string rest = name.substr(sizeof(kPrefix) - 1);
    int pid = 0;
    if (!absl::SimpleAtoi(rest.substr(0, rest.find('-')), &pid) || !ProcessIsGone(pid)) continue;
    fs::remove_all(e.path(), ec);
    if (!ec) ++removed;
  }
  if (removed > 0)
    spdlog::info("export: removed {} stale staging directories in {}", removed, base);
  return removed;
}

}  // namespace amoeba
