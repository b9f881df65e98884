#include "distill/svg_plot.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"

namespace amoeba {
namespace {

// Colour-blind-safe palette (Okabe-Ito), then repeats.
constexpr const char* kColors[] = {"#0072B2", "#D55E00", "#009E73", "#CC79A7",
                                   "#E69F00", "#56B4E9", "#000000", "#F0E442"};

std::string Escape(const std::string& s) {
  return absl::StrReplaceAll(s, {{"&", "&amp;"}, {"<", "&lt;"}, {">", "&gt;"}, {"'", "&apos;"}});
}

std::string TickText(double v, double step) {
  const int decimals = step >= 1 ? 0 : static_cast<int>(std::ceil(-std::log10(step) - 1e-9));
  return absl::StrFormat("%.*f", decimals, v);
}

}  // namespace

std::vector<double> NiceTicks(double lo, double hi, int target) {
  if (!(hi > lo)) hi = lo + 1;
  const double raw = (hi - lo) / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    step = m * mag;
    if (step >= raw * (1 - 1e-9)) break;  // 0.06 / 6 must give 0.01, not 0.02
  }
  std::vector<double> out;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step)
    out.push_back(std::abs(v) < step * 1e-9 ? 0.0 : v);
  return out;
}

std::string SvgPlot(const PlotOptions& o, const std::vector<PlotSeries>& series) {
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const auto& s : series)
    for (const auto& p : s.points) {
      x0 = std::min(x0, p.x), x1 = std::max(x1, p.x);
      y0 = std::min(y0, p.y), y1 = std::max(y1, p.y);
    }
  if (!std::isfinite(x0)) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  auto pad = [](double& lo, double& hi) {
    const double span = hi > lo ? hi - lo : std::max(1.0, std::abs(lo) * 0.1);
    lo -= span * 0.06, hi += span * 0.06;
  };
  pad(x0, x1);
  pad(y0, y1);
  const std::vector<double> xt = NiceTicks(x0, x1), yt = NiceTicks(y0, y1);
  const double W = o.width, H = o.height, left = 78, right = 20, top = o.title.empty() ? 20 : 40,
               bottom = 58;
  auto X = [&](double v) { return left + (W - left - right) * (v - x0) / (x1 - x0); };
  auto Y = [&](double v) { return H - bottom - (H - top - bottom) * (v - y0) / (y1 - y0); };

  std::string svg = absl::StrFormat(
      "<svg xmlns='http://www.w3.org/2000/svg' width='%g' height='%g' viewBox='0 0 %g %g' "
      "font-family='sans-serif' font-size='12'>\n<rect width='100%%' height='100%%' "
      "fill='white'/>\n",
      W, H, W, H);
  if (!o.title.empty())
    absl::StrAppendFormat(&svg,
                          "<text x='%g' y='24' font-size='15' text-anchor='middle'>%s</text>\n",
                          W / 2, Escape(o.title));
  // Grid, ticks and tick values.
  const double step_x = xt.size() > 1 ? xt[1] - xt[0] : 1,
               step_y = yt.size() > 1 ? yt[1] - yt[0] : 1;
  for (double v : xt) {
    absl::StrAppendFormat(&svg,
                          "<line x1='%.1f' y1='%g' x2='%.1f' y2='%g' stroke='#e4e4e4'/>"
                          "<line x1='%.1f' y1='%g' x2='%.1f' y2='%g' stroke='black'/>"
                          "<text x='%.1f' y='%g' text-anchor='middle'>%s</text>\n",
                          X(v), top, X(v), H - bottom, X(v), H - bottom, X(v), H - bottom + 5, X(v),
                          H - bottom + 19, TickText(v, step_x));
  }
  for (double v : yt) {
    absl::StrAppendFormat(&svg,
                          "<line x1='%g' y1='%.1f' x2='%g' y2='%.1f' stroke='#e4e4e4'/>"
                          "<line x1='%g' y1='%.1f' x2='%g' y2='%.1f' stroke='black'/>"
                          "<text x='%g' y='%.1f' text-anchor='end'>%s</text>\n",
                          left, Y(v), W - right, Y(v), left - 5, Y(v), left, Y(v), left - 8,
                          Y(v) + 4, TickText(v, step_y));
  }
  absl::StrAppendFormat(&svg,
                        "<rect x='%g' y='%g' width='%g' height='%g' fill='none' stroke='black'/>\n"
                        "<text x='%g' y='%g' text-anchor='middle' font-size='13'>%s</text>\n"
                        "<text transform='translate(18 %g) rotate(-90)' text-anchor='middle' "
                        "font-size='13'>%s</text>\n",
                        left, top, W - left - right, H - top - bottom, (left + W - right) / 2,
                        H - 14, Escape(o.x_label), (top + H - bottom) / 2, Escape(o.y_label));
  // Series.
  auto color_of = [&](size_t i) {
    const size_t c = series[i].color >= 0 ? static_cast<size_t>(series[i].color) : i;
    return kColors[c % (sizeof(kColors) / sizeof(kColors[0]))];
  };
  for (size_t i = 0; i < series.size(); ++i) {
    const PlotSeries& s = series[i];
    const char* color = color_of(i);
    if (s.line && s.points.size() > 1) {
      std::string pts;
      for (const auto& p : s.points) absl::StrAppendFormat(&pts, "%.1f,%.1f ", X(p.x), Y(p.y));
      absl::StrAppendFormat(&svg,
                            "<polyline points='%s' fill='none' stroke='%s' stroke-width='2'%s/>\n",
                            pts, color, s.dashed ? " stroke-dasharray='6 4'" : "");
    }
    for (const auto& p : s.points) {
      absl::StrAppendFormat(&svg,
                            "<circle cx='%.1f' cy='%.1f' r='3.5' fill='%s'><title>%s: %s (%g, "
                            "%g)</title></circle>\n",
                            X(p.x), Y(p.y), color, Escape(s.name), Escape(p.label), p.x, p.y);
      if (o.point_labels && !p.label.empty())
        absl::StrAppendFormat(&svg, "<text x='%.1f' y='%.1f' font-size='9' fill='%s'>%s</text>\n",
                              X(p.x) + 5, Y(p.y) - 5, color, Escape(p.label));
    }
  }
  // Legend, top right inside the plot area, as wide as its longest entry (~6.5 px a character
  // at 12 px sans-serif).
  size_t entries = 0, longest = 0;
  for (const PlotSeries& s : series)
    if (s.in_legend) ++entries, longest = std::max(longest, s.name.size());
  const double box = 44 + 6.5 * static_cast<double>(longest), bx = W - right - box - 6;
  if (entries > 0)
    absl::StrAppendFormat(&svg,
                          "<rect x='%g' y='%g' width='%g' height='%zu' fill='white' "
                          "fill-opacity='0.85' stroke='#bbbbbb'/>\n",
                          bx, top + 5, box, entries * 17 + 6);
  double ly = top + 16;
  for (size_t i = 0; i < series.size(); ++i) {
    if (!series[i].in_legend) continue;
    const char* color = color_of(i);
    if (series[i].line)
      absl::StrAppendFormat(&svg,
                            "<line x1='%g' y1='%.1f' x2='%g' y2='%.1f' stroke='%s' "
                            "stroke-width='2'%s/>",
                            bx + 6, ly, bx + 30, ly, color,
                            series[i].dashed ? " stroke-dasharray='6 4'" : "");
    absl::StrAppendFormat(&svg,
                          "<circle cx='%g' cy='%.1f' r='3.5' fill='%s'/><text x='%g' y='%.1f'>%s"
                          "</text>\n",
                          bx + 18, ly, color, bx + 36, ly + 4, Escape(series[i].name));
    ly += 17;
  }
  svg += "</svg>\n";
  return svg;
}

}  // namespace amoeba
