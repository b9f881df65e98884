// The Pareto frontier of shapes over (cost, quality): one rule for `eval`'s table and plot and for
// the server's planner.
#pragma once
#include <cstddef>
#include <vector>

namespace amoeba {

struct FrontierPoint {
  double cost = 0;     // lower is better (e.g. decode ms per token)
  double quality = 0;  // higher is better (e.g. minus the perplexity)
};

// Indices of the points no other point dominates (cost <= and quality >=, one of them strictly),
// ordered by ascending cost (ties: higher quality first, then index).
std::vector<size_t> ParetoFrontier(const std::vector<FrontierPoint>& points);

}  // namespace amoeba
