// amoeba.json: the supernet's spec (grid, depth and width tables, calibration and tuning
// provenance, the per-shape profile) to and from JSON, with every field checked on the way in.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "subnet/supernet.h"

namespace amoeba {
using nlohmann::json;

const DepthEntry* SupernetSpec::FindDepth(int64_t d) const {
  for (const auto& e : depth_table)
    if (e.depth == d) return &e;
  return nullptr;
}

const WidthEntry* SupernetSpec::FindWidth(double w) const {
  for (const auto& e : width_table)
    if (std::abs(e.ratio - w) < 1e-6) return &e;
  return nullptr;
}

ShapeRecord* SupernetSpec::FindRecord(const Shape& sh) {
  for (auto& r : profile)
    if (r.shape.depth == sh.depth && std::abs(r.shape.width - sh.width) < 1e-6) return &r;
  return nullptr;
}

const ShapeRecord* SupernetSpec::FindRecord(const Shape& sh) const {
  return const_cast<SupernetSpec*>(this)->FindRecord(sh);
}

json SupernetSpec::ToJson() const {
  json j;
  j["format"] = "amoeba-supernet";
  j["version"] = 1;
  j["grid"] = {{"depths", depths}, {"widths", widths}};
  j["metric"] = metric;
  j["depth_table"] = json::array();
  for (const auto& d : depth_table) {
    json e = {{"depth", d.depth},
              {"layers", d.layers},
              {"metric", d.metric},
              {"baselines", json::object()}};
    for (const auto& [name, b] : d.baselines)
      e["baselines"][name] = {{"layers", b.first}, {"metric", b.second}};
    j["depth_table"].push_back(e);
  }
  j["width_table"] = json::array();
  for (const auto& w : width_table) {
    j["width_table"].push_back({{"ratio", w.ratio},
                                {"kv_groups", w.alloc.kv_groups},
                                {"channels", w.alloc.channels},
                                {"params", w.alloc.params}});
  }
  j["calibration"] = calibration;
  j["profile"] = json::array();
  for (const auto& r : profile) {
    json e = {{"depth", r.shape.depth}, {"width", r.shape.width}, {"params", r.params}};
    if (r.heldout_perplexity) e["heldout_perplexity"] = *r.heldout_perplexity;
    if (r.decode_ms_per_token) e["decode_ms_per_token"] = *r.decode_ms_per_token;
    if (r.mc_accuracy) e["mc_accuracy"] = *r.mc_accuracy;
    e["adapters"] = r.adapters;
    if (r.check_ms_per_extra_token) e["check_ms_per_extra_token"] = *r.check_ms_per_extra_token;
    if (!r.draft_runs.empty()) e["draft_runs"] = r.draft_runs;
    if (!r.decode_ms_by_dtype.empty()) e["decode_ms_by_dtype"] = r.decode_ms_by_dtype;
    j["profile"].push_back(e);
  }
  j["smol"] = smol;
  return j;
}

namespace {

// A field of the wrong type or range; FromJson turns it into DATA_LOSS naming the field.
struct SpecError {
  std::string message;
};

[[noreturn]] void Fail(const std::string& where, const std::string& why) {
  throw SpecError{absl::StrCat(where, ": ", why)};
}

const json& At(const json& obj, const std::string& key, const std::string& where) {
  if (!obj.is_object()) Fail(where, "must be an object");
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) Fail(absl::StrCat(where, ".", key), "missing");
  return *it;
}

int64_t Int(const json& v, const std::string& where, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) Fail(where, "must be an integer");
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) Fail(where, absl::StrCat(x, " outside [", lo, ", ", hi, "]"));
  return x;
}

double Number(const json& v, const std::string& where) {
  if (!v.is_number()) Fail(where, "must be a number");
  const double x = v.get<double>();
  if (!std::isfinite(x)) Fail(where, "must be finite");
  return x;
}

std::vector<int64_t> IntList(const json& v, const std::string& where, int64_t lo, int64_t hi) {
  if (!v.is_array()) Fail(where, "must be a list");
  std::vector<int64_t> out;
  for (size_t i = 0; i < v.size(); ++i)
    out.push_back(Int(v[i], absl::StrCat(where, "[", i, "]"), lo, hi));
  return out;
}

std::vector<int> LayerList(const json& v, const std::string& where, int64_t L) {
  std::vector<int> out;
  for (int64_t l : IntList(v, where, 0, L - 1)) {
    if (!out.empty() && l <= out.back()) Fail(where, "layers must be ascending, without repeats");
    out.push_back(static_cast<int>(l));
  }
  return out;
}

std::optional<double> Positive(const json& obj, const char* key, const std::string& where) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return std::nullopt;
  const double x = Number(*it, absl::StrCat(where, ".", key));
  if (!(x > 0)) Fail(absl::StrCat(where, ".", key), "must be > 0");
  return x;
}

}  // namespace

absl::StatusOr<SupernetSpec> SupernetSpec::FromJson(const json& j, int64_t L) {
  if (!j.is_object() || !j.contains("format") || j["format"] != "amoeba-supernet")
    return absl::DataLossError("amoeba.json: not an Amoeba supernet file");
  SupernetSpec s;
  try {
    const json& grid = At(j, "grid", "grid");
    s.depths = IntList(At(grid, "depths", "grid"), "grid.depths", 1, L);
    const json& widths = At(grid, "widths", "grid");
    if (!widths.is_array()) Fail("grid.widths", "must be a list");
    for (size_t i = 0; i < widths.size(); ++i) {
      const double w = Number(widths[i], absl::StrCat("grid.widths[", i, "]"));
      if (!(w > 0 && w <= 1)) Fail(absl::StrCat("grid.widths[", i, "]"), "must be in (0, 1]");
      s.widths.push_back(w);
    }
    if (s.depths.empty() || s.widths.empty()) Fail("grid", "empty");
    for (size_t i = 1; i < s.depths.size(); ++i)
      if (s.depths[i] <= s.depths[i - 1]) Fail("grid.depths", "must be ascending, without repeats");
    for (size_t i = 1; i < s.widths.size(); ++i)
      if (s.widths[i] >= s.widths[i - 1])
        Fail("grid.widths", "must be descending, without repeats");
    if (s.widths.front() != 1.0) Fail("grid.widths", "must start with 1");
    if (j.contains("metric")) {
      if (!j["metric"].is_string()) Fail("metric", "must be a string");
      s.metric = j["metric"].get<std::string>();
    }
    const json& dt = At(j, "depth_table", "amoeba.json");
    if (!dt.is_array()) Fail("depth_table", "must be a list");
    for (size_t i = 0; i < dt.size(); ++i) {
      const std::string where = absl::StrCat("depth_table[", i, "]");
      DepthEntry d;
      d.depth = Int(At(dt[i], "depth", where), where + ".depth", 1, L);
      d.layers = LayerList(At(dt[i], "layers", where), where + ".layers", L);
      if (static_cast<int64_t>(d.layers.size()) != d.depth)
        Fail(where + ".layers",
             absl::StrCat("lists ", d.layers.size(), " layers for depth ", d.depth));
      if (dt[i].contains("metric")) d.metric = Number(dt[i]["metric"], where + ".metric");
      if (dt[i].contains("baselines")) {
        const json& b = dt[i]["baselines"];
        if (!b.is_object()) Fail(where + ".baselines", "must be an object");
        for (auto& [name, e] : b.items()) {
          const std::string bw = absl::StrCat(where, ".baselines.", name);
          d.baselines[name] = {LayerList(At(e, "layers", bw), bw + ".layers", L),
                               e.contains("metric") ? Number(e["metric"], bw + ".metric") : 0.0};
        }
      }
      if (s.FindDepth(d.depth)) Fail(where, absl::StrCat("depth ", d.depth, " listed twice"));
      s.depth_table.push_back(std::move(d));
    }
    const json& wt = At(j, "width_table", "amoeba.json");
    if (!wt.is_array()) Fail("width_table", "must be a list");
    for (size_t i = 0; i < wt.size(); ++i) {
      const std::string where = absl::StrCat("width_table[", i, "]");
      WidthEntry w;
      w.ratio = Number(At(wt[i], "ratio", where), where + ".ratio");
      if (!(w.ratio > 0 && w.ratio <= 1)) Fail(where + ".ratio", "must be in (0, 1]");
      constexpr int64_t kBig = int64_t{1} << 24;
      w.alloc.kv_groups = IntList(At(wt[i], "kv_groups", where), where + ".kv_groups", 1, kBig);
      w.alloc.channels = IntList(At(wt[i], "channels", where), where + ".channels", 1, kBig);
      if (wt[i].contains("params"))
        w.alloc.params = Int(wt[i]["params"], where + ".params", 0, int64_t{1} << 50);
      if (static_cast<int64_t>(w.alloc.kv_groups.size()) != L ||
          static_cast<int64_t>(w.alloc.channels.size()) != L)
        Fail(where, absl::StrCat("kv_groups and channels need ", L, " entries (one per layer)"));
      if (s.FindWidth(w.ratio)) Fail(where, absl::StrCat("width ", w.ratio, " listed twice"));
      s.width_table.push_back(std::move(w));
    }
    if (j.contains("calibration")) s.calibration = j["calibration"];
    if (j.contains("smol") && !j["smol"].is_null()) {
      const json& sm = j["smol"];
      if (!sm.is_object()) Fail("smol", "must be an object or null");
      if (sm.contains("experts")) {
        Int(sm["experts"], "smol.experts", 1, 1024);
        Int(At(sm, "rank", "smol"), "smol.rank", 1, int64_t{1} << 20);
      }
      s.smol = sm;
    }
    for (int64_t d : s.depths)
      if (!s.FindDepth(d))
        Fail("grid.depths", absl::StrCat("depth ", d, " has no depth_table entry"));
    for (double w : s.widths)
      if (!s.FindWidth(w))
        Fail("grid.widths", absl::StrCat("width ", w, " has no width_table entry"));
    if (j.contains("profile")) {
      const json& pr = j["profile"];
      if (!pr.is_array()) Fail("profile", "must be a list");
      for (size_t i = 0; i < pr.size(); ++i) {
        const std::string where = absl::StrCat("profile[", i, "]");
        ShapeRecord r;
        r.shape.depth = Int(At(pr[i], "depth", where), where + ".depth", 1, L);
        r.shape.width = Number(At(pr[i], "width", where), where + ".width");
        if (!s.FindDepth(r.shape.depth) || !s.FindWidth(r.shape.width))
          Fail(where, absl::StrCat("shape ", r.shape.ToString(), " is not on the grid"));
        if (s.FindRecord(r.shape)) Fail(where, absl::StrCat(r.shape.ToString(), " listed twice"));
        if (pr[i].contains("params"))
          r.params = Int(pr[i]["params"], where + ".params", 0, int64_t{1} << 50);
        r.heldout_perplexity = Positive(pr[i], "heldout_perplexity", where);
        r.decode_ms_per_token = Positive(pr[i], "decode_ms_per_token", where);
        if (pr[i].contains("mc_accuracy")) {
          r.mc_accuracy = Number(pr[i]["mc_accuracy"], where + ".mc_accuracy");
          if (*r.mc_accuracy < 0 || *r.mc_accuracy > 1)
            Fail(where + ".mc_accuracy", "must be in [0, 1]");
        }
        if (pr[i].contains("check_ms_per_extra_token")) {
          r.check_ms_per_extra_token =
              Number(pr[i]["check_ms_per_extra_token"], where + ".check_ms_per_extra_token");
          if (*r.check_ms_per_extra_token < 0)
            Fail(where + ".check_ms_per_extra_token", "must be >= 0");
        }
        if (pr[i].contains("decode_ms_by_dtype")) {
          const json& by = pr[i]["decode_ms_by_dtype"];
          if (!by.is_object()) Fail(where + ".decode_ms_by_dtype", "must be an object");
          for (const auto& [name, ms] : by.items()) {
            const std::string at = where + ".decode_ms_by_dtype[\"" + name + "\"]";
            if (!ParseWeightFormat(name).ok()) Fail(at, "not a weight format");
            r.decode_ms_by_dtype[name] = Number(ms, at);
            if (!(r.decode_ms_by_dtype[name] > 0)) Fail(at, "must be > 0");
          }
        }
        if (pr[i].contains("draft_runs")) {
          const json& runs = pr[i]["draft_runs"];
          if (!runs.is_object()) Fail(where + ".draft_runs", "must be an object");
          for (const auto& [key, hist] : runs.items()) {
            const std::string at = where + ".draft_runs[\"" + key + "\"]";
            auto d = Shape::Parse(key, L);
            if (!d.ok() || !s.FindDepth(d->depth) || !s.FindWidth(d->width))
              Fail(at, "not a grid shape");
            if (!hist.is_array() || hist.empty() || hist.size() > 64)
              Fail(at, "must be a list of 1..64 probabilities");
            std::vector<double> h;
            for (size_t b = 0; b < hist.size(); ++b) {
              h.push_back(Number(hist[b], at));
              if (h.back() < 0 || h.back() > 1) Fail(at, "probabilities must be in [0, 1]");
            }
            r.draft_runs[d->ToString()] = h;
          }
        }
        if (pr[i].contains("adapters")) {
          if (!pr[i]["adapters"].is_boolean()) Fail(where + ".adapters", "must be true or false");
          r.adapters = pr[i]["adapters"].get<bool>();
        }
        s.profile.push_back(r);
      }
    }
  } catch (const SpecError& e) {
    return absl::DataLossError("amoeba.json: " + e.message);
  } catch (const json::exception& e) {
    return absl::DataLossError(absl::StrCat("amoeba.json: ", e.what()));
  }
  return s;
}

Supernet::Supernet(Model permuted, SupernetSpec spec, std::vector<at::Tensor> o_mean,
                   std::vector<at::Tensor> down_mean)
    : base_(std::move(permuted)),
      spec_(std::move(spec)),
      o_mean_(std::move(o_mean)),
      down_mean_(std::move(down_mean)) {}

}  // namespace amoeba
