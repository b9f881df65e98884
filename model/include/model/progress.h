// A terminal progress bar for long work: done/total, rate, ETA, and a free-form status (e.g. the
// loss). Redraws in place on a TTY, prints a line every few seconds otherwise (logs, CI).
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace amoeba {

class Progress {
 public:
  Progress(std::string label, int64_t total, int64_t already_done = 0);
  ~Progress();
  void Advance(int64_t n = 1, const std::string& status = "");
  void Finish();

 private:
  void Draw(bool force);
  std::string label_;
  int64_t total_, done_, start_done_, drawn_done_ = -1;
  std::string status_;
  std::chrono::steady_clock::time_point start_, last_draw_;
  bool tty_, finished_ = false;
};

}  // namespace amoeba
