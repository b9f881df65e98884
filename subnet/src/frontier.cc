#include "subnet/frontier.h"

#include <algorithm>

namespace amoeba {

std::vector<size_t> ParetoFrontier(const std::vector<FrontierPoint>& p) {
  std::vector<size_t> out;
  for (size_t i = 0; i < p.size(); ++i) {
    bool dominated = false;
    for (size_t j = 0; j < p.size() && !dominated; ++j) {
      dominated = p[j].cost <= p[i].cost && p[j].quality >= p[i].quality &&
                  (p[j].cost < p[i].cost || p[j].quality > p[i].quality);
    }
    if (!dominated) out.push_back(i);
  }
  std::sort(out.begin(), out.end(), [&](size_t a, size_t b) {
    if (p[a].cost != p[b].cost) return p[a].cost < p[b].cost;
    if (p[a].quality != p[b].quality) return p[a].quality > p[b].quality;
    return a < b;
  });
  return out;
}

}  // namespace amoeba
