// Threads that do work beside the decode loop (merged-copy builds, exports) yield to it.
#pragma once

namespace amoeba {

enum class Yield {
  // nice 10: a small share of a core the decode loop also wants, so the work still advances under
  // steady load (merged copies: a hot shape decodes ~2x faster once its copy is in).
  kNice,
  // SCHED_IDLE (nice 10 where the system refuses it): only cores nothing else wants (exports: a
  // 100m GGUF export beside a decoding request, 2-core Zen 5, took the request from 7-9 to 22
  // ms/token at nice 0 and 10-20 at nice 10; 9-11 as SCHED_IDLE, the export 1.6 s instead of 1.0).
  kIdleCores,
};

// Lowers the calling thread below the decode loop in the kernel's eyes (threads it starts later,
// e.g. its OpenMP team, inherit that) and gives it an OpenMP team of one: a team of its own would
// put more threads than cores in libgomp's hands, and a decode team whose member loses its core
// waits at every barrier.
void RunBelowTheDecodeLoop(Yield how);

}  // namespace amoeba
