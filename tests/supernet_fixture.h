// A small calibrated supernet (5 layers, byte tokenizer) and random SMoL adapters for it: what
// the server tests serve. No protocol library: the serving-core tests use it too.
#pragma once
#include <ATen/ATen.h>

#include <fstream>
#include <functional>
#include <memory>

#include "lora/smol.h"
#include "model/presets.h"
#include "subnet/calibrate.h"
#include "subnet/supernet.h"
#include "tests/test_util.h"

namespace amoeba::testing {

// `edit_config` (may be null) changes the model's config.json before calibration.
inline std::unique_ptr<Supernet> MakeTestSupernet(
    const TempDir& dir, const std::function<void(ModelConfig&)>& edit_config = nullptr) {
  ModelConfig c = TinyConfig();
  c.num_hidden_layers = 5;
  c.vocab_size = 259;
  if (edit_config) edit_config(c);
  Model m = RandomModel(c, 11, 0.3);
  MustOk(SaveModel(m, dir.file("model")), "save model");
  MustOk(WriteByteTokenizer(dir.file("model")), "tokenizer");
  std::ofstream(dir.file("calib.txt"))
      << std::string(300, 'a') << " some calibration text for the test server.";
  CalibrateOptions o;
  o.model_dir = dir.file("model");
  o.out_dir = dir.file("super");
  o.data_path = dir.file("calib.txt");
  o.windows = 4;
  o.window_len = 32;
  o.dp_windows = 2;
  return MustOk(Calibrate(o), "calibrate");
}

// Random adapters with non-zero B, so a shape's output differs with and without them.
inline std::unique_ptr<Smol> MakeTestAdapters(const Supernet& supernet) {
  SmolConfig sc;
  sc.rank = 4;
  auto smol = std::make_unique<Smol>(supernet.base(),
                                     static_cast<int64_t>(supernet.spec().widths.size()), sc, 5);
  for (auto& [n, t] : smol->NamedParameters())
    if (n.find("lora_B") != std::string::npos) t.copy_(at::randn_like(t) * 0.2);
  return smol;
}

}  // namespace amoeba::testing
