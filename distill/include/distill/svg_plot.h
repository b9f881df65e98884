// Small SVG line/scatter plots with readable axes (ticks with values, axis titles with units), a
// label per point and a legend per series: eval's frontier and bench/quality's figures.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace amoeba {

struct PlotPoint {
  double x = 0, y = 0;
  std::string label;  // drawn next to the point ("" = none); also its hover title
};

struct PlotSeries {
  explicit PlotSeries(std::string legend, bool join = true, bool dash = false)
      : name(std::move(legend)), line(join), dashed(dash) {}
  std::string name;  // legend entry
  std::vector<PlotPoint> points;
  bool line = true;  // join the points in the given order
  bool dashed = false;
  int color = -1;         // palette index; -1 = the series' own index
  bool in_legend = true;  // false for a companion series drawn in another one's colour
};

struct PlotOptions {
  std::string title;
  std::string x_label, y_label;  // with units, e.g. "decode ms/token"
  int width = 760, height = 480;
  bool point_labels = true;
};

// A complete SVG document. Axes span the data with a margin; ticks are 1/2/5 x 10^k steps.
std::string SvgPlot(const PlotOptions& o, const std::vector<PlotSeries>& series);

// Tick positions covering [lo, hi] with about `target` steps of 1, 2 or 5 x 10^k.
std::vector<double> NiceTicks(double lo, double hi, int target = 6);

}  // namespace amoeba
