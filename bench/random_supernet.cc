#include "bench/random_supernet.h"

#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"

#include "model/presets.h"
#include "model/weights.h"
#include "subnet/calibrate.h"

namespace amoeba::bench {

absl::StatusOr<RandomSupernetFlags> ParseRandomSupernetFlags(const std::string& preset,
                                                             const std::string& weights_dtype) {
  const auto format = ParseWeightFormat(weights_dtype);
  if (!format.ok())
    return absl::InvalidArgumentError(absl::StrCat("--weights-dtype: ", format.status().message()));
  auto cfg = PresetConfig(preset);
  if (!cfg.ok())
    return absl::InvalidArgumentError(absl::StrCat("--preset: ", cfg.status().message()));
  return RandomSupernetFlags{*std::move(cfg), *format};
}

absl::StatusOr<std::unique_ptr<Supernet>> RandomSupernet(const ModelConfig& cfg,
                                                         const std::vector<double>& widths,
                                                         double min_depth_ratio,
                                                         WeightFormat format) {
  Model model = RandomModel(cfg, 0);
  at::manual_seed(1);
  at::Tensor windows = at::randint(cfg.vocab_size, {4, 64}, at::kLong);
  CalibrateOptions co;
  co.widths = widths;
  co.min_depth_ratio = min_depth_ratio;
  co.windows = 4;
  co.window_len = 64;
  co.dp_windows = 2;
  auto built = BuildSupernet(std::move(model), windows, windows.narrow(0, 0, 2), co);
  if (!built.ok()) return built.status();
  built->supernet->PackBaseWeights(format);  // decode from panels, as the server does
  return std::move(built->supernet);
}

}  // namespace amoeba::bench
