#include "model/thread_pinning.h"

#include <sched.h>
#include <spdlog/spdlog.h>
#include <strings.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <utility>

#include "thread_pinning_internal.h"

namespace amoeba {
namespace {

bool PinningByDefault() {
  const char* pin = std::getenv("AMOEBA_PIN_THREADS");
  if (pin && (std::strcmp(pin, "0") == 0 || strcasecmp(pin, "false") == 0)) return false;
  const char* bind = std::getenv("OMP_PROC_BIND");
  return !(bind && *bind);
}

std::atomic<bool>& PinningSwitch() {
  static std::atomic<bool> on{PinningByDefault()};
  return on;
}

int ReadTopology(int cpu, const char* what) {
  std::ifstream in("/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/" + what);
  int v = -1;
  return in >> v ? v : -1;
}

// The process's CPUs with their topology, read once.
const std::vector<CpuTopology>& AllowedCpus() {
  static const std::vector<CpuTopology> cpus = [] {
    std::vector<CpuTopology> out;
    cpu_set_t mask;
    CPU_ZERO(&mask);
    if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return out;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
      if (CPU_ISSET(cpu, &mask))
        out.push_back(
            {cpu, ReadTopology(cpu, "physical_package_id"), ReadTopology(cpu, "core_id")});
    return out;
  }();
  return cpus;
}

// (package, core); a CPU without topology is its own core.
std::pair<int, int> CoreOf(const CpuTopology& c) {
  return c.core < 0 ? std::pair{-1, c.cpu} : std::pair{c.package, c.core};
}

bool PinTo(int cpu) {
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  if (sched_setaffinity(0, sizeof(one), &one) == 0) return true;
  // A cpuset changed under us (a resized container): run unpinned rather than fail every team.
  if (PinningSwitch().exchange(false))
    spdlog::warn("runtime: pinning a team thread to CPU {} failed ({}); threads run unpinned", cpu,
                 std::strerror(errno));
  return false;
}

thread_local int pinned_cpu = -1;
thread_local bool keep_starter_pinned = false;
thread_local bool starter_pinned = false;
thread_local cpu_set_t starter_mask;

}  // namespace

void SetTeamPinning(bool on) {
  PinningSwitch().store(on);
}

bool TeamPinning() {
  return PinningSwitch().load(std::memory_order_relaxed);
}

std::vector<int> OrderCpusByCore(std::vector<CpuTopology> cpus) {
  // (rank of the CPU within its core, package, core, cpu).
  std::vector<std::tuple<int, int, int, int>> keyed;
  std::map<std::pair<int, int>, int> seen_in_core;
  std::sort(cpus.begin(), cpus.end(),
            [](const CpuTopology& a, const CpuTopology& b) { return a.cpu < b.cpu; });
  for (const CpuTopology& c : cpus) {
    const auto [package, core] = CoreOf(c);
    keyed.emplace_back(seen_in_core[{package, core}]++, package, core, c.cpu);
  }
  std::sort(keyed.begin(), keyed.end());
  std::vector<int> out;
  for (const auto& k : keyed) out.push_back(std::get<3>(k));
  return out;
}

const std::vector<int>& TeamCpus() {
  static const std::vector<int> cpus = OrderCpusByCore(AllowedCpus());
  return cpus;
}

int TeamCores() {
  static const int cores = [] {
    std::set<std::pair<int, int>> seen;
    for (const CpuTopology& c : AllowedCpus()) seen.insert(CoreOf(c));
    return static_cast<int>(seen.size());
  }();
  return cores;
}

bool PinsTeamsOf(int size) {
  return TeamPinning() && size >= 2 && size >= TeamCores() &&
         size <= static_cast<int>(TeamCpus().size());
}

void KeepTeamStarterPinned() {
  keep_starter_pinned = true;
}

int PinnedCpu() {
  return pinned_cpu;
}

void PinTeamMember(int tid, int size) {
  if (tid >= size || !PinsTeamsOf(size)) return;
  const std::vector<int>& cpus = TeamCpus();
  const int cpu = cpus[tid];
  if (pinned_cpu == cpu) return;
  // Always, not only when it sits on another member's CPU: checking that at the start left
  // requests 1.5x slower now and then (the kernel moved the starter during the team).
  if (tid == 0 && !keep_starter_pinned) {
    if (sched_getaffinity(0, sizeof(starter_mask), &starter_mask) != 0) return;
    starter_pinned = true;
  }
  if (PinTo(cpu)) pinned_cpu = cpu;
}

void UnpinTeamStarter() {
  if (!starter_pinned) return;
  sched_setaffinity(0, sizeof(starter_mask), &starter_mask);
  starter_pinned = false;
  pinned_cpu = -1;
}

}  // namespace amoeba
