#include "model/team.h"

#include <immintrin.h>
#include <omp.h>

#include <strings.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <vector>

#include "model/step_profile.h"
#include "thread_pinning_internal.h"

namespace amoeba {

struct TeamState {
  alignas(64) std::atomic<int> arrived{0};
  alignas(64) std::atomic<int> generation{0};
  std::atomic<bool> aborted{false};
  int spins_before_sleep = 0;
  std::exception_ptr error;  // the first exception, written by the thread that set `aborted`
  // The starting thread's scratch (Team::SharedScratch), or null in a nested team. Its size only
  // changes between the two barriers of a growth, which every member passes together.
  std::vector<std::byte>* scratch = nullptr;
  // The starting thread's step profile, if one is attached: every member adds its barrier waits.
  StepProfile* profile = nullptr;
  // Team::OpenRange's ranges, two sets used in turn, one per member: the next (begin, end) to
  // take from the front in the low 32 bits, the end the others steal from in the high ones.
  // A set is opened again only after a barrier that every member passed once done with it.
  struct alignas(64) Range {
    std::atomic<uint64_t> bounds{0};
  };
  Range ranges[2][Team::kMaxStealingMembers];
  static Team Member(int tid, int size, TeamState* s) { return Team(tid, size, s); }
};

namespace {
// Pauses a waiting member spins before it sleeps on the generation's futex (std::atomic::wait):
// ~0.1-0.5 ms, well past a healthy step's waits of a few µs. A member that is descheduled (another
// process on the core) would otherwise have the others spin their whole time slices: a 2-thread
// test next to one other busy process ran 85x slower with a pure spin.
constexpr int kSpinsBeforeSleep = 4096;
thread_local Team* current_team = nullptr;
thread_local std::vector<std::byte> team_scratch;  // SharedScratch of the teams this thread starts
thread_local bool team_scratch_in_use = false;
constexpr size_t kScratchAlign = 64;

std::byte* Aligned(std::vector<std::byte>& v) {
  const auto p = reinterpret_cast<uintptr_t>(v.data());
  return v.data() + ((kScratchAlign - p % kScratchAlign) % kScratchAlign);
}
std::atomic<int64_t> team_runs{0};
}  // namespace

int BarrierSpins(const char* omp_wait_policy) {
  return omp_wait_policy && strcasecmp(omp_wait_policy, "passive") == 0 ? 0 : kSpinsBeforeSleep;
}

int64_t TeamRuns() {
  return team_runs.load(std::memory_order_relaxed);
}

Team* CurrentTeam() {
  return current_team;
}

Team* SetCurrentTeam(Team* team) {
  Team* previous = current_team;
  current_team = team;
  return previous;
}

void Team::Barrier() {
  if (size_ == 1) return;
  if (state_->aborted.load(std::memory_order_acquire)) throw TeamAborted{};
  const int gen = state_->generation.load(std::memory_order_acquire);
  if (state_->arrived.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
    state_->arrived.store(0, std::memory_order_relaxed);
    state_->generation.store(gen + 1, std::memory_order_release);
    state_->generation.notify_all();  // no system call unless a member sleeps
    return;
  }
  StepProfile* const profile = tid_ < StepProfile::kMaxMembers ? state_->profile : nullptr;
  const auto started =
      profile ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  for (int spins = 0; state_->generation.load(std::memory_order_acquire) == gen; ++spins) {
    if (state_->aborted.load(std::memory_order_acquire)) throw TeamAborted{};
    if (spins < state_->spins_before_sleep)
      _mm_pause();
    else
      state_->generation.wait(gen, std::memory_order_acquire);
  }
  // Each member writes its own entry; the starting thread reads them after the team has ended.
  if (profile)
    profile->barrier_wait_ns[tid_] += std::chrono::duration_cast<std::chrono::nanoseconds>(
                                          std::chrono::steady_clock::now() - started)
                                          .count();
}

std::byte* Team::SharedScratch(size_t bytes) {
  std::vector<std::byte>* v = state_->scratch;
  if (!v) return nullptr;
  // Every member reads the same size here: it changes only below, between two barriers.
  if (v->size() < bytes + kScratchAlign) {
    Barrier();  // no member still uses the old buffer
    if (tid_ == 0) v->resize(bytes + kScratchAlign);
    Barrier();  // every member sees the new one
  }
  return Aligned(*v);
}

namespace {
uint64_t PackRange(int64_t front, int64_t back) {
  return static_cast<uint64_t>(front) | (static_cast<uint64_t>(back) << 32);
}

// Takes up to `count` items off the front (the range's owner) or the back (another member) of a
// range; false when it is empty.
bool Claim(std::atomic<uint64_t>& bounds, int64_t count, bool from_back, int64_t* begin,
           int64_t* end) {
  uint64_t v = bounds.load(std::memory_order_acquire);
  for (;;) {
    const int64_t front = static_cast<int64_t>(v & 0xffffffffu),
                  back = static_cast<int64_t>(v >> 32);
    if (front >= back) return false;
    const int64_t b = from_back ? std::max(front, back - count) : front;
    const int64_t e = from_back ? back : std::min(back, front + count);
    const uint64_t rest = from_back ? PackRange(front, b) : PackRange(e, back);
    if (bounds.compare_exchange_weak(v, rest, std::memory_order_acq_rel)) {
      *begin = b;
      *end = e;
      return true;
    }
  }
}
}  // namespace

void Team::OpenRange(int64_t begin, int64_t end) {
  // A member that looks at this range before it is opened sees the previous use's: empty, as
  // every owner takes its whole range before that call's closing barrier.
  state_->ranges[ranges_opened_++ % 2][tid_].bounds.store(PackRange(begin, end),
                                                          std::memory_order_release);
}

bool Team::Take(int64_t count, int64_t* begin, int64_t* end) {
  return Claim(state_->ranges[(ranges_opened_ - 1) % 2][tid_].bounds, count, false, begin, end);
}

bool Team::Steal(int member, int64_t count, int64_t* begin, int64_t* end) {
  return Claim(state_->ranges[(ranges_opened_ - 1) % 2][member].bounds, count, true, begin, end);
}

void RunInTeam(void (*body)(void*), void* arg) {
  team_runs.fetch_add(1, std::memory_order_relaxed);
  TeamState state;
  // A team started while this thread's own team runs (from a Serially section) leaves the
  // scratch to the outer one.
  const bool owns_scratch = !team_scratch_in_use;
  if (owns_scratch) {
    state.scratch = &team_scratch;
    team_scratch_in_use = true;
  }
  struct Release {
    bool owns;
    ~Release() {
      if (owns) team_scratch_in_use = false;
    }
  } release{owns_scratch};
  state.profile = AttachedStepProfile();
  static const int spins = BarrierSpins(std::getenv("OMP_WAIT_POLICY"));
  state.spins_before_sleep = spins;
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    Team team = TeamState::Member(omp_get_thread_num(), omp_get_num_threads(), &state);
    PinTeamMember(team.tid(), team.size());
    if (state.profile && team.tid() == 0)
      state.profile->members = std::max(state.profile->members, team.size());
    Team* outer = SetCurrentTeam(&team);
    try {
      body(arg);
    } catch (const TeamAborted&) {
      // Another member threw; its exception is the one reported.
    } catch (...) {
      if (!state.aborted.exchange(true, std::memory_order_acq_rel))
        state.error = std::current_exception();
      // Members asleep in Barrier wake, see `aborted` and leave.
      state.generation.fetch_add(1, std::memory_order_acq_rel);
      state.generation.notify_all();
    }
    SetCurrentTeam(outer);
  }
  UnpinTeamStarter();
  if (state.error) std::rethrow_exception(state.error);
}

}  // namespace amoeba
