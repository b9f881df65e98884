#include "server/export_job.h"

#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "model/file_util.h"

namespace amoeba {
namespace fs = std::filesystem;

namespace {
constexpr char kPrefix[] = "amoeba-export-";
}

ExportWorkers::ExportWorkers(int workers) : workers_(std::max(1, workers)) {
  for (int i = 0; i < workers_; ++i) threads_.emplace_back([this] { Loop(); });
}

ExportWorkers::~ExportWorkers() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

absl::Status ExportWorkers::TrySubmit(std::function<void()> job) {
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
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();  // jobs catch their own errors
    std::lock_guard<std::mutex> l(mu_);
    --busy_;
  }
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
