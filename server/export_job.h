// Exports run as jobs: on a small bounded pool of worker threads (never on a gRPC callback
// thread), each in a fresh staging directory that mkdtemp makes under the configured directory,
// never from anything the client sent.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"

namespace amoeba {

class ExportWorkers {
 public:
  explicit ExportWorkers(int workers);
  ~ExportWorkers();  // runs what was accepted, then joins
  // Runs `job` on a free worker; RESOURCE_EXHAUSTED when every worker already has one.
  absl::Status TrySubmit(std::function<void()> job);

 private:
  void Loop();
  const int workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  int busy_ = 0;  // accepted and not finished
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

// A new, empty directory `<base>/amoeba-export-<pid>-XXXXXX` (mode 0700).
absl::StatusOr<std::string> MakeStagingDir(const std::string& base);

// Removes staging directories under `base` left by server processes that no longer run (a crash
// or kill -9 mid-export); those of live processes are kept. Returns how many were removed.
int RemoveStaleStagingDirs(const std::string& base);

}  // namespace amoeba
