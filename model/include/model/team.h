// One parallel region for a whole pass (a decode step) instead of one per kernel call: the
// threads of the region form a Team; the parallel helpers below split work by the team and end
// with a barrier (a spin, then a futex sleep if a member is late), serial work runs on the team's
// first thread between barriers. Outside a team the same helpers open an OpenMP region each
// (at::parallel_for), so callers are written once for both. A decode step of a small model makes
// ~60 kernel calls of 10-60 µs; a fork/join and the end-of-region wait cost several µs each
// (bench/README, bench/decode).
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>

namespace amoeba {

struct TeamAborted {};

class Team {
 public:
  int tid() const { return tid_; }
  int size() const { return size_; }
  // Every thread of the team waits here until all have arrived. Throws TeamAborted when another
  // member has thrown (RunInTeam then rethrows that exception to its caller).
  void Barrier();
  // A buffer of at least `bytes` (64-byte aligned) whose address every member gets: all members
  // call it at the same point with the same size, like a barrier. It belongs to the thread that
  // started the team and outlives the pass (grown, never shrunk: no allocation per decode step
  // once it is large enough); growing it waits for every member twice and drops the contents.
  // Null in a team started from inside another team's work.
  std::byte* SharedScratch(size_t bytes);

  // Ranges the members take items from in ParallelForStealing: every member calls OpenRange with
  // its own static range at the same point; it then Takes items from its range's front, and when
  // that is empty Steals from the back of the others'. Both return false when nothing is left.
  // Teams of more than kMaxStealingMembers members only take their own range.
  static constexpr int kMaxStealingMembers = 8;
  void OpenRange(int64_t begin, int64_t end);
  bool Take(int64_t count, int64_t* begin, int64_t* end);
  bool Steal(int member, int64_t count, int64_t* begin, int64_t* end);

 private:
  friend struct TeamState;
  Team(int tid, int size, struct TeamState* state) : tid_(tid), size_(size), state_(state) {}
  int tid_, size_;
  struct TeamState* state_;
  int ranges_opened_ = 0;  // OpenRange calls so far: which of the two sets of ranges is in use
};

// The team the calling thread is running in, or null.
Team* CurrentTeam();
// Sets the calling thread's team (null: none); returns the previous one.
Team* SetCurrentTeam(Team* team);

// Runs body() on at::get_num_threads() threads at once, each as one member of a Team; every
// thread must make the same sequence of the calls below. An exception thrown on any thread ends
// the team (the others leave at their next barrier) and is rethrown here, on the caller.
void RunInTeam(void (*body)(void*), void* arg);
// Pauses a member spins in Barrier before it sleeps, for the value of OMP_WAIT_POLICY (null:
// unset). "passive" asks that waiting threads not spin (libgomp's then sleep at once; the team's
// barrier does too): for machines shared with other busy processes, where a spinning member takes
// the core a late one needs. RunInTeam reads the variable once per process.
int BarrierSpins(const char* omp_wait_policy);
// RunInTeam calls so far, process-wide (tests check that a path really ran as a team).
int64_t TeamRuns();
template <typename F>
void RunInTeam(F& body) {
  RunInTeam([](void* f) { (*static_cast<F*>(f))(); }, &body);
}

// fn() on one thread: the team's first (then a barrier), or the caller outside a team. Inside
// fn the thread is in no team (the others wait at the barrier), so helpers called there run
// alone.
template <typename F>
void Serially(const F& fn) {
  Team* t = CurrentTeam();
  if (!t) return fn();
  if (t->tid() == 0) {
    struct Restore {
      Team* t;
      ~Restore() { SetCurrentTeam(t); }
    } restore{SetCurrentTeam(nullptr)};
    fn();
  }
  t->Barrier();
}

// The chunk [b, e) of [begin, end) at::parallel_for gives thread `tid` of `threads` with `grain`
// (min(threads, ceil(size / grain)) equal chunks; empty for the threads left over).
inline void ParallelChunk(int64_t begin, int64_t end, int64_t grain, int tid, int threads,
                          int64_t* b, int64_t* e) {
  const int64_t n = end - begin;
  const int64_t used =
      std::max<int64_t>(1, std::min<int64_t>(threads, grain > 0 ? (n + grain - 1) / grain : n));
  const int64_t chunk = (n + used - 1) / used;
  *b = std::min(end, begin + tid * chunk);
  *e = std::min(end, *b + chunk);
}

// at::parallel_for's split of [begin, end), inside a team too (then a barrier).
template <typename F>
void ParallelFor(int64_t begin, int64_t end, int64_t grain, const F& fn) {
  Team* t = CurrentTeam();
  if (!t) return at::parallel_for(begin, end, grain, fn);
  int64_t b, e;
  ParallelChunk(begin, end, grain, t->tid(), t->size(), &b, &e);
  if (b < e) fn(b, e);
  t->Barrier();
}

// ParallelFor's split, except that a member that finishes its chunk takes pieces of `steal`
// items from the ends of the others' chunks that they have not reached yet. Each member still
// streams its own chunk front to back (what the weight panels need from the hardware prefetcher),
// but a member slowed down (a busy or slower vCPU) no longer holds the others at the barrier.
template <typename F>
void ParallelForStealing(int64_t begin, int64_t end, int64_t grain, int64_t steal, const F& fn) {
  Team* t = CurrentTeam();
  if (!t || t->size() == 1 || t->size() > Team::kMaxStealingMembers)
    return ParallelFor(begin, end, grain, fn);
  int64_t b, e;
  ParallelChunk(begin, end, grain, t->tid(), t->size(), &b, &e);
  t->OpenRange(b, e);
  while (t->Take(steal, &b, &e)) fn(b, e);
  for (int i = 1; i < t->size(); ++i)
    while (t->Steal((t->tid() + i) % t->size(), steal, &b, &e)) fn(b, e);
  t->Barrier();
}

// fn(i) for every item of [0, count), the items split over the current team's members (stealing
// as ParallelForStealing), each item on one thread alone: kernels called inside fn run on that
// thread, with no barrier per kernel (many small independent pieces of work: one barrier at the
// end instead of several per piece). Outside a team: in order, on the caller.
template <typename F>
void ForEachItemAlone(int64_t count, const F& fn) {
  Team* t = CurrentTeam();
  if (!t) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }
  ParallelForStealing(0, count, 1, 1, [&](int64_t b, int64_t e) {
    struct Restore {
      Team* t;
      ~Restore() { SetCurrentTeam(t); }
    } restore{SetCurrentTeam(nullptr)};
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

// Rows of row-wise work that pay for opening a parallel region outside a team.
inline constexpr int64_t kMinRowsForRegion = 64;
// fn(b, e) over ranges of [0, rows) of row-wise work (norms, residual adds): split over the
// current team like ParallelFor; outside a team on the calling thread unless there are at least
// kMinRowsForRegion rows.
template <typename F>
void ParallelRows(int64_t rows, const F& fn) {
  if (CurrentTeam() || rows >= kMinRowsForRegion) return ParallelFor(0, rows, 1, fn);
  if (rows > 0) fn(0, rows);
}

}  // namespace amoeba
