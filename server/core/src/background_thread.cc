#include "background_thread.h"

#include <ATen/Parallel.h>
#include <omp.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace amoeba {

void RunBelowTheDecodeLoop(Yield how) {
  sched_param param{};
  if (how != Yield::kIdleCores || sched_setscheduler(0, SCHED_IDLE, &param) != 0)
    setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
  (void)at::get_num_threads();  // ATen's per-thread set-up first (it would undo the next line)
  omp_set_num_threads(1);       // this thread's team only; at::set_num_threads is global
}

}  // namespace amoeba
