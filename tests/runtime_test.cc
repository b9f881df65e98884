// The process-wide runtime: every thread that computes flushes denormals to zero.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <xmmintrin.h>

#include <atomic>
#include <bit>
#include <cstdint>
#include <limits>
#include <thread>

#include "model/runtime.h"
#include "model/team.h"

namespace amoeba {
namespace runtime_test {  // named: a unity build joins test files

// True when this thread has FTZ/DAZ set and its arithmetic shows it: a denormal result is
// flushed (FTZ) and a denormal operand reads as zero (DAZ).
bool FlushesHere() {
  volatile float smallest_normal = std::numeric_limits<float>::min();
  volatile float denormal = std::bit_cast<float>(uint32_t{1});
  const float half = smallest_normal * 0.5f;  // 2^-127: a denormal unless flushed
  const float doubled = denormal * 2.0f;      // 2^-148 unless read as zero
  return FlushesDenormals() && half == 0.0f && doubled == 0.0f;
}

TEST(RuntimeTest, EveryComputeThreadFlushesDenormals) {
  const unsigned saved_csr = _mm_getcsr();
  const int saved_threads = at::get_num_threads();
  at::set_num_threads(2);
  // OpenMP's pool exists before the call (a program may compute before it sets the runtime up).
  std::atomic<int> chunks{0};
  at::parallel_for(0, 2, 1, [&](int64_t, int64_t) { chunks++; });
  ASSERT_EQ(chunks.load(), 2);

  FlushDenormalsToZero(2);
  EXPECT_TRUE(FlushesHere()) << "the calling thread";
  std::atomic<int> flushed{0}, ran{0};
  at::parallel_for(0, 2, 1, [&](int64_t, int64_t) {
    ran++;
    flushed += FlushesHere();
  });
  EXPECT_EQ(ran.load(), 2);
  EXPECT_EQ(flushed.load(), 2) << "at::parallel_for's threads";
  flushed = ran = 0;
  auto member = [&] {
    ran++;
    flushed += FlushesHere();
  };
  RunInTeam(member);
  EXPECT_EQ(ran.load(), 2);
  EXPECT_EQ(flushed.load(), 2) << "a team's threads";
  bool later = false;
  std::thread([&] { later = FlushesHere(); }).join();
  EXPECT_TRUE(later) << "a thread made after the call";

  // Without the flags the same arithmetic keeps its denormals (so the checks above can fail).
  _mm_setcsr(saved_csr & ~0x8040u);
  EXPECT_FALSE(FlushesHere());
  _mm_setcsr(saved_csr);
  at::set_num_threads(saved_threads);
}

TEST(RuntimeTest, CgroupQuotasRoundUpToWholeCpus) {
  EXPECT_EQ(CpusOfCgroupV2Max("max 100000"), 0);
  EXPECT_EQ(CpusOfCgroupV2Max("200000 100000"), 2);
  EXPECT_EQ(CpusOfCgroupV2Max("150000 100000\n"), 2);
  EXPECT_EQ(CpusOfCgroupV2Max("50000 100000"), 1);
  EXPECT_EQ(CpusOfCgroupV2Max(""), 0);
  EXPECT_EQ(CpusOfCgroupV2Max("garbage"), 0);
  EXPECT_EQ(CpusOfCfsQuota(-1, 100000), 0);
  EXPECT_EQ(CpusOfCfsQuota(250000, 100000), 3);
  EXPECT_EQ(CpusOfCfsQuota(100000, 0), 0);
}

// "All cores" means the CPUs the process may run on: a thread limited to one CPU (as `taskset`
// limits a process) gets one thread.
TEST(RuntimeTest, DefaultThreadsFollowTheAffinityMask) {
  cpu_set_t all;
  CPU_ZERO(&all);
  ASSERT_EQ(sched_getaffinity(0, sizeof(all), &all), 0);
  const int n = DefaultThreads();
  EXPECT_GE(n, 1);
  EXPECT_LE(n, CPU_COUNT(&all));
  int limited = 0;
  std::thread([&] {
    cpu_set_t one;
    CPU_ZERO(&one);
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &all)) {
        CPU_SET(c, &one);
        break;
      }
    ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
    limited = DefaultThreads();
  }).join();
  EXPECT_EQ(limited, 1);
}

}  // namespace runtime_test
}  // namespace amoeba
