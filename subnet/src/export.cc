#include "subnet/export.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "model/file_util.h"
#include "model/gguf_model.h"
#include "model/status_macros.h"

namespace amoeba {
namespace fs = std::filesystem;

SubnetOptions SubnetOptionsForExport(const ExportOptions& o) {
  SubnetOptions so;
  so.adapters = o.adapters ? AdapterMode::kMerged : AdapterMode::kNone;
  so.uniform_width = o.uniform_width;
  return so;
}

absl::StatusOr<Model> SubnetForExport(const Supernet& s, const Smol* smol, const Shape& shape,
                                      const ExportOptions& o) {
  ASSIGN_OR_RETURN(Model m, BuildSubnet(s, smol, shape, SubnetOptionsForExport(o)));
  if (!o.uniform_width) return m;
  // Standard HF Llama: one kv-head count and intermediate size for all layers, and biases on all
  // attention (resp. MLP) projections once any of them has one.
  const int64_t H = m.config.hidden_size;
  m.config.num_key_value_heads = m.layers.front().kv_heads(m.config.head_dim);
  m.config.num_attention_heads = m.config.num_key_value_heads * s.base().config.group_size();
  m.config.intermediate_size = m.layers.front().intermediate();
  m.config.layer_kv_heads.clear();
  m.config.layer_intermediate.clear();
  bool attn_bias = false, mlp_bias = false;
  for (const auto& l : m.layers) {
    attn_bias |= l.o_bias.defined() || l.q_bias.defined();
    mlp_bias |= l.down_bias.defined() || l.gate_bias.defined();
  }
  for (auto& l : m.layers) {
    auto fill = [](at::Tensor& b, int64_t n) {
      if (!b.defined()) b = at::zeros({n});
    };
    if (attn_bias) {
      fill(l.q_bias, l.q.size(0));
      fill(l.k_bias, l.k.size(0));
      fill(l.v_bias, l.v.size(0));
      fill(l.o_bias, H);
    }
    if (mlp_bias) {
      fill(l.gate_bias, l.gate.size(0));
      fill(l.up_bias, l.up.size(0));
      fill(l.down_bias, H);
    }
  }
  m.config.attention_bias = attn_bias;
  m.config.mlp_bias = mlp_bias;
  return m;
}

absl::Status ParseExportFormat(std::string_view format, std::string_view dtype, ExportOptions& o) {
  if (format == "gguf") {
    auto f = ParseWeightFormat(dtype.empty() ? "f16" : dtype);
    if (!f.ok())
      return absl::InvalidArgumentError("dtype: f32, f16, q8_0 or q4_0 for a GGUF export");
    o.format = ExportOptions::Format::kGguf;
    o.gguf_dtype = *f;
    return absl::OkStatus();
  }
  if (!format.empty() && format != "hf") return absl::InvalidArgumentError("format: hf or gguf");
  o.format = ExportOptions::Format::kHf;
  if (dtype == "f16") {
    o.dtype = at::kHalf;
  } else if (dtype == "bf16") {
    o.dtype = at::kBFloat16;
  } else if (dtype.empty() || dtype == "f32") {
    o.dtype = at::kFloat;
  } else {
    return absl::InvalidArgumentError("dtype: f32, f16 or bf16 for an hf export (q8_0/q4_0: gguf)");
  }
  return absl::OkStatus();
}

absl::Status WriteGgufExport(const Supernet& s, const Model& subnet, const Shape& shape,
                             const std::string& path, WeightFormat format) {
  GgufExportOptions o;
  o.format = format;
  o.name = absl::StrCat("amoeba-", shape.ToString());
  o.tokenizer_dir = s.dir();
  return SaveGguf(subnet, path, o);
}

absl::Status WriteExport(const Supernet& s, const Model& subnet, const std::string& out_dir,
                         const ExportOptions& o) {
  const std::string tmp = out_dir + ".tmp-export";
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", tmp, ": ", ec.message()));
  absl::Status st = SaveModel(subnet, tmp, o.dtype);
  if (st.ok() && !s.dir().empty()) st = CopyTokenizerFiles(s.dir(), tmp);
  if (st.ok()) st = ReplaceDirectory(tmp, out_dir);
  if (!st.ok()) fs::remove_all(tmp, ec);
  return st;
}

}  // namespace amoeba
