// Exports run as jobs: on a small bounded pool of worker threads (never on a front end's thread),
// each in a fresh staging directory that mkdtemp makes under the configured directory, never from
// anything the client sent. A finished export is read back as a stream of chunks, each file's
// SHA-256 on its last chunk, whatever the transport.
#pragma once
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "file_digest.h"

namespace amoeba {

class ExportWorkers {
 public:
  explicit ExportWorkers(int workers);
  ~ExportWorkers();  // runs what was accepted, then joins
  // What a job hands back: run on the worker after its slot is free (may be empty).
  using Delivery = std::function<void()>;
  // Runs `job` on a free worker, then the delivery it returns once the worker counts as free
  // again: a client that has read the whole result and asks again at once must not be refused.
  // RESOURCE_EXHAUSTED when every worker already has a job.
  absl::Status TrySubmit(std::function<Delivery()> job);

 private:
  void Loop();
  const int workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<Delivery()>> queue_;
  int busy_ = 0;  // accepted and not finished
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

struct ExportChunk {
  std::string path;  // file name inside the export
  uint64_t offset = 0, total_size = 0;
  std::string data;
  bool last_chunk = false;  // of this file
  std::string sha256;       // lower-case hex, on a file's last chunk
};

// A written export in its staging directory, read back in chunks of at most 1 MiB, file by file
// in name order. Removes the staging directory when destroyed. Never throws.
class ExportStream {
 public:
  ExportStream(std::string request_id, std::string staging,
               std::vector<std::filesystem::path> files);
  ~ExportStream();
  ExportStream(const ExportStream&) = delete;
  ExportStream& operator=(const ExportStream&) = delete;

  const std::string& request_id() const { return request_id_; }
  const std::vector<std::filesystem::path>& files() const { return files_; }
  // Fills `out` with the next chunk; false after the last one. INTERNAL when a file cannot be
  // read (the detail goes to the log).
  absl::StatusOr<bool> Next(ExportChunk& out);
  // Test-only: called before each chunk is read; what it throws becomes Next's status.
  void set_fault_hook(std::function<void()> hook) { fault_hook_ = std::move(hook); }

 private:
  absl::StatusOr<bool> ReadNext(ExportChunk& out);
  std::function<void()> fault_hook_;
  std::string request_id_, staging_;
  std::vector<std::filesystem::path> files_;
  size_t file_ = 0;
  std::ifstream in_;
  uint64_t size_ = 0, offset_ = 0;
  Sha256 digest_;
};

// A new, empty directory `<base>/amoeba-export-<pid>-XXXXXX` (mode 0700).
absl::StatusOr<std::string> MakeStagingDir(const std::string& base);

// Removes staging directories under `base` left by server processes that no longer run (a crash
// or kill -9 mid-export); those of live processes are kept. Returns how many were removed.
int RemoveStaleStagingDirs(const std::string& base);

}  // namespace amoeba
