#include "model/team.h"

#include <immintrin.h>
#include <omp.h>

namespace amoeba {

struct TeamState {
  alignas(64) std::atomic<int> arrived{0};
  alignas(64) std::atomic<int> generation{0};
  std::atomic<bool> aborted{false};
  std::exception_ptr error;  // the first exception, written by the thread that set `aborted`
  static Team Member(int tid, int size, TeamState* s) { return Team(tid, size, s); }
};

namespace {
thread_local Team* current_team = nullptr;
std::atomic<int64_t> team_runs{0};
}  // namespace

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
    return;
  }
  while (state_->generation.load(std::memory_order_acquire) == gen) {
    if (state_->aborted.load(std::memory_order_acquire)) throw TeamAborted{};
    _mm_pause();
  }
}

void RunInTeam(void (*body)(void*), void* arg) {
  team_runs.fetch_add(1, std::memory_order_relaxed);
  TeamState state;
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    Team team = TeamState::Member(omp_get_thread_num(), omp_get_num_threads(), &state);
    Team* outer = SetCurrentTeam(&team);
    try {
      body(arg);
    } catch (const TeamAborted&) {
      // Another member threw; its exception is the one reported.
    } catch (...) {
      if (!state.aborted.exchange(true, std::memory_order_acq_rel))
        state.error = std::current_exception();
    }
    SetCurrentTeam(outer);
  }
  if (state.error) std::rethrow_exception(state.error);
}

}  // namespace amoeba
