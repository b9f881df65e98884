// Pins a team's members to distinct CPUs while it runs. Left to itself the kernel sometimes
// placed both threads of a 2-thread team on one CPU after an idle spell and kept them there for
// whole requests: every barrier then waited for a time slice and decode ran 3-4x slower
// (bench/README, "bench/idle_gap").
#pragma once
#include <vector>

namespace amoeba {

// Process-wide switch, on by default. Off when AMOEBA_PIN_THREADS=0, or when OMP_PROC_BIND is
// set (libgomp binds its threads itself then). The server exposes it as --pin-threads.
void SetTeamPinning(bool on);
bool TeamPinning();

// The CPUs this process may run on (its affinity mask when first asked), one per physical core
// first, then their SMT siblings: member i of a team runs on the i-th.
const std::vector<int>& TeamCpus();
// Physical cores among TeamCpus().
int TeamCores();
// Whether a team of `size` threads is pinned: pinning is on and the team fills every core of the
// mask (at least one thread per core, at most one per CPU). A smaller team leaves the kernel idle
// cores to place it on, and is not pinned: two such processes on one machine would otherwise
// pin onto the same CPUs.
bool PinsTeamsOf(int size);

struct CpuTopology {
  int cpu = 0;
  int package = -1;  // -1: unknown
  int core = -1;     // -1: unknown (the CPU is taken as its own core)
};
// TeamCpus' order for the given CPUs: the first CPU of every core (by package, core) before any
// core's second one, and so on.
std::vector<int> OrderCpusByCore(std::vector<CpuTopology> cpus);

// For a thread that starts teams and makes no threads of its own (the server's scheduler): it
// stays on its CPU between teams instead of getting its mask back after each (two system calls
// per team, a few µs).
void KeepTeamStarterPinned();

// The CPU the calling thread is pinned to as a team member, or -1.
int PinnedCpu();

}  // namespace amoeba
