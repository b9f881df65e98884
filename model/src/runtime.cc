#include "model/runtime.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sched.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "model/file_util.h"
#include "model/kernels.h"
#include "model/thread_pinning.h"

namespace amoeba {

namespace {

constexpr unsigned kMxcsrFlushDenormals = 0x8040;  // FTZ (bit 15) | DAZ (bit 6)

__attribute__((target("avx2"))) float SumAvx2(const float* p, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  float out[8];
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  float s = 0;
  for (float v : out) s += v;
  for (; i < n; ++i) s += p[i];
  return s;
}

// FTZ and DAZ: denormal results are flushed to zero and denormal inputs read as zero. A model in
// training makes ever more tiny values (peaked attention weights, small gradients), and on Intel
// cores each denormal operand or result costs a microcode assist: the quality preset's
// pretraining ran 2.4x slower by its 600th step without this.
void SetFlushDenormalsOnThisThread() {
  _mm_setcsr(_mm_getcsr() | kMxcsrFlushDenormals);
}

}  // namespace

void FlushDenormalsToZero(int threads) {
  // Threads created from here on inherit the setting from this one (the floating-point
  // environment is copied by pthread_create); OpenMP's pool may exist already, so its threads
  // set it too.
  SetFlushDenormalsOnThisThread();
#pragma omp parallel num_threads(std::max(threads, 1))
  SetFlushDenormalsOnThisThread();
}

bool FlushesDenormals() {
  return (_mm_getcsr() & kMxcsrFlushDenormals) == kMxcsrFlushDenormals;
}

std::shared_ptr<void> AllocateHugePages(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t reserved = (std::max<size_t>(bytes, 1) + kHuge - 1) / kHuge * kHuge;
  void* raw = std::aligned_alloc(kHuge, reserved);
  if (!raw) return nullptr;
  madvise(raw, reserved, MADV_HUGEPAGE);
  return std::shared_ptr<void>(raw, std::free);
}

std::shared_ptr<void> AllocateMostlyHugePages(size_t bytes) {
  constexpr size_t kHuge = size_t{2} << 20;
  void* raw = std::aligned_alloc(kHuge, (std::max<size_t>(bytes, 1) + kHuge - 1) / kHuge * kHuge);
  if (!raw) return nullptr;
  // The advice splits the mapping: a 2 MB range gets a huge page only if all of it is advised.
  if (const size_t whole = bytes / kHuge * kHuge; whole > 0) madvise(raw, whole, MADV_HUGEPAGE);
  return std::shared_ptr<void>(raw, std::free);
}

BandwidthProbe::BandwidthProbe(double buffer_mib)
    : n_(static_cast<int64_t>(buffer_mib * 1024 * 1024 / sizeof(float))) {
  // On 2 MB pages, as the engine's packed weights are (4 KB pages read measurably slower: page
  // walks), so the roofline is what the memory can do, not what a 4 KB-page stream gets.
  mem_ = AllocateHugePages(n_ * sizeof(float));
  if (mem_) std::fill_n(static_cast<float*>(mem_.get()), n_, 1.0f);
}

double BandwidthProbe::ReadGBs(int repeats) {
  if (!mem_) return 0;
  const float* p = static_cast<const float*>(mem_.get());
  const int64_t n = n_;
  double best = 0;
  volatile float sink = 0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<float> partial(at::get_num_threads() * 16, 0.f);
    at::parallel_for(0, n, n / at::get_num_threads() + 1, [&](int64_t b, int64_t e) {
      partial[at::get_thread_num() * 16] += SumAvx2(p + b, e - b);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    for (float v : partial) sink = sink + v;
    best = std::max(best, n * sizeof(float) / s / 1e9);
  }
  return best;
}

double MeasureReadBandwidthGBs(double buffer_mib, int repeats) {
  return BandwidthProbe(buffer_mib).ReadGBs(repeats);
}

double MeasureGemmGflops(int64_t n, int repeats) {
  at::Tensor a = at::randn({n, n}), b = at::randn({n, n}), c = at::empty({n, n});
  at::mm_out(c, a, b);
  double best = 0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    at::mm_out(c, a, b);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * n * n * n / s / 1e9);
  }
  return best;
}

std::string DescribeCpu() {
  std::ifstream in("/proc/cpuinfo");
  std::string line, name = "unknown CPU";
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos && colon + 2 <= line.size()) name = line.substr(colon + 2);
      break;
    }
  }
  return name + " (" + KernelIsaName(ActiveKernelIsa()) + ", " +
         std::to_string(at::get_num_threads()) + " threads)";
}

std::string DescribeBlas() {
  // Force BLAS to be exercised so lazily-resolved libraries are mapped.
  at::mm(at::ones({2, 2}), at::ones({2, 2}));
  std::ifstream maps("/proc/self/maps");
  std::string line, found;
  while (std::getline(maps, line)) {
    if (line.find("openblas") != std::string::npos) {
      return line.find("openmp") != std::string::npos    ? "openblas-openmp"
             : line.find("pthread") != std::string::npos ? "openblas-pthread"
                                                         : "openblas";
    }
    if (line.find("libmkl") != std::string::npos) return "mkl";
    if (line.find("libblis") != std::string::npos) return "blis";
    if (line.find("atlas") != std::string::npos) return "atlas";
    if (line.find("/blas/libblas.so") != std::string::npos) found = "reference";
  }
  return found.empty() ? "unknown" : found;
}

void InitLogging() {
  auto logger = spdlog::stderr_color_mt("amoeba");
  spdlog::set_default_logger(logger);
  spdlog::set_pattern("[%Y-%m-%d %H:%M:%S.%e] [%^%l%$] %v");
}

int CpusOfCfsQuota(int64_t quota_us, int64_t period_us) {
  if (quota_us <= 0 || period_us <= 0) return 0;
  return static_cast<int>((quota_us + period_us - 1) / period_us);
}

int CpusOfCgroupV2Max(const std::string& cpu_max) {
  std::istringstream in(cpu_max);
  std::string quota;
  int64_t period = 0;
  if (!(in >> quota >> period) || quota == "max") return 0;
  try {
    return CpusOfCfsQuota(std::stoll(quota), period);
  } catch (...) {
    return 0;
  }
}

namespace {

// The smallest quota on the process's cgroup and its parents (a parent's limit binds too), 0 if
// none: cgroup v2 (`0::/path`, cpu.max) and v1 (the `cpu` controller's cfs files).
int CgroupQuotaCpus() {
  int best = 0;
  auto take = [&](int cpus) {
    if (cpus > 0 && (best == 0 || cpus < best)) best = cpus;
  };
  // Every directory from `root + path` up to `root`.
  auto walk = [](const std::string& root, std::string path, const auto& fn) {
    for (;;) {
      fn(root + path);
      if (path.empty() || path == "/") break;
      const size_t slash = path.find_last_of('/');
      path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
    }
  };
  std::ifstream groups("/proc/self/cgroup");
  std::string line;
  while (std::getline(groups, line)) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
    if (line.compare(0, a, "0") == 0 && controllers.empty()) {
      walk("/sys/fs/cgroup", path, [&](const std::string& dir) {
        if (auto max = ReadFile(dir + "/cpu.max"); max.ok()) take(CpusOfCgroupV2Max(*max));
      });
      continue;
    }
    bool cpu = false;
    for (auto c : absl::StrSplit(controllers, ',')) cpu = cpu || c == "cpu";
    if (!cpu) continue;
    // Mounted at /sys/fs/cgroup/cpu (often a link to cpu,cpuacct); inside a container without a
    // cgroup namespace the path is the host's, so the mount's root is tried too.
    std::vector<std::string> roots = {"/sys/fs/cgroup/cpu"};
    if (controllers != "cpu") roots.push_back("/sys/fs/cgroup/" + controllers);
    for (const std::string& root : roots) {
      walk(root, path, [&](const std::string& dir) {
        auto quota = ReadFile(dir + "/cpu.cfs_quota_us");
        auto period = ReadFile(dir + "/cpu.cfs_period_us");
        if (quota.ok() && period.ok()) {
          try {
            take(CpusOfCfsQuota(std::stoll(*quota), std::stoll(*period)));
          } catch (...) {
          }
        }
      });
    }
  }
  return best;
}

}  // namespace

int DefaultThreads() {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  int cpus = sched_getaffinity(0, sizeof(mask), &mask) == 0
                 ? CPU_COUNT(&mask)
                 : static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  const int quota = CgroupQuotaCpus();
  if (quota > 0) cpus = std::min(cpus, quota);
  return std::max(1, cpus);
}

void InitRuntime(int threads) {
  const int n = threads > 0 ? threads : DefaultThreads();
  FlushDenormalsToZero(n);
  at::set_num_threads(n);
  const std::string blas = DescribeBlas();
  const std::vector<int>& cpus = TeamCpus();
  spdlog::info("runtime: {} threads{}, BLAS {}, {} kernels", at::get_num_threads(),
               PinsTeamsOf(n)
                   ? absl::StrCat(" (pinned to CPUs ",
                                  absl::StrJoin(cpus.begin(), cpus.begin() + n, ","), ")")
               : n > 1 ? absl::StrCat(" (unpinned; ", TeamCores(), " cores)")
                       : std::string(),
               blas, KernelIsaName(ActiveKernelIsa()));
  if (blas == "reference" || blas == "unknown") {
    spdlog::warn(
        "!!! libtorch is using the {} BLAS: matrix products will be ~40x slower. "
        "Install libopenblas0-openmp (scripts/setup does) !!!",
        blas);
  }
}

}  // namespace amoeba
