// Team members run on distinct CPUs while they decode, and the starting thread gets its own
// affinity back afterwards.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <sched.h>

#include <atomic>
#include <thread>
#include <vector>

#include "model/team.h"
#include "model/thread_pinning.h"

namespace amoeba {
namespace thread_pinning_test {  // named: a unity build joins test files

std::vector<int> Order(std::vector<CpuTopology> cpus) {
  return OrderCpusByCore(std::move(cpus));
}

TEST(ThreadPinningTest, OneCpuPerCoreComesBeforeAnySecondHyperthread) {
  // Linux's usual numbering: the siblings of cores 0-1 are CPUs 2-3.
  EXPECT_EQ(Order({{0, 0, 0}, {1, 0, 1}, {2, 0, 0}, {3, 0, 1}}), (std::vector<int>{0, 1, 2, 3}));
  // Siblings numbered next to each other (some VMs): 0,1 share a core, 2,3 another.
  EXPECT_EQ(Order({{0, 0, 0}, {1, 0, 0}, {2, 0, 1}, {3, 0, 1}}), (std::vector<int>{0, 2, 1, 3}));
  // The same core id on two packages is two cores.
  EXPECT_EQ(Order({{0, 0, 0}, {1, 0, 0}, {2, 1, 0}, {3, 1, 0}}), (std::vector<int>{0, 2, 1, 3}));
  // An affinity mask that leaves gaps, listed out of order; no topology: each CPU its own core.
  EXPECT_EQ(Order({{5, -1, -1}, {3, -1, -1}, {9, -1, -1}}), (std::vector<int>{3, 5, 9}));
}

cpu_set_t MaskOfThisThread() {
  cpu_set_t m;
  CPU_ZERO(&m);
  EXPECT_EQ(sched_getaffinity(0, sizeof(m), &m), 0);
  return m;
}

struct Seen {
  int members = 0;
  std::vector<int> pinned, running_on;  // per member
};

// A team of at::get_num_threads() members, each noting where it runs.
Seen RunTeam() {
  Seen seen;
  seen.pinned.assign(at::get_num_threads(), -2);
  seen.running_on.assign(at::get_num_threads(), -2);
  std::atomic<int> members{0};
  auto member = [&] {
    Team* t = CurrentTeam();
    ASSERT_NE(t, nullptr);
    members++;
    seen.pinned[t->tid()] = PinnedCpu();
    seen.running_on[t->tid()] = sched_getcpu();
  };
  RunInTeam(member);
  seen.members = members.load();
  return seen;
}

class ThreadPinningTeamTest : public testing::Test {
 protected:
  void SetUp() override {
    if (TeamCores() < 2) GTEST_SKIP() << "one core: nothing to pin apart";
    saved_threads_ = at::get_num_threads();
    at::set_num_threads(TeamCores());  // a team that fills the cores: the one that is pinned
    saved_pinning_ = TeamPinning();    // off under ctest (AMOEBA_PIN_THREADS=0)
    SetTeamPinning(true);
  }
  void TearDown() override {
    if (saved_threads_ > 0) at::set_num_threads(saved_threads_);
    SetTeamPinning(saved_pinning_);
  }
  int saved_threads_ = 0;
  bool saved_pinning_ = true;
};

TEST_F(ThreadPinningTeamTest, OnlyTeamsThatFillTheCoresArePinned) {
  EXPECT_TRUE(PinsTeamsOf(TeamCores()));
  EXPECT_TRUE(PinsTeamsOf(static_cast<int>(TeamCpus().size())));
  EXPECT_FALSE(PinsTeamsOf(static_cast<int>(TeamCpus().size()) + 1));
  EXPECT_FALSE(PinsTeamsOf(1));
  if (TeamCores() > 2) {
    EXPECT_FALSE(PinsTeamsOf(TeamCores() - 1));
  }
  SetTeamPinning(false);
  EXPECT_FALSE(PinsTeamsOf(TeamCores()));
}

TEST_F(ThreadPinningTeamTest, MembersRunOnDistinctCpusAndTheStarterGetsItsMaskBack) {
  SetTeamPinning(true);
  const cpu_set_t before = MaskOfThisThread();
  const Seen seen = RunTeam();
  ASSERT_EQ(seen.members, TeamCores());
  for (int tid = 0; tid < TeamCores(); ++tid) {
    EXPECT_EQ(seen.pinned[tid], TeamCpus()[tid]) << "member " << tid;
    EXPECT_EQ(seen.running_on[tid], TeamCpus()[tid]) << "member " << tid;
  }
  const cpu_set_t after = MaskOfThisThread();
  EXPECT_TRUE(CPU_EQUAL(&before, &after)) << "the starter's affinity is restored";
  EXPECT_EQ(PinnedCpu(), -1);
  // A thread made after the team may run anywhere the process may (not on one inherited CPU).
  cpu_set_t child;
  std::thread([&] { child = MaskOfThisThread(); }).join();
  EXPECT_TRUE(CPU_EQUAL(&before, &child));
}

TEST_F(ThreadPinningTeamTest, OffLeavesTheStarterUnpinned) {
  SetTeamPinning(false);
  const Seen seen = RunTeam();
  ASSERT_EQ(seen.members, TeamCores());
  EXPECT_EQ(seen.pinned[0], -1);
}

TEST_F(ThreadPinningTeamTest, ATeamLargerThanTheCpusIsNotPinned) {
  at::set_num_threads(static_cast<int>(TeamCpus().size()) + 1);
  std::atomic<int> members{0}, starter_pinned{-2};
  auto member = [&] {
    members++;
    if (CurrentTeam()->tid() == 0) starter_pinned = PinnedCpu();
  };
  RunInTeam(member);
  EXPECT_EQ(members.load(), static_cast<int>(TeamCpus().size()) + 1);
  EXPECT_EQ(starter_pinned.load(), -1);
}

TEST_F(ThreadPinningTeamTest, AStarterThatKeepsItsPinStaysOnItsCpu) {
  int pinned_after = -2;
  cpu_set_t mask_after;
  std::thread([&] {
    KeepTeamStarterPinned();
    const Seen seen = RunTeam();
    EXPECT_EQ(seen.pinned[0], TeamCpus()[0]);
    pinned_after = PinnedCpu();
    mask_after = MaskOfThisThread();
  }).join();
  EXPECT_EQ(pinned_after, TeamCpus()[0]);
  EXPECT_EQ(CPU_COUNT(&mask_after), 1);
  EXPECT_TRUE(CPU_ISSET(TeamCpus()[0], &mask_after));
}

}  // namespace thread_pinning_test
}  // namespace amoeba
