// Process-wide runtime set-up: thread count and a check that libtorch uses an optimised BLAS.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace amoeba {

// Routes spdlog to stderr (stdout is for program output) with one line per event.
void InitLogging();

// Compute threads for "all cores": the CPUs this process may run on (its affinity mask, as
// `nproc` counts them, not the machine's online CPUs: `taskset`, a container's cpuset), and no
// more than a cgroup CPU quota allows (`docker --cpus`, a Kubernetes CPU limit), rounded up.
int DefaultThreads();
// Whole CPUs a cgroup CPU quota allows, rounded up; 0 when there is no quota. v2: a cpu.max line
// ("max 100000": none; "150000 100000": 2); v1: cpu.cfs_quota_us and cpu.cfs_period_us (-1: none).
int CpusOfCgroupV2Max(const std::string& cpu_max);
int CpusOfCfsQuota(int64_t quota_us, int64_t period_us);

// Sets libtorch's intra-op threads (0 = DefaultThreads()), flushes denormals to zero in every
// compute thread (FlushDenormalsToZero) and logs the BLAS in use, warning loudly when it is the
// reference implementation (~40x slower). Call once at program start, before other threads are
// made.
void InitRuntime(int threads);

// FTZ/DAZ on the calling thread, on OpenMP's pool of `threads`, and on threads made later by the
// calling thread. Denormal floats cost a microcode assist per operation on Intel cores.
void FlushDenormalsToZero(int threads);
// Whether the calling thread flushes denormals (FTZ and DAZ set).
bool FlushesDenormals();

// `bytes` (rounded up to 2 MB) aligned to 2 MB and advised onto transparent huge pages (a hint:
// 4 KB pages if the kernel says no), freed with the last owner; null when out of memory. For
// buffers streamed end to end (decode weights), where 4 KB pages cost page walks.
std::shared_ptr<void> AllocateHugePages(size_t bytes);
// `bytes` aligned to 2 MB with only its whole 2 MB ranges advised onto huge pages: the rest (less
// than 2 MB at the end) stays on 4 KB pages, so no page reaches past `bytes`. For buffers that
// rounding up to 2 MB would grow by more than they gain (a KV slot of a few MB).
std::shared_ptr<void> AllocateMostlyHugePages(size_t bytes);

// GB/s reading a buffer much larger than the last-level cache with all threads (the roofline's
// denominator for decode).
double MeasureReadBandwidthGBs(double buffer_mib = 512, int repeats = 5);

// The same probe on a buffer kept between reads: benches pair each measured step with a read
// right after it, so a roofline is taken at the moment the step ran.
class BandwidthProbe {
 public:
  explicit BandwidthProbe(double buffer_mib = 256);
  // Best GB/s over `repeats` passes (0 when the buffer could not be allocated).
  double ReadGBs(int repeats = 1);

 private:
  int64_t n_ = 0;  // floats
  std::shared_ptr<void> mem_;
};
// GFLOP/s of an n×n fp32 GEMM (the roofline's denominator for prefill).
double MeasureGemmGflops(int64_t n = 512, int repeats = 3);

// The BLAS library mapped into this process ("openblas-openmp", "reference", ...).
std::string DescribeBlas();

// "AMD EPYC (avx2, 2 threads)": the CPU's model name and the widest kernel ISA in use, for
// benchmark reports (figures mean little without the machine next to them).
std::string DescribeCpu();

}  // namespace amoeba
