// Hand-computed checks of RoPE, RMSNorm and the linear kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <ctime>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>

#include "model/kernels.h"
#include "model/packed_linear.h"
#include "model/quantized_panels.h"
#include "model/rope.h"
#include "model/src/decode_attention.h"
#include "model/src/prefill_attention.h"
#include "model/src/quantized_block.h"
#include "model/src/stream_prefetch.h"
#include "model/step_profile.h"
#include "model/team.h"
#include "model/torch_forward.h"
#include "tests/test_util.h"

namespace amoeba {
namespace ops_test {  // named: a unity build joins test files

ModelConfig RopeConfig(int64_t head_dim, double theta) {
  ModelConfig c = testing::TinyConfig();
  c.head_dim = head_dim;
  c.rope_theta = theta;
  return c;
}

TEST(RopeTest, RotateHalfConventionByHand) {
  // head_dim 4, theta 100: inv_freq = [1, 100^-0.5 = 0.1]. Pairs are (x0, x2) and (x1, x3) —
  // rotate-half — not adjacent (x0, x1) as in the interleaved (GPT-J) convention.
  RopeTable t(RopeConfig(4, 100.0), 8);
  float x[4] = {1.f, 2.f, 3.f, 4.f};
  const int64_t pos = 3;
  ApplyRope(x, 1, 4, t, pos);
  const double a0 = pos * 1.0, a1 = pos * 0.1;
  EXPECT_NEAR(x[0], 1 * std::cos(a0) - 3 * std::sin(a0), 1e-5);
  EXPECT_NEAR(x[2], 3 * std::cos(a0) + 1 * std::sin(a0), 1e-5);
  EXPECT_NEAR(x[1], 2 * std::cos(a1) - 4 * std::sin(a1), 1e-5);
  EXPECT_NEAR(x[3], 4 * std::cos(a1) + 2 * std::sin(a1), 1e-5);
  // Position 0 is the identity.
  float y[4] = {1.f, 2.f, 3.f, 4.f};
  ApplyRope(y, 1, 4, t, 0);
  EXPECT_FLOAT_EQ(y[1], 2.f);
  EXPECT_FLOAT_EQ(y[3], 4.f);
}

TEST(RopeTest, TorchAndKernelAgree) {
  ModelConfig c = RopeConfig(8, 10000.0);
  RopeTable t(c, 16);
  at::Tensor x = at::randn({1, 2, 5, 8});  // [B, heads, T, hd]
  at::Tensor pos = at::arange(5, at::kLong).to(at::kFloat);
  at::Tensor f = at::outer(pos, RopeInvFreq(c)).unsqueeze(0);
  at::Tensor ref = ApplyRopeTorch(x, f.cos(), f.sin());
  at::Tensor k = x.clone();
  for (int64_t p = 0; p < 5; ++p)
    for (int64_t h = 0; h < 2; ++h) ApplyRope(k[0][h][p].data_ptr<float>(), 1, 8, t, p);
  EXPECT_LT(testing::MaxAbsDiff(k, ref), 1e-6);
}

TEST(RopeTest, LinearScalingDividesFrequencies) {
  ModelConfig c = RopeConfig(8, 10000.0);
  at::Tensor base = RopeInvFreq(c);
  c.rope_scaling.type = RopeScaling::Type::kLinear;
  c.rope_scaling.factor = 4.0;
  EXPECT_LT(testing::MaxAbsDiff(RopeInvFreq(c), base / 4.0), 1e-9);
}

TEST(RopeTest, Llama3ScalingByHand) {
  // head_dim 8, theta 500000: inv_freq_i = 500000^(-i/4), i = 0..3.
  ModelConfig c = RopeConfig(8, 500000.0);
  c.rope_scaling.type = RopeScaling::Type::kLlama3;
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 64;
  at::Tensor inv = RopeInvFreq(c);
  const double low_wl = 64.0, high_wl = 16.0;
  for (int i = 0; i < 4; ++i) {
    const double f = std::pow(500000.0, -i / 4.0);
    const double wl = 2 * M_PI / f;
    double expect;
    if (wl < high_wl) {
      expect = f;  // high frequency: unchanged
    } else if (wl > low_wl) {
      expect = f / 8.0;  // low frequency: scaled
    } else {
      const double s = (64.0 / wl - 1.0) / (4.0 - 1.0);
      expect = (1 - s) * f / 8.0 + s * f;
    }
    EXPECT_NEAR(inv[i].item<double>(), expect, 1e-6 * std::max(1.0, expect)) << "i=" << i;
  }
}

TEST(RmsNormTest, ByHand) {
  // x = [1, 2, 3, 4]: mean square 7.5.
  float x[4] = {1, 2, 3, 4}, w[4] = {1, 0.5f, 2, 1}, out[4];
  RmsNorm(x, w, 1, 4, 1e-6, out);
  const double r = 1.0 / std::sqrt(7.5 + 1e-6);
  EXPECT_NEAR(out[0], 1 * r * 1, 1e-6);
  EXPECT_NEAR(out[1], 2 * r * 0.5, 1e-6);
  EXPECT_NEAR(out[2], 3 * r * 2, 1e-6);
  at::Tensor t =
      RmsNormTorch(at::tensor({1.f, 2.f, 3.f, 4.f}), at::tensor({1.f, 0.5f, 2.f, 1.f}), 1e-6);
  EXPECT_NEAR(t[3].item<float>(), 4 * r, 1e-6);
}

// The instruction sets this CPU can run (each test covers all of them, not only the best).
std::vector<KernelIsa> AvailableIsas() {
  std::vector<KernelIsa> isas;
  for (KernelIsa isa : {KernelIsa::kScalar, KernelIsa::kAvx2, KernelIsa::kAvx512}) {
    ForceKernelIsa(isa);
    if (ActiveKernelIsa() == isa) isas.push_back(isa);
  }
  ForceKernelIsa(KernelIsa::kAuto);
  return isas;
}

// For every batch size: `run(x, n, y)` writes y [n, out] equal to `ref(x)` within 1e-5 relative;
// x is random [n, in]; `what` names the kernel in failures.
template <typename Run, typename Ref>
void ExpectMatches(const std::string& what, int64_t out, int64_t in,
                   const std::vector<int64_t>& batches, Run run, Ref ref) {
  for (int64_t n : batches) {
    at::Tensor x = at::randn({n, in});
    at::Tensor y = at::full({n, out}, 7.f);
    run(x.data_ptr<float>(), n, y.data_ptr<float>());
    at::Tensor want = ref(x);
    const double rel = testing::MaxAbsDiff(y, want) / want.abs().max().item<double>();
    EXPECT_LT(rel, 1e-5) << what << " " << out << "x" << in << " n=" << n;
  }
}

// The same under every ISA the CPU has.
template <typename Run, typename Ref>
void ExpectEveryIsaMatches(int64_t out, int64_t in, const std::vector<int64_t>& batches, Run run,
                           Ref ref) {
  for (KernelIsa isa : AvailableIsas()) {
    ForceKernelIsa(isa);
    ExpectMatches(KernelIsaName(isa), out, in, batches, run, ref);
  }
  ForceKernelIsa(KernelIsa::kAuto);
}

std::vector<int64_t> Batches1To33() {
  std::vector<int64_t> b;
  for (int64_t n = 1; n <= 33; ++n) b.push_back(n);
  return b;
}

// Every path (GEMV, skinny, GEMM) × instruction set on odd sizes, prefix (strided) weights,
// batch 1..33.
TEST(KernelTest, LinearMatchesTorchOnOddSizesAndPrefixViews) {
  at::manual_seed(0);
  for (auto [out, in] :
       std::vector<std::pair<int64_t, int64_t>>{{37, 29}, {5, 131}, {64, 70}, {129, 3}, {50, 47}}) {
    at::Tensor full = at::randn({out + 7, in + 11});
    at::Tensor W = full.narrow(0, 0, out).narrow(1, 0, in);  // prefix view, row stride in+11
    at::Tensor bias = at::randn({out});
    ExpectEveryIsaMatches(
        out, in, Batches1To33(),
        [&](const float* x, int64_t n, float* y) { Linear(x, n, W, bias.data_ptr<float>(), y); },
        [&](const at::Tensor& x) { return at::linear(x, W, bias); });
  }
}

}  // namespace ops_test
}  // namespace amoeba

namespace amoeba {
namespace ops_test {

// fp16 weights: equal to the fp32 product with the half-rounded weights (the fp16 reference).
TEST(KernelTest, HalfWeightsMatchTheRoundedReference) {
  at::manual_seed(1);
  for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{{37, 29}, {64, 70}, {129, 3}}) {
    at::Tensor full = at::randn({out + 5, in + 9}).to(at::kHalf);
    at::Tensor W = full.narrow(0, 0, out).narrow(1, 0, in);  // prefix view of half weights
    at::Tensor Wf = W.to(at::kFloat);
    // 1..33 (GEMV, skinny) and prefill sizes (blocks of 128 inputs through the skinny kernel).
    ExpectEveryIsaMatches(
        out, in, {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 127, 128, 129, 300},
        [&](const float* x, int64_t n, float* y) { Linear(x, n, W, nullptr, y); },
        [&](const at::Tensor& x) { return at::linear(x, Wf); });
  }
}

}  // namespace ops_test
}  // namespace amoeba

namespace amoeba {
namespace ops_test {

// Packed panels (fp32 and fp16): equal to torch::linear on the prefix of the packed matrix, for
// odd sizes (panel tails), prefixes in both dimensions, batch 1..33 (every input-group width),
// every ISA.
TEST(KernelTest, PackedPanelsMatchTorchOnPrefixes) {
  at::manual_seed(2);
  for (auto [out, in] :
       std::vector<std::pair<int64_t, int64_t>>{{37, 29}, {5, 131}, {64, 70}, {129, 3}, {16, 16}}) {
    at::Tensor full = at::randn({out + 7, in + 11});
    at::Tensor panels = PackPanels(full);
    at::Tensor W = full.narrow(0, 0, out).narrow(1, 0, in);
    at::Tensor bias = at::randn({out});
    ExpectEveryIsaMatches(
        out, in, Batches1To33(),
        [&](const float* x, int64_t n, float* y) {
          LinearPacked(x, n, panels, out, in, bias.data_ptr<float>(), y);
        },
        [&](const at::Tensor& x) { return at::linear(x, W, bias); });
    // fp16 panels: equal to the product with the half-rounded weights.
    at::Tensor panels16 = PackPanels(full, WeightFormat::kF16);
    at::Tensor W16 = W.to(at::kHalf).to(at::kFloat);
    ExpectEveryIsaMatches(
        out, in, Batches1To33(),
        [&](const float* x, int64_t n, float* y) {
          LinearPacked(x, n, panels16, out, in, bias.data_ptr<float>(), y);
        },
        [&](const at::Tensor& x) { return at::linear(x, W16, bias); });
  }
}

// SiLU(a)·b under every ISA: within 3e-7 (relative) of the double-precision value, across the range
// the vector exp clamps (large |a| included), and each value independent of its place in the range
// (the decode rows must not depend on the batch).
TEST(KernelTest, SiluMulIsAccurateAndPositionIndependent) {
  at::manual_seed(9);
  const int64_t n = 1000;
  at::Tensor a = at::cat(
      {8 * at::randn({n - 8}), at::tensor({-200.f, -90.f, -88.f, -30.f, 0.f, 30.f, 89.f, 200.f})});
  at::Tensor b = at::randn({n});
  const at::Tensor ad = a.to(at::kDouble), want = (ad * at::sigmoid(ad) * b.to(at::kDouble));
  for (KernelIsa isa : AvailableIsas()) {
    ForceKernelIsa(isa);
    at::Tensor y = a.clone();
    SiluMul(y.data_ptr<float>(), b.data_ptr<float>(), n);
    const double err = ((y.to(at::kDouble) - want).abs() / (want.abs() + 1e-30))
                           .masked_fill(want.abs() < 1e-30, 0)
                           .max()
                           .item<double>();
    EXPECT_LT(err, 3e-7) << KernelIsaName(isa);  // measured 1.5e-7: ~1 ulp of fp32
    for (int64_t off : {1, 5, 13}) {             // the same values at other offsets and range ends
      at::Tensor z = a.narrow(0, off, 37).clone();
      SiluMul(z.data_ptr<float>(), b.data_ptr<float>() + off, 37);
      EXPECT_EQ(testing::MaxAbsDiff(z, y.narrow(0, off, 37)), 0.0) << KernelIsaName(isa) << off;
    }
  }
  ForceKernelIsa(KernelIsa::kAuto);
}

// Argmax under every ISA picks what the scalar rule picks (the first largest value, NaNs never):
// lengths around every vector width and a vocabulary, ties (the first wins), values only in the
// tails, NaN, ±inf, -0 next to +0, all NaN (0).
TEST(KernelTest, ArgmaxPicksTheFirstLargestUnderEveryIsa) {
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  auto reference = [](const std::vector<float>& x) {
    int64_t best = 0;
    for (size_t i = 0; i < x.size(); ++i)
      if (!std::isnan(x[i]) && (std::isnan(x[best]) || x[i] > x[best]))
        best = static_cast<int64_t>(i);
    return best;
  };
  std::mt19937 rng(11);
  std::vector<std::vector<float>> cases;
  for (int64_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 32000}) {
    std::uniform_int_distribution<int> small(-3, 3);  // many ties
    std::vector<float> x(n);
    for (float& v : x) v = static_cast<float>(small(rng));
    cases.push_back(x);
    x.assign(n, -1.f);  // the largest only at the end: in every tail
    x.back() = 2.f;
    cases.push_back(x);
    x.assign(n, 0.f);
    x[0] = nan;
    x[n / 2] = 1.f;
    cases.push_back(x);
  }
  cases.push_back({nan, nan, nan});
  cases.push_back({-inf, -inf, nan, -inf});
  cases.push_back({1.f, inf, 3.f, inf});
  cases.push_back({-0.f, 0.f, -1.f});
  cases.push_back({0.f, -0.f, -1.f});
  cases.push_back(std::vector<float>(40, nan));
  cases.back()[37] = -inf;
  for (KernelIsa isa : AvailableIsas()) {
    ForceKernelIsa(isa);
    for (const std::vector<float>& x : cases) {
      const int64_t n = static_cast<int64_t>(x.size());
      EXPECT_EQ(Argmax(x.data(), n), reference(x)) << KernelIsaName(isa) << " n=" << n;
    }
    EXPECT_EQ(Argmax(nullptr, 0), 0) << KernelIsaName(isa);
  }
  ForceKernelIsa(KernelIsa::kAuto);
}

// Q8_0 / Q4_0 panels: the integer kernels equal the fp32 product of the dequantized weights and
// the quantized-then-dequantized activations (what they compute exactly, up to fp32 rounding), on
// odd sizes (panel and block tails), prefixes in both dimensions (input prefixes that end inside
// a block), batch 1..33 plus the 64-row chunk boundaries, every kernel the CPU has (scalar, AVX2
// maddubs, AVX-VNNI, AVX512-VNNI); and stay close to the unquantized product.
TEST(KernelTest, QuantizedPanelsMatchTheDequantizedReference) {
  at::manual_seed(4);
  std::vector<int64_t> batches = Batches1To33();
  for (int64_t n : {63, 64, 65, 130}) batches.push_back(n);
  for (WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{
             {37, 29}, {5, 131}, {64, 70}, {129, 3}, {16, 32}, {48, 96}}) {
      at::Tensor full = at::randn({out + 7, in + 11});
      at::Tensor panels = PackPanels(full, format);
      EXPECT_EQ(PanelsFormat(panels), format);
      at::Tensor Wq = DequantizePanels(panels, out, in);
      at::Tensor W = full.narrow(0, 0, out).narrow(1, 0, in);
      at::Tensor bias = at::randn({out});
      for (QuantKernel kernel : AvailableQuantKernels()) {
        ForceQuantKernel(kernel);
        ExpectMatches(
            std::string(QuantKernelName(kernel)) + " " + WeightFormatName(format), out, in, batches,
            [&](const float* x, int64_t n, float* y) {
              LinearPacked(x, n, panels, out, in, bias.data_ptr<float>(), y);
            },
            [&](const at::Tensor& x) {
              return at::linear(QuantizeDequantizeActivations(x), Wq, bias);
            });
      }
      ForceQuantKernel(QuantKernel::kAuto);
      // Close to the unquantized product: Q8_0 within ~1%, Q4_0 within ~10% of the scale.
      at::Tensor x = at::randn({3, in});
      at::Tensor y = at::empty({3, out});
      LinearPacked(x.data_ptr<float>(), 3, panels, out, in, nullptr, y.data_ptr<float>());
      at::Tensor exact = at::linear(x, W);
      const double rel = testing::MaxAbsDiff(y, exact) / exact.abs().max().item<double>();
      EXPECT_LT(rel, format == WeightFormat::kQ8_0 ? 0.03 : 0.3)
          << WeightFormatName(format) << " " << out << "x" << in;
      EXPECT_GT(rel, 0.0);  // it did quantize
    }
  }
}

// GGML's block rules, value by value: Q8_0 d = amax / 127, q = round(x / d); Q4_0 d = (the
// value of largest magnitude) / -8, q = min(15, trunc(x / d + 8.5)), so the largest-magnitude
// value is exact and its opposite clamps at 7·|d|; a block of zeros stays zero.
// The SIMD integer kernels (AVX2 maddubs, AVX-VNNI, AVX512-VNNI, with its own activation
// quantizer, AMX-int8 tiles for groups of 16 rows, a last partial group padded) sum the same
// integers and scale them in the same order: their outputs agree bit for bit, whatever the batch,
// on odd sizes and prefixes.
TEST(KernelTest, SimdQuantizedKernelsAgreeBitForBit) {
  std::vector<QuantKernel> simd;
  for (QuantKernel k : AvailableQuantKernels())
    if (k != QuantKernel::kScalar) simd.push_back(k);
  if (simd.size() < 2) GTEST_SKIP() << "fewer than two SIMD integer kernels on this CPU";
  at::manual_seed(6);
  for (WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0})
    for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{{37, 29}, {64, 70}, {48, 200}}) {
      at::Tensor full = at::randn({out + 5, in + 9});
      at::Tensor panels = PackPanels(full, format);
      // 3-15 rows past a multiple of 16 (q8_0; q4_0 from 10): the tile kernel pads the last group
      // and runs it in tiles (110: in the last of two 64-row chunks); 1-2 rows stay in VNNI.
      for (int64_t n : {1, 2, 3, 4, 5, 6, 8, 9, 10, 14, 16, 17, 19, 21, 30, 32, 33, 46, 50, 110}) {
        at::Tensor x = 3 * at::randn({n, in});
        std::vector<at::Tensor> ys;
        for (QuantKernel k : simd) {
          ForceQuantKernel(k);
          at::Tensor y = at::empty({n, out});
          LinearPacked(x.data_ptr<float>(), n, panels, out, in, nullptr, y.data_ptr<float>());
          ys.push_back(y);
        }
        for (size_t i = 1; i < simd.size(); ++i)
          EXPECT_EQ(testing::MaxAbsDiff(ys[i], ys[0]), 0.0)
              << QuantKernelName(simd[i]) << " vs " << QuantKernelName(simd[0]) << " "
              << WeightFormatName(format) << " " << out << "x" << in << " n=" << n;
      }
    }
  ForceQuantKernel(QuantKernel::kAuto);
}

// The AVX-512 kernels' row pairs (4+ rows, ForceRowPairs) give the bits of every row alone: odd
// counts (a last row paired with zero), several 8-row passes and 64-row chunks, panels that stop
// at an odd row (shared steps: a narrower shape's rows skip its wider panels, so a pair
// straddles the limit), and inside a team, whose members quantize and pair whole pairs each.
TEST(KernelTest, RowPairsGiveTheBitsOfRowsAlone) {
  std::vector<QuantKernel> kernels;
  for (QuantKernel k : AvailableQuantKernels())
    if (k == QuantKernel::kAvx512Vnni || k == QuantKernel::kAmxInt8) kernels.push_back(k);
  if (kernels.empty()) GTEST_SKIP() << "no AVX512-VNNI on this CPU";
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));
  at::manual_seed(12);
  for (WeightFormat format : {WeightFormat::kQ8_0, WeightFormat::kQ4_0})
    for (auto [out, in] : std::vector<std::pair<int64_t, int64_t>>{{37, 29}, {64, 70}, {48, 200}}) {
      const at::Tensor panels = PackPanels(at::randn({out + 5, in + 9}), format);
      for (int64_t n : {4, 5, 7, 8, 9, 11, 16, 17, 33, 64, 65, 130}) {
        const at::Tensor x = 3 * at::randn({n, in});
        // Panel p serves rows [0, n - 3p - 1): odd and even limits, one inside the first pair.
        std::vector<int64_t> limits;
        for (int64_t p = 0; p < (out + 15) / 16; ++p)
          limits.push_back(std::max<int64_t>(1, n - 3 * p - 1));
        for (QuantKernel kernel : kernels)
          for (bool in_team : {false, true})
            for (bool limited : {false, true}) {
              ForceQuantKernel(kernel);
              at::Tensor y[2];
              for (bool pairs : {true, false}) {
                ForceRowPairs(pairs);
                y[pairs] = at::zeros({n, out});
                const PackedOutput outs[1] = {{&panels, out, nullptr, y[pairs].data_ptr<float>(),
                                               limited ? limits.data() : nullptr}};
                auto run = [&] { QuantizedLinearMany(x.data_ptr<float>(), n, in, outs); };
                if (in_team)
                  RunInTeam(run);
                else
                  run();
              }
              EXPECT_EQ(testing::MaxAbsDiff(y[1], y[0]), 0.0)
                  << QuantKernelName(kernel) << " " << WeightFormatName(format) << " " << out << "x"
                  << in << " n=" << n << (in_team ? " in a team" : "")
                  << (limited ? " with panel limits" : "");
            }
      }
    }
  ForceRowPairs(true);
  ForceQuantKernel(QuantKernel::kAuto);
  at::set_num_threads(threads);
}

// Prefetch distances are bytes whatever the element type: the fp16 kernels prefetched 2 KB ahead
// (1024 elements) where 4 KB was meant.
TEST(KernelTest, PrefetchDistancesAreBytesForEveryElementType) {
  alignas(64) static char stream[8192];
  const auto* half = reinterpret_cast<const at::Half*>(stream);
  const auto* single = reinterpret_cast<const float*>(stream);
  const auto* block = reinterpret_cast<const uint8_t*>(stream);
  for (int arm : {1, 2}) {
    const int64_t bytes = PrefetchAheadBytes(arm);
    EXPECT_EQ(StreamAhead(half, bytes) - stream, bytes);
    EXPECT_EQ(StreamAhead(single, bytes) - stream, bytes);
    EXPECT_EQ(StreamAhead(block, bytes) - stream, bytes);
  }
  EXPECT_EQ(PrefetchAheadBytes(kDefaultPrefetchArm), 4096);
}

// The kernels without the software prefetch, near and far (an instantiation each) compute the
// same bits, in every format, on every instruction set the CPU has, one input and several.
TEST(KernelTest, EveryPrefetchArmGivesTheSameBits) {
  at::manual_seed(9);
  for (WeightFormat format :
       {WeightFormat::kF32, WeightFormat::kF16, WeightFormat::kQ8_0, WeightFormat::kQ4_0}) {
    const int64_t out = 53, in = 5000;  // several KB per panel row: the prefetch runs ahead
    at::Tensor panels = PackPanels(at::randn({out, in}), format);
    std::vector<int> paths;
    if (IsQuantized(format)) {
      for (QuantKernel k : AvailableQuantKernels()) paths.push_back(static_cast<int>(k));
    } else {
      for (KernelIsa isa : {KernelIsa::kScalar, KernelIsa::kAvx2, KernelIsa::kAvx512})
        paths.push_back(static_cast<int>(isa));
    }
    for (int path : paths) {
      if (IsQuantized(format)) {
        ForceQuantKernel(static_cast<QuantKernel>(path));
      } else {
        ForceKernelIsa(static_cast<KernelIsa>(path));
      }
      for (int64_t n : {1, 2, 5}) {
        at::Tensor x = at::randn({n, in});
        at::Tensor y[3] = {at::empty({n, out}), at::empty({n, out}), at::empty({n, out})};
        for (int arm = 0; arm < 3; ++arm) {
          ForceStreamPrefetch(static_cast<StreamPrefetch>(arm));
          EXPECT_EQ(StreamPrefetchArm(), arm);
          LinearPacked(x.data_ptr<float>(), n, panels, out, in, nullptr, y[arm].data_ptr<float>());
        }
        for (int arm = 1; arm < 3; ++arm)
          EXPECT_EQ(testing::MaxAbsDiff(y[arm], y[0]), 0.0)
              << WeightFormatName(format) << " path " << path << " n=" << n << " arm " << arm;
      }
    }
    ForceQuantKernel(QuantKernel::kAuto);
    ForceKernelIsa(KernelIsa::kAuto);
  }
  ForceStreamPrefetch(StreamPrefetch::kAuto);
}

// The trial takes the arms in turn (off, near, far; off, far for fp16 without AVX-512),
// decides for the fastest median after kPrefetchTrialSteps each, keeping the default (far)
// unless another arm is 3% faster, then hands out the choice; one trial per format and size
// class; a forcing or a scoped arm wins over it.
TEST(KernelTest, PrefetchTrialPicksTheFastestArm) {
  struct Case {
    WeightFormat format;
    double ms[3];  // off, near, far
    int want;
  };
  constexpr size_t kMid = size_t{64} << 20, kLarge = size_t{600} << 20;
  EXPECT_EQ(PrefetchTrialKey(WeightFormat::kQ8_0, size_t{16} << 20), -1) << "in the cache";
  EXPECT_NE(PrefetchTrialKey(WeightFormat::kQ8_0, kMid),
            PrefetchTrialKey(WeightFormat::kQ8_0, kLarge));
  EXPECT_NE(PrefetchTrialKey(WeightFormat::kQ8_0, kMid),
            PrefetchTrialKey(WeightFormat::kQ4_0, kMid));
  for (const Case& c : {Case{WeightFormat::kQ8_0, {0.95, 0.90, 1.0}, 1},
                        Case{WeightFormat::kQ8_0, {0.90, 0.95, 1.0}, 0},
                        Case{WeightFormat::kQ4_0, {0.99, 0.98, 1.0}, 2},
                        Case{WeightFormat::kF16, {0.90, 1.0, 1.0}, 0},
                        Case{WeightFormat::kF16, {0.99, 1.0, 1.0}, 2}}) {
    const WeightFormat f = c.format;
    const int key = PrefetchTrialKey(f, kMid), large = PrefetchTrialKey(f, kLarge);
    const std::string what = std::string(WeightFormatName(f)) + " want " + std::to_string(c.want);
    ResetPrefetchTrial(key);
    ResetPrefetchTrial(large);
    EXPECT_EQ(StreamPrefetchArm(), kDefaultPrefetchArm) << "outside a step: the default";
    const int arm_count = IsQuantized(f) || ActiveKernelIsa() == KernelIsa::kAvx512 ? 3 : 2;
    int arms[3] = {0, 0, 0};
    for (int step = 0; step < arm_count * kPrefetchTrialSteps; ++step) {
      EXPECT_EQ(PrefetchTrialChoice(key), -1) << what << " step " << step;
      bool on_trial = false;
      const int arm = PrefetchArmForStep(key, &on_trial);
      ASSERT_TRUE(on_trial && arm >= 0 && arm <= 2);
      ++arms[arm];
      // Every arm has outliers, so a mean-of-times rule and the median rule can disagree.
      const double ms = step % 7 == 3 ? 5.0 : c.ms[arm];
      RecordPrefetchTrial(key, arm, ms * 1e-3);
    }
    EXPECT_EQ(arms[0], kPrefetchTrialSteps) << what;
    EXPECT_EQ(arms[1], arm_count == 3 ? kPrefetchTrialSteps : 0) << what;
    EXPECT_EQ(arms[2], kPrefetchTrialSteps) << what;
    EXPECT_EQ(PrefetchTrialChoice(key), c.want) << what;
    EXPECT_EQ(PrefetchTrialChoice(large), -1) << what << ": the large class is on its own";
    bool on_trial = true;
    EXPECT_EQ(PrefetchArmForStep(key, &on_trial), c.want) << what;
    EXPECT_FALSE(on_trial) << what << ": decided";
    ForceStreamPrefetch(StreamPrefetch::kNear);
    EXPECT_EQ(PrefetchArmForStep(key, &on_trial), -1) << what << ": forced";
    EXPECT_EQ(StreamPrefetchArm(), 1);
    ForceStreamPrefetch(StreamPrefetch::kAuto);
    {
      ScopedPrefetchArm scoped(c.want);
      EXPECT_EQ(StreamPrefetchArm(), c.want) << what;
    }
    EXPECT_EQ(StreamPrefetchArm(), kDefaultPrefetchArm) << what;
    ResetPrefetchTrial(key);
  }
}

TEST(KernelTest, QuantizedBlocksFollowGgmlRules) {
  at::Tensor W = at::zeros({2, 64});
  const float vals[] = {-3.f, 1.5f, 0.2f, 3.f, -0.1f};
  for (int k = 0; k < 5; ++k) W[0][k] = vals[k];
  at::Tensor q4 = DequantizePanels(PackPanels(W, WeightFormat::kQ4_0), 2, 64);
  const float want4[] = {-3.f, 1.5f, 0.375f, 2.625f, 0.f};  // d = 0.375
  for (int k = 0; k < 5; ++k) EXPECT_FLOAT_EQ(q4[0][k].item<float>(), want4[k]) << k;
  EXPECT_EQ(q4.narrow(1, 32, 32).abs().sum().item<float>(), 0.f);
  EXPECT_EQ(q4[1].abs().sum().item<float>(), 0.f);
  at::Tensor q8 = DequantizePanels(PackPanels(W, WeightFormat::kQ8_0), 2, 64);
  const float d = static_cast<float>(at::Half(3.f / 127.f));
  for (int k = 0; k < 5; ++k)
    EXPECT_FLOAT_EQ(q8[0][k].item<float>(), d * std::round(vals[k] * 127.f / 3.f)) << k;
  EXPECT_EQ(q8[1].abs().sum().item<float>(), 0.f);
}

// The AVX-512 activation quantizer (sixteen blocks' maxima and sums reduced together) gives the
// portable one's bits: codes, scales and sums, over 1-200 blocks (groups of 16 and their tails),
// inputs that end inside a block, all-zero blocks and large values.
TEST(KernelTest, ActivationQuantizersAgreeBitForBit) {
  const std::vector<QuantKernel> kernels = AvailableQuantKernels();
  if (std::find(kernels.begin(), kernels.end(), QuantKernel::kAvx512Vnni) == kernels.end())
    GTEST_SKIP() << "no AVX512-VNNI";
  at::manual_seed(12);
  for (int64_t in : {5, 32, 33, 500, 512, 768, 1000, 2048, 6400}) {
    const int64_t n = 3, nb = (in + kQuantBlock - 1) / kQuantBlock;
    at::Tensor x = 4 * at::randn({n, in});
    x[1].narrow(0, 0, std::min<int64_t>(in, 40)).zero_();  // a zero block (and part of the next)
    x[2][in - 1] = 1e4f;
    std::vector<int8_t> q[2];
    std::vector<float> d[2];
    std::vector<int32_t> sum[2];
    for (int path = 0; path < 2; ++path) {
      q[path].assign(n * nb * kQuantBlock, 99);  // beyond `in`: both must write zeros
      d[path].assign(n * nb, -1.f);
      sum[path].assign(n * nb, -1);
      (path == 0 ? quant::QuantizeRows : quant::QuantizeRowsAvx512)(
          x.data_ptr<float>(), n, in, nb, q[path].data(), d[path].data(), sum[path].data());
    }
    EXPECT_EQ(q[1], q[0]) << "in=" << in;
    EXPECT_EQ(d[1], d[0]) << "in=" << in;
    EXPECT_EQ(sum[1], sum[0]) << "in=" << in;
    EXPECT_EQ(d[0][nb], 0.f) << "in=" << in;  // the zero block's scale
  }
}

}  // namespace ops_test
}  // namespace amoeba

namespace amoeba {
namespace ops_test {

// Decode attention equals softmax(q K^T · scale) V computed by libtorch (over fp32 and fp16 K/V),
// for head sizes with and without the AVX-512 path, GQA groups, and lengths around the 16-key
// window (tails, one key), on every ISA. The cache is position-major with room past the heads in
// each row; a call over a range of KV heads gives each head exactly what a call over that head
// alone gives (the engine splits the heads into tasks by the thread count).
TEST(KernelTest, DecodeAttentionMatchesSoftmaxReference) {
  at::manual_seed(3);
  const int64_t hkv = 3, pad = 16;  // row = hkv heads + pad floats
  for (int64_t hd : {16, 24, 64, 128}) {
    for (int64_t group : {1, 3}) {
      for (int64_t len : {1, 2, 15, 16, 17, 33, 100}) {
        const int64_t hq = hkv * group, rs = hkv * hd + pad;
        at::Tensor q = at::randn({hq, hd});
        at::Tensor rows_k = at::randn({len, rs}), rows_v = at::randn({len, rs});
        const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
        auto reference = [&](const at::Tensor& rk, const at::Tensor& rv) {
          at::Tensor want = at::empty({hq, hd});
          for (int64_t h = 0; h < hkv; ++h) {
            at::Tensor keys = rk.narrow(1, h * hd, hd), values = rv.narrow(1, h * hd, hd);
            at::Tensor qh = q.narrow(0, h * group, group);
            want.narrow(0, h * group, group)
                .copy_(at::matmul(at::softmax(at::matmul(qh, keys.t()) * scale, -1), values));
          }
          return want;
        };
        const at::Tensor want = reference(rows_k, rows_v);
        at::Tensor k16 = rows_k.to(at::kHalf), v16 = rows_v.to(at::kHalf);
        const at::Tensor want16 = reference(k16.to(at::kFloat), v16.to(at::kFloat));
        std::vector<float> scratch(hq * DecodeAttentionScratchPerHead(len), -1.f);
        for (KernelIsa isa : AvailableIsas()) {
          ForceKernelIsa(isa);
          const std::string where = std::string(KernelIsaName(isa)) + " hd=" + std::to_string(hd) +
                                    " group=" + std::to_string(group) +
                                    " len=" + std::to_string(len);
          at::Tensor out = at::full({hq, hd}, 7.f);
          DecodeAttention(q.data_ptr<float>(), hkv, group, rows_k.data_ptr<float>(),
                          rows_v.data_ptr<float>(), rs, len, hd, scale, scratch.data(),
                          out.data_ptr<float>());
          EXPECT_LT(testing::MaxAbsDiff(out, want), 1e-5) << where;
          // fp16 KV cache: equal to the same attention over the half-rounded keys and values.
          at::Tensor out16 = at::full({hq, hd}, 7.f);
          DecodeAttention(q.data_ptr<float>(), hkv, group, k16.data_ptr<at::Half>(),
                          v16.data_ptr<at::Half>(), rs, len, hd, scale, scratch.data(),
                          out16.data_ptr<float>());
          EXPECT_LT(testing::MaxAbsDiff(out16, want16), 1e-5) << "fp16 KV " << where;
          // One KV head at a time: the same floats, bit for bit.
          for (int64_t h = 0; h < hkv; ++h) {
            at::Tensor one = at::full({group, hd}, 7.f);
            DecodeAttention(q.data_ptr<float>() + h * group * hd, 1, group,
                            rows_k.data_ptr<float>() + h * hd, rows_v.data_ptr<float>() + h * hd,
                            rs, len, hd, scale, scratch.data(), one.data_ptr<float>());
            EXPECT_TRUE(at::equal(one, out.narrow(0, h * group, group))) << "head " << h << where;
          }
        }
        ForceKernelIsa(KernelIsa::kAuto);
      }
    }
  }
}

// Prefill attention (query blocks of kPrefillQueryBlock against the keys each sees) equals the
// causal softmax attention libtorch computes over the whole sequence: runs shorter than, equal to
// and across a block, after tokens already in the cache (p0 > 0), with GQA groups, a KV cache
// with room past the sequence (head stride > L · hd), strided query and output rows, every ISA.
TEST(KernelTest, PrefillAttentionMatchesCausalSoftmaxReference) {
  at::manual_seed(5);
  // 32 and 64 take the AVX-512 blocked kernel's 6- and 4-row value tiles, 128 its 3-row ones; 24
  // is no multiple of 16 and takes the GEMM path on every ISA.
  for (int64_t hd : {32, 64, 128, 24})
    for (int64_t group : {1, 3}) {
      for (int64_t p0 : {0, 37}) {
        for (int64_t T :
             {int64_t{17}, kPrefillQueryBlock, kPrefillQueryBlock + 1, 3 * kPrefillQueryBlock + 5})
          for (bool position_major : {true, false}) {
            const int64_t hkv = 2, hq = hkv * group, L = p0 + T, capacity = L + 9;
            const int64_t qdim = hq * hd + 8;  // rows with a stride past the heads
            at::Tensor q = at::randn({T, qdim});
            // Position-major as the KV cache holds it ([capacity, hkv, hd]), or each head's rows
            // together ([hkv, capacity, hd]); K and V below are per-head views either way.
            at::Tensor Kstore =
                position_major ? at::randn({capacity, hkv, hd}) : at::randn({hkv, capacity, hd});
            at::Tensor Vstore =
                position_major ? at::randn({capacity, hkv, hd}) : at::randn({hkv, capacity, hd});
            at::Tensor K = position_major ? Kstore.transpose(0, 1) : Kstore;
            at::Tensor V = position_major ? Vstore.transpose(0, 1) : Vstore;
            const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
            // Reference: per query head, full scores over the L keys, causal mask, softmax.
            at::Tensor want = at::zeros({T, hq * hd});
            at::Tensor causal = at::ones({T, L}, at::kBool).triu_(p0 + 1);
            for (int64_t qh = 0; qh < hq; ++qh) {
              const int64_t kvh = qh / group;
              at::Tensor Qh = q.narrow(1, qh * hd, hd);
              at::Tensor Kh = K[kvh].narrow(0, 0, L), Vh = V[kvh].narrow(0, 0, L);
              at::Tensor sc = at::matmul(Qh, Kh.t()) * scale;
              sc.masked_fill_(causal, -std::numeric_limits<float>::infinity());
              want.narrow(1, qh * hd, hd).copy_(at::matmul(at::softmax(sc, -1), Vh));
            }
            for (KernelIsa isa : AvailableIsas())
              for (PrefillBf16Kernel kernel : AvailablePrefillBf16Kernels()) {
                ForceKernelIsa(isa);
                ForcePrefillBf16Kernel(kernel);
                at::Tensor out = at::full({T, qdim}, 7.f);
                PrefillAttentionArgs a;
                a.q = q.data_ptr<float>();
                a.q_stride = qdim;
                a.k = Kstore.data_ptr<float>();
                a.v = Vstore.data_ptr<float>();
                a.kv_head_stride = position_major ? hd : capacity * hd;
                a.kv_row_stride = position_major ? hkv * hd : 0;
                a.kv_heads = hkv;
                a.group = group;
                a.head_dim = hd;
                a.p0 = p0;
                a.T = T;
                a.scale = scale;
                a.out = out.data_ptr<float>();
                a.out_stride = qdim;
                a.bf16 = kernel != PrefillBf16Kernel::kNone;
                at::Tensor scratch;
                PrefillAttention(a, scratch);
                const double diff = testing::MaxAbsDiff(out.narrow(1, 0, hq * hd), want);
                const PrefillBf16Kernel ran = a.bf16 ? ActivePrefillBf16Kernel(hd) : kernel;
                const std::string where = std::string(KernelIsaName(isa)) + " " +
                                          PrefillBf16KernelName(ran) + " hd=" + std::to_string(hd) +
                                          " group=" + std::to_string(group) +
                                          " p0=" + std::to_string(p0) + " T=" + std::to_string(T) +
                                          (position_major ? " position-major" : " head-major");
                // bf16 inputs (8 significant bits) where a bf16 kernel runs: the error stays at the
                // rounding's scale, and is not zero (the bf16 kernel ran).
                if (ran != PrefillBf16Kernel::kNone) {
                  EXPECT_LT(diff, 2e-2) << where;
                  EXPECT_GT(diff, 1e-5) << where;
                } else {
                  EXPECT_LT(diff, 2e-5) << where;
                }
                // The columns past the heads are not written.
                EXPECT_TRUE(at::all(out.narrow(1, hq * hd, 8) == 7.f).item<bool>()) << where;
              }
            ForceKernelIsa(KernelIsa::kAuto);
            ForcePrefillBf16Kernel(PrefillBf16Kernel::kAuto);
          }
      }
    }
}

}  // namespace ops_test
}  // namespace amoeba

namespace amoeba {
namespace ops_test {

// Inside a team, ParallelFor hands each member the chunk at::parallel_for would give its thread,
// and Serially runs on one thread while the others wait.
TEST(TeamTest, ParallelForSplitsAsAtParallelForAndSeriallyRunsOnce) {
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));
  for (int64_t n : {1, 5, 64, 1001})
    for (int64_t grain : {1, 4, 16384}) {
      std::vector<std::pair<int64_t, int64_t>> want(at::get_num_threads(), {-1, -1}), got = want;
      at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
        want[at::get_thread_num()] = {b, e};
      });
      std::atomic<int> serial_runs{0};
      std::vector<int> seen(n, 0);
      auto body = [&] {
        ParallelFor(0, n, grain, [&](int64_t b, int64_t e) {
          got[CurrentTeam()->tid()] = {b, e};
          for (int64_t i = b; i < e; ++i) ++seen[i];
        });
        Serially([&] { serial_runs.fetch_add(1); });
      };
      RunInTeam(body);
      EXPECT_EQ(got, want) << "n=" << n << " grain=" << grain;
      EXPECT_EQ(serial_runs.load(), 1);
      EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), n);
    }
  at::set_num_threads(threads);
}

// SharedScratch hands every member the same aligned buffer, big enough, with what one member
// wrote there visible to the others after a barrier; growing it in the middle of a pass keeps
// them in step. A team started inside another team's serial section gets none (the outer team's
// buffer is in use).
TEST(TeamTest, SharedScratchIsOneBufferForEveryMember) {
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));
  const int size = at::get_num_threads();
  std::vector<std::byte*> first(size), grown(size);
  std::vector<int64_t> sums(size, 0);
  std::atomic<int> nested_null{0};
  std::atomic<int> nested_size{0};
  auto body = [&] {
    Team* t = CurrentTeam();
    std::byte* p = t->SharedScratch(256);
    first[t->tid()] = p;
    auto* v = reinterpret_cast<int64_t*>(p);
    v[t->tid()] = 10 + t->tid();  // each member writes its own entry
    t->Barrier();
    for (int i = 0; i < size; ++i) sums[t->tid()] += v[i];
    t->Barrier();
    std::byte* q = t->SharedScratch(size_t{1} << 20);  // grows: every member waits for it
    grown[t->tid()] = q;
    reinterpret_cast<int64_t*>(q)[(size_t{1} << 17) - 1 - t->tid()] = t->tid();
    t->Barrier();
    Serially([&] {
      auto inner = [&] {
        nested_size = CurrentTeam()->size();  // 1 unless OpenMP nests regions
        if (!CurrentTeam()->SharedScratch(64)) nested_null.fetch_add(1);
      };
      RunInTeam(inner);
    });
  };
  RunInTeam(body);
  int64_t want = 0;
  for (int i = 0; i < size; ++i) want += 10 + i;
  for (int i = 0; i < size; ++i) {
    EXPECT_EQ(first[i], first[0]) << "member " << i;
    EXPECT_EQ(grown[i], grown[0]) << "member " << i;
    EXPECT_EQ(sums[i], want) << "member " << i << " saw the others' writes";
  }
  EXPECT_NE(first[0], nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(first[0]) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(grown[0]) % 64, 0u);
  EXPECT_EQ(nested_null.load(), nested_size.load()) << "the nested team's members all got null";
  // The next team on this thread has the buffer again, already large enough.
  std::atomic<int> again{0};
  auto next = [&] {
    if (CurrentTeam()->SharedScratch(size_t{1} << 20) == grown[0]) again.fetch_add(1);
  };
  RunInTeam(next);
  EXPECT_EQ(again.load(), size);
  at::set_num_threads(threads);
}

// An exception on one member ends the team (the others leave at their next barrier) and reaches
// RunInTeam's caller: no hang, no terminate.
TEST(TeamTest, AnExceptionOnOneThreadReachesTheCaller) {
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));
  for (int thrower : {0, 1}) {
    auto body = [&] {
      Team* t = CurrentTeam();
      t->Barrier();
      if (t->tid() == thrower) throw std::runtime_error("member failed");
      for (int i = 0; i < 3; ++i) t->Barrier();
    };
    EXPECT_THROW(RunInTeam(body), std::runtime_error) << "thrower " << thrower;
  }
  auto serial_throw = [&] { Serially([] { TORCH_CHECK(false, "serial part failed"); }); };
  EXPECT_THROW(RunInTeam(serial_throw), c10::Error);
  EXPECT_EQ(CurrentTeam(), nullptr);
  at::set_num_threads(threads);
}

// A member that waits long at a barrier (the other is late: descheduled, or slow) stops spinning
// and sleeps: its CPU time over a 60 ms wait stays far below 60 ms, and the barrier still
// releases it. A member that throws while the other sleeps in the barrier wakes it.
TEST(TeamTest, ALongWaitAtABarrierSleepsInsteadOfSpinning) {
  const int threads = at::get_num_threads();
  at::set_num_threads(std::max(threads, 2));
  auto thread_cpu_ms = [] {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
  };
  std::atomic<double> waiter_cpu_ms{-1};
  auto late = [&] {
    Team* t = CurrentTeam();
    if (t->tid() == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(60));
    } else {
      const double before = thread_cpu_ms();
      t->Barrier();
      waiter_cpu_ms = thread_cpu_ms() - before;
      return;
    }
    t->Barrier();
  };
  RunInTeam(late);
  EXPECT_GE(waiter_cpu_ms.load(), 0.0);
  EXPECT_LT(waiter_cpu_ms.load(), 20.0) << "the waiting member spun through the wait";
  auto late_throw = [&] {
    Team* t = CurrentTeam();
    if (t->tid() == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      throw std::runtime_error("late member failed");
    }
    t->Barrier();
  };
  EXPECT_THROW(RunInTeam(late_throw), std::runtime_error);
  at::set_num_threads(threads);
}

// ParallelForStealing: a member that is done takes pieces from the back of a slow member's chunk,
// the slow one keeps its chunk's front, and every item runs exactly once. Three calls in a row,
// the slow member alternating, so each of the two sets of ranges is used and then used again.
TEST(TeamTest, AMemberDoneFirstTakesTheBackOfASlowMembersChunk) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  constexpr int64_t kItems = 64;
  std::array<std::array<std::atomic<int>, kItems>, 3> runs{}, ran_by{};
  auto body = [&] {
    Team* t = CurrentTeam();
    for (int call = 0; call < 3; ++call) {
      const int slow = call % 2;
      bool first = true;
      t->Barrier();  // both open their ranges at about the same time
      ParallelForStealing(0, kItems, 1, 2, [&](int64_t b, int64_t e) {
        // The fast one's pause gives the slow one time to open its range (a member that looks
        // at a range not yet opened finds nothing to take).
        if (first)
          std::this_thread::sleep_for(std::chrono::milliseconds(t->tid() == slow ? 60 : 5));
        first = false;
        for (int64_t i = b; i < e; ++i) {
          runs[call][i].fetch_add(1);
          ran_by[call][i].store(t->tid());
        }
      });
    }
  };
  RunInTeam(body);
  for (int call = 0; call < 3; ++call) {
    const int slow = call % 2;
    const int64_t begin = slow * kItems / 2, end = begin + kItems / 2;  // the slow one's chunk
    int64_t stolen = 0;
    for (int64_t i = 0; i < kItems; ++i) {
      EXPECT_EQ(runs[call][i].load(), 1) << "call " << call << " item " << i;
      if (i >= begin && i < end && ran_by[call][i].load() != slow) ++stolen;
    }
    EXPECT_GT(stolen, 0) << "call " << call << ": nothing was taken from the slow member";
    EXPECT_EQ(ran_by[call][begin].load(), slow) << "the slow member lost its chunk's front";
    // What was taken is the chunk's back: no item of the slow one after a stolen one.
    for (int64_t i = end - stolen; i < end; ++i) EXPECT_NE(ran_by[call][i].load(), slow);
  }
  at::set_num_threads(threads);
}

// OMP_WAIT_POLICY=passive (any case) turns the barrier's spin off; anything else keeps it.
TEST(TeamTest, APassiveWaitPolicySleepsWithoutSpinning) {
  EXPECT_EQ(BarrierSpins("passive"), 0);
  EXPECT_EQ(BarrierSpins("PASSIVE"), 0);
  EXPECT_GT(BarrierSpins(nullptr), 0);
  EXPECT_GT(BarrierSpins("active"), 0);
  EXPECT_GT(BarrierSpins(""), 0);
}

// With a step profile attached to the thread that starts a team, every member adds its time in
// barriers to its own entry: the member that waits for a late one gets the wait, the late one
// (the last to arrive) nothing; without a profile nothing is recorded anywhere.
TEST(TeamTest, AStepProfileGetsEachMembersBarrierWaits) {
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  auto late = [] {
    Team* t = CurrentTeam();
    if (t->tid() == 1) std::this_thread::sleep_for(std::chrono::milliseconds(40));
    t->Barrier();
    if (t->tid() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    t->Barrier();
  };
  StepProfile profile;
  {
    ScopedStepProfile attach(&profile);
    RunInTeam(late);
  }
  // Each waited for the other's sleep, not for its own (which would add 100 / 40 ms).
  EXPECT_GE(profile.barrier_wait_ns[0], 35'000'000);
  EXPECT_LT(profile.barrier_wait_ns[0], 90'000'000);
  EXPECT_GE(profile.barrier_wait_ns[1], 95'000'000);
  EXPECT_LT(profile.barrier_wait_ns[1], 135'000'000);
  EXPECT_EQ(profile.members, 2);
  EXPECT_EQ(profile.others_wait_ns(), profile.barrier_wait_ns[1]);
  StepProfile total;
  total.Add(profile);
  total.Add(profile);
  EXPECT_EQ(total.barrier_wait_ns[1], 2 * profile.barrier_wait_ns[1]);
  const StepProfile before = profile;
  RunInTeam(late);  // no profile attached
  EXPECT_EQ(profile.barrier_wait_ns, before.barrier_wait_ns);
  at::set_num_threads(threads);
}

}  // namespace ops_test
}  // namespace amoeba
