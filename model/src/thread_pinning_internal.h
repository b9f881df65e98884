// RunInTeam's side of model/thread_pinning.h.
#pragma once

namespace amoeba {

// Called by every member of a team of `size` when the team starts: pins it to TeamCpus()[tid]
// when PinsTeamsOf(size). Pool threads (tid > 0) stay pinned; the
// starting thread gets its own mask back from UnpinTeamStarter when the team ends, so threads it
// makes later are not all born on one CPU.
void PinTeamMember(int tid, int size);
void UnpinTeamStarter();

}  // namespace amoeba
