#include "model/progress.h"

#include <unistd.h>

#include <cstdio>

namespace amoeba {
using Clock = std::chrono::steady_clock;

Progress::Progress(std::string label, int64_t total, int64_t already_done)
    : label_(std::move(label)),
      total_(total),
      done_(already_done),
      start_done_(already_done),
      start_(Clock::now()),
      last_draw_(Clock::now()),
      tty_(isatty(STDERR_FILENO)) {
  Draw(true);
}

Progress::~Progress() {
  Finish();
}

void Progress::Advance(int64_t n, const std::string& status) {
  done_ += n;
  if (!status.empty()) status_ = status;
  Draw(done_ >= total_);
}

void Progress::Finish() {
  if (finished_) return;
  finished_ = true;
  Draw(true);
  if (tty_) std::fputc('\n', stderr);
}

void Progress::Draw(bool force) {
  const auto now = Clock::now();
  const double since_draw = std::chrono::duration<double>(now - last_draw_).count();
  if (!force && since_draw < (tty_ ? 0.2 : 5.0)) return;
  if (force && drawn_done_ == done_ && done_ > start_done_) return;  // nothing new to show
  drawn_done_ = done_;
  last_draw_ = now;
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double rate = elapsed > 0 ? (done_ - start_done_) / elapsed : 0.0;
  const double eta = rate > 0 ? (total_ - done_) / rate : 0.0;
  const int width = 30;
  const int filled =
      total_ > 0 ? static_cast<int>(width * std::min<double>(1.0, double(done_) / total_)) : 0;
  std::string bar(filled, '#');
  bar.append(width - filled, '.');
  std::fprintf(stderr, "%s%s [%s] %lld/%lld %.2f/s ETA %.0fs %s%s", tty_ ? "\r" : "",
               label_.c_str(), bar.c_str(), static_cast<long long>(done_),
               static_cast<long long>(total_), rate, eta, status_.c_str(), tty_ ? "\033[K" : "\n");
  std::fflush(stderr);
}

}  // namespace amoeba
