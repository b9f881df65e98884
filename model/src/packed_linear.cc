#include "model/packed_linear.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "model/kernels.h"
#include "model/quantized_panels.h"
#include "model/runtime.h"
#include "simd.h"
#include "stream_prefetch.h"

namespace amoeba {

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kPrefetchBytes = PrefetchAheadBytes(kDefaultPrefetchArm);  // 4 KB (measured)
// AVX2 passes of this many inputs or more prefetch the panel stream: checking 5 drafted tokens on
// the 16M-parameter quality preset (weights beyond L3) ran 1.13x faster with it, batch 4 1.08x
// (Zen 3, bench/speculative, interleaved runs).
constexpr int64_t kAvx2PrefetchRows = 3;

// J inputs against one panel: J zmm accumulators holding 16 outputs each. xt is [in][J] (inputs
// transposed, padded to J columns). Writes the first `valid` outputs of the panel for the first
// `rows` (<= J) inputs.
using simd::Load16;
using simd::Load8;

template <int J, typename T, int kPrefetch>
AMOEBA_AVX512 void PanelAvx512(const T* panel, const float* xt, int64_t in, float* y, int64_t out,
                               int64_t col, int64_t valid, int64_t rows) {
  // Below 4 inputs there are too few accumulator chains to hide the FMA latency: unroll k by U
  // with separate accumulators and add them up at the end.
  constexpr int U = J >= 4 ? 1 : 4 / J;
  __m512 acc[U][J];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < J; ++j) acc[u][j] = _mm512_setzero_ps();
  // The panel stream 4 KB ahead, every line of it. With 1-4 inputs the hardware prefetcher alone
  // left 10-30% of the bandwidth unused whenever the machine had much of it (Zen 5 VM, paired
  // probes: TinyLlama fp16 matrices 88-91% -> 92-100% of a read probe, 100m fp16 batch 1 76-79%
  // -> 88-91%, batch 4 fp32 60-69% -> 79-88%). 8+ inputs: one prefetch per k, as measured before.
  // kPrefetch is the arm the machine chose (stream_prefetch.h): 0 none, 1 near, 2 far.
  constexpr int64_t kStepBytes = U * kPanel * sizeof(T);
  int64_t k = 0;
  for (; k + U <= in; k += U) {
    if constexpr (kPrefetch > 0 && J >= 8) {
      _mm_prefetch(StreamAhead(panel + k * kPanel, kPrefetchBytes), _MM_HINT_T0);
    } else if constexpr (kPrefetch > 0) {
      const char* ahead = StreamAhead(panel + k * kPanel, PrefetchAheadBytes(kPrefetch));
      for (int64_t b = 0; b < kStepBytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
    }
    for (int u = 0; u < U; ++u) {
      const __m512 w = Load16(panel + (k + u) * kPanel);
      const float* xk = xt + (k + u) * J;
      for (int j = 0; j < J; ++j) acc[u][j] = _mm512_fmadd_ps(w, _mm512_set1_ps(xk[j]), acc[u][j]);
    }
  }
  for (; k < in; ++k) {
    const __m512 w = Load16(panel + k * kPanel);
    for (int j = 0; j < J; ++j)
      acc[0][j] = _mm512_fmadd_ps(w, _mm512_set1_ps(xt[k * J + j]), acc[0][j]);
  }
  for (int u = 1; u < U; ++u)
    for (int j = 0; j < J; ++j) acc[0][j] = _mm512_add_ps(acc[0][j], acc[u][j]);
  const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1);
  for (int j = 0; j < J; ++j)
    if (j < rows) _mm512_mask_storeu_ps(y + j * out + col, m, acc[0][j]);
}

// AVX2 (no AVX-512): a panel row is two ymm; up to 4 inputs at a time (8 accumulators of the 16
// registers), so a group of J inputs re-reads the panel J/4 times from L1/L2. The last pass takes
// only the inputs left (5 inputs: 4 + 1, not 4 + 4), each input's sum in the same order.
template <int B, typename T>
AMOEBA_AVX2 void PanelAvx2Pass(const T* panel, const float* xk0, int64_t J, int64_t in, float* y,
                               int64_t out, int64_t col, int64_t valid, bool prefetch) {
  __m256 lo[B], hi[B];
  for (int b = 0; b < B; ++b) lo[b] = hi[b] = _mm256_setzero_ps();
  for (int64_t k = 0; k < in; ++k) {
    if (prefetch) _mm_prefetch(StreamAhead(panel + k * kPanel, kPrefetchBytes), _MM_HINT_T0);
    const __m256 wl = Load8(panel + k * kPanel), wh = Load8(panel + k * kPanel + 8);
    const float* xk = xk0 + k * J;
    for (int b = 0; b < B; ++b) {
      const __m256 xv = _mm256_broadcast_ss(xk + b);
      lo[b] = _mm256_fmadd_ps(wl, xv, lo[b]);
      hi[b] = _mm256_fmadd_ps(wh, xv, hi[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    alignas(32) float tmp[kPanel];
    _mm256_store_ps(tmp, lo[b]);
    _mm256_store_ps(tmp + 8, hi[b]);
    std::copy(tmp, tmp + valid, y + b * out + col);
  }
}

template <int J, typename T>
AMOEBA_AVX2 void PanelAvx2(const T* panel, const float* xt, int64_t in, float* y, int64_t out,
                           int64_t col, int64_t valid, int64_t rows, bool prefetch_on) {
  for (int64_t j0 = 0; j0 < J && j0 < rows; j0 += 4) {
    const float* xk0 = xt + j0;
    float* yj = y + j0 * out;
    // The first pass streams the panel from memory: with 3+ inputs a line takes long enough to
    // compute that the hardware prefetcher alone falls behind. Later passes hit L1/L2.
    const bool prefetch = prefetch_on && j0 == 0 && rows >= kAvx2PrefetchRows;
    switch (std::min<int64_t>(4, rows - j0)) {
      case 4:
        PanelAvx2Pass<4, T>(panel, xk0, J, in, yj, out, col, valid, prefetch);
        break;
      case 3:
        PanelAvx2Pass<3, T>(panel, xk0, J, in, yj, out, col, valid, prefetch);
        break;
      case 2:
        PanelAvx2Pass<2, T>(panel, xk0, J, in, yj, out, col, valid, prefetch);
        break;
      default:
        PanelAvx2Pass<1, T>(panel, xk0, J, in, yj, out, col, valid, prefetch);
    }
  }
}

template <typename T>
void PanelScalar(const T* panel, const float* xt, int64_t J, int64_t in, float* y, int64_t out,
                 int64_t col, int64_t valid, int64_t rows) {
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t c = 0; c < valid; ++c) {
      float s = 0.f;
      for (int64_t k = 0; k < in; ++k)
        s += static_cast<float>(panel[k * kPanel + c]) * xt[k * J + j];
      y[j * out + col + c] = s;
    }
}

// xt[k][16] = x[j][k] for 16 rows of length `in` (row stride `in`): 16x16 tiles transposed in
// registers (unpack 32/64-bit, then shuffle 128-bit lanes twice), the scalar loop for the tail.
AMOEBA_AVX512 void Transpose16Avx512(const float* x, int64_t in, float* xt) {
  int64_t k = 0;
  for (; k + 16 <= in; k += 16) {
    __m512 r[16], t[16];
    for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(x + j * in + k);
    for (int j = 0; j < 16; j += 2) {
      t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
      t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
    }
    for (int j = 0; j < 16; j += 4) {
      for (int h = 0; h < 2; ++h) {
        const __m512d a = _mm512_castps_pd(t[j + h]), b = _mm512_castps_pd(t[j + 2 + h]);
        r[j + h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[j + 2 + h] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
      }
    }
    // r[4q + m] now holds, in 128-bit lane L, rows 4q..4q+3 at column 4L + m' (m' = 0,2,1,3 for
    // m = 0,1,2,3). Gather lanes: first pairs of row-quads, then quads of quads.
    for (int q = 0; q < 16; q += 8)
      for (int m = 0; m < 4; ++m) {
        t[q + m] = _mm512_shuffle_f32x4(r[q + m], r[q + 4 + m], 0x88);
        t[q + 4 + m] = _mm512_shuffle_f32x4(r[q + m], r[q + 4 + m], 0xDD);
      }
    for (int m = 0; m < 8; ++m) {
      r[m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88);
      r[8 + m] = _mm512_shuffle_f32x4(t[m], t[8 + m], 0xDD);
    }
    // r[i] is column k + kOrder[i] across the 16 rows.
    static constexpr int kOrder[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(xt + (k + kOrder[i]) * 16, r[i]);
  }
  for (; k < in; ++k)
    for (int64_t j = 0; j < 16; ++j) xt[k * 16 + j] = x[j * in + k];
}

// One input group (rows r0.., transposed to xt) against every output's panels, all in one
// parallel region: panel indices run over the outputs back to back.
template <int J, typename T>
void RunGroup(std::span<const PackedOutput> outs, const float* xt, int64_t in, int64_t r0,
              int64_t rows, KernelIsa isa, int prefetch) {
  static constexpr decltype(&PanelAvx512<J, T, 0>) kAvx512[3] = {
      PanelAvx512<J, T, 0>, PanelAvx512<J, T, 1>, PanelAvx512<J, T, 2>};
  ForEachPanel(outs, [&](const PackedOutput& o, int64_t p, int64_t valid) {
    const T* panel = o.panels->data_ptr<T>() + p * o.panels->size(1) * kPanel;
    float* y = o.y + r0 * o.out;
    // Rows past the panel's share still run (J is fixed per group) but are not stored.
    const int64_t rows_here =
        o.panel_rows ? std::clamp<int64_t>(o.panel_rows[p] - r0, 0, rows) : rows;
    if (rows_here == 0) return;
    if (isa == KernelIsa::kAvx512) {
      kAvx512[prefetch](panel, xt, in, y, o.out, p * kPanel, valid, rows_here);
    } else if (isa == KernelIsa::kAvx2) {  // one distance: near and far are the same here
      PanelAvx2<J, T>(panel, xt, in, y, o.out, p * kPanel, valid, rows_here, prefetch != 0);
    } else {
      PanelScalar(panel, xt, J, in, y, o.out, p * kPanel, valid, rows_here);
    }
  });
}

template <typename T>
void LinearPackedTyped(const float* x, int64_t n, int64_t in, std::span<const PackedOutput> outs) {
  const KernelIsa isa = ActiveKernelIsa();
  const int prefetch = n > kPrefetchChoiceMaxRows ? kDefaultPrefetchArm : StreamPrefetchArm();
  thread_local std::vector<float> xt;  // grown once, reused: no allocation per decode step
  if (static_cast<int64_t>(xt.size()) < in * kPanel) xt.resize(in * kPanel);
  for (int64_t r0 = 0; r0 < n; r0 += kPanel) {
    const int64_t rows = std::min(kPanel, n - r0);
    // Inputs per group: the next of 1, 2, 4, 8, 16 that covers `rows`; padding columns are zero.
    const int64_t J = rows <= 2 ? rows : rows <= 4 ? 4 : rows <= 8 ? 8 : 16;
    // Transpose the group to [in][J], so each k reads J adjacent values (one row needs none).
    const float* xg = x + r0 * in;
    if (J > 1) {
      if (rows < J) std::fill(xt.begin(), xt.begin() + in * J, 0.f);  // zero padding columns
      if (rows == 16 && isa == KernelIsa::kAvx512) {
        Transpose16Avx512(xg, in, xt.data());
      } else {  // k outer: sequential writes; the row streams stay in L1 across 16 k's
        for (int64_t k = 0; k < in; ++k)
          for (int64_t j = 0; j < rows; ++j) xt[k * J + j] = xg[j * in + k];
      }
      xg = xt.data();
    }
    switch (J) {
      case 1:
        RunGroup<1, T>(outs, xg, in, r0, rows, isa, prefetch);
        break;
      case 2:
        RunGroup<2, T>(outs, xg, in, r0, rows, isa, prefetch);
        break;
      case 4:
        RunGroup<4, T>(outs, xg, in, r0, rows, isa, prefetch);
        break;
      case 8:
        RunGroup<8, T>(outs, xg, in, r0, rows, isa, prefetch);
        break;
      default:
        RunGroup<16, T>(outs, xg, in, r0, rows, isa, prefetch);
    }
  }
}

}  // namespace

namespace {

// Fills `panels` [ceil(out/16), in, 16] from W [out, in], one panel at a time (peak extra memory
// is one panel, not a padded copy of W).
void FillPanels(const at::Tensor& W, at::Tensor& panels) {
  const int64_t out = W.size(0);
  for (int64_t p = 0; p < panels.size(0); ++p) {
    const int64_t rows = std::min(kPanel, out - p * kPanel);
    at::Tensor dst = panels[p];  // [in, 16]
    if (rows < kPanel) dst.zero_();
    dst.narrow(1, 0, rows).copy_(W.narrow(0, p * kPanel, rows).t());
  }
}

// The panel tensor's sizes for an [out, in] matrix in format `f`.
std::vector<int64_t> PanelSizes(int64_t out, int64_t in, WeightFormat f) {
  if (IsQuantized(f))
    return {(out + kPanel - 1) / kPanel, (in + kQuantBlock - 1) / kQuantBlock, QuantBlockBytes(f)};
  return {(out + kPanel - 1) / kPanel, in, kPanel};
}

std::vector<int64_t> PanelSizes(const at::Tensor& W, WeightFormat f) {
  return PanelSizes(W.size(0), W.size(1), f);
}

at::ScalarType PanelDtype(WeightFormat f) {
  switch (f) {
    case WeightFormat::kF16:
      return at::kHalf;
    case WeightFormat::kQ8_0:
      return at::kChar;
    case WeightFormat::kQ4_0:
      return at::kByte;
    case WeightFormat::kF32:
      break;
  }
  return at::kFloat;
}

// Fills panels of format `f` (allocated with PanelSizes) from W.
void FillPanelsOf(const at::Tensor& W, WeightFormat f, at::Tensor& panels) {
  if (IsQuantized(f)) {
    FillQuantizedPanels(W, f, panels);
  } else {
    FillPanels(W, panels);
  }
}

WeightFormat FormatOfWeights(const at::Tensor& W) {
  return W.scalar_type() == at::kHalf ? WeightFormat::kF16 : WeightFormat::kF32;
}

}  // namespace

WeightFormat PanelsFormat(const at::Tensor& panels) {
  switch (panels.scalar_type()) {
    case at::kHalf:
      return WeightFormat::kF16;
    case at::kChar:
      return WeightFormat::kQ8_0;
    case at::kByte:
      return WeightFormat::kQ4_0;
    default:
      return WeightFormat::kF32;
  }
}

at::Tensor PackPanels(const at::Tensor& W, std::optional<WeightFormat> format) {
  TORCH_CHECK(W.dim() == 2, "PackPanels: a matrix");
  const WeightFormat f = format.value_or(FormatOfWeights(W));
  if (IsQuantized(f)) return PackQuantizedPanels(W, f);
  at::Tensor panels = at::empty(PanelSizes(W, f), at::TensorOptions().dtype(PanelDtype(f)));
  FillPanels(W, panels);
  return panels;
}

void LinearPacked(const float* x, int64_t n, const at::Tensor& panels, int64_t out, int64_t in,
                  const float* bias, float* y) {
  const PackedOutput o{&panels, out, bias, y};
  LinearPackedMany(x, n, in, {&o, 1});
}

void LinearPackedMany(const float* x, int64_t n, int64_t in, std::span<const PackedOutput> outs) {
  TORCH_CHECK(!outs.empty(), "LinearPacked: no outputs");
  const at::ScalarType st = outs[0].panels->scalar_type();
  const WeightFormat f = PanelsFormat(*outs[0].panels);
  for (const PackedOutput& o : outs) {
    const at::Tensor& p = *o.panels;
    const int64_t cols = IsQuantized(f) ? p.size(1) * kQuantBlock : p.size(1);
    TORCH_CHECK(p.dim() == 3 && p.is_contiguous() && p.scalar_type() == st &&
                    p.size(2) == (IsQuantized(f) ? QuantBlockBytes(f) : kPanel) &&
                    (st == at::kFloat || st == at::kHalf || IsQuantized(f)),
                "LinearPacked: panels from PackPanels, all of one format");
    TORCH_CHECK(o.out <= p.size(0) * kPanel && in <= cols,
                "LinearPacked: the prefix exceeds the packed matrix");
  }
  if (n == 0) return;
  if (IsQuantized(f)) {
    QuantizedLinearMany(x, n, in, outs);
  } else if (st == at::kHalf) {
    LinearPackedTyped<at::Half>(x, n, in, outs);
  } else {
    LinearPackedTyped<float>(x, n, in, outs);
  }
  bool any_bias = false;
  for (const PackedOutput& o : outs) any_bias = any_bias || o.bias;
  if (any_bias) {
    Serially([&] {
      for (const PackedOutput& o : outs)
        if (o.bias)
          for (int64_t j = 0; j < n; ++j) AddInPlace(o.y + j * o.out, o.bias, o.out);
    });
  }
}

void PackWeights(Model& m, WeightFormat f, const std::function<void()>& between_matrices) {
  // Every panel tensor of the model lives in one arena on 2 MB pages: decode streams all of it
  // each step, and huge pages spare the page walks that 4 KB pages cost on such a stream.
  std::vector<std::pair<const at::Tensor*, at::Tensor*>> todo;  // (row-major, its panels)
  for (LayerWeights& l : m.layers)
    for (int p = 0; p < kNumProj; ++p) {
      const at::Tensor& w = l.proj(static_cast<Proj>(p));
      if (!l.panels[p].defined() && w.numel() > 0) todo.emplace_back(&w, &l.panels[p]);
    }
  if (!m.head_panels.defined() && m.lm_head.numel() > 0)
    todo.emplace_back(&m.lm_head, &m.head_panels);
  if (todo.empty()) return;
  constexpr size_t kAlign = 64;
  const at::ScalarType dtype = PanelDtype(f);
  const size_t elem = at::elementSize(dtype);
  std::vector<size_t> offsets;
  size_t total = 0;
  for (const auto& [w, panels] : todo) {
    offsets.push_back(total);
    size_t bytes = elem;
    for (int64_t d : PanelSizes(*w, f)) bytes *= static_cast<size_t>(d);
    total += (bytes + kAlign - 1) / kAlign * kAlign;
  }
  std::shared_ptr<void> arena = AllocateHugePages(total);
  TORCH_CHECK(arena, "PackWeights: out of memory for ", total >> 20, " MB of panels");
  for (size_t i = 0; i < todo.size(); ++i) {
    char* data = static_cast<char*>(arena.get()) + offsets[i];
    *todo[i].second = at::from_blob(
        data, PanelSizes(*todo[i].first, f), [arena](void*) {}, at::TensorOptions().dtype(dtype));
    FillPanelsOf(*todo[i].first, f, *todo[i].second);
    if (between_matrices) between_matrices();
  }
}

namespace {
// The format PackDeltas packs projection p's delta in, or nullopt when it leaves it alone.
std::optional<WeightFormat> DeltaFormat(const LayerWeights& l, int p) {
  const LowRankDelta& d = l.deltas[p];
  if (!d.defined() || d.packed() || !l.panels[p].defined()) return std::nullopt;
  const WeightFormat base = PanelsFormat(l.panels[p]);
  return IsQuantized(base) ? WeightFormat::kQ8_0 : base;
}
}  // namespace

void PackDeltas(Model& m) {
  std::vector<std::pair<LowRankDelta*, WeightFormat>> todo;
  for (LayerWeights& l : m.layers)
    for (int p = 0; p < kNumProj; ++p)
      if (const std::optional<WeightFormat> f = DeltaFormat(l, p))
        todo.emplace_back(&l.deltas[p], *f);
  // A new lane's deltas are packed on the server's decode thread, between steps: on every core.
  at::parallel_for(0, static_cast<int64_t>(todo.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      auto [d, f] = todo[i];
      d->down_panels = PackPanels(d->Down().contiguous(), f);
      d->up_panels = PackPanels(d->Up().contiguous(), f);
    }
  });
}

int64_t PackDeltasBytes(const Model& m) {
  auto panel_bytes = [](int64_t out, int64_t in, WeightFormat f) {
    int64_t bytes = static_cast<int64_t>(at::elementSize(PanelDtype(f)));
    for (int64_t d : PanelSizes(out, in, f)) bytes *= d;
    return bytes;
  };
  int64_t bytes = 0;
  for (const LayerWeights& l : m.layers)
    for (int p = 0; p < kNumProj; ++p)
      if (const std::optional<WeightFormat> f = DeltaFormat(l, p)) {
        const LowRankDelta& d = l.deltas[p];
        bytes += panel_bytes(d.rank(), d.in(), *f) + panel_bytes(d.out(), d.rank(), *f);
      }
  return bytes;
}

void DropPanels(Model& m) {
  for (LayerWeights& l : m.layers)
    for (at::Tensor& panels : l.panels) panels.reset();
  m.head_panels.reset();
}

void RepackWeights(Model& m, WeightFormat f, const std::function<void()>& between_matrices) {
  DropPanels(m);
  PackWeights(m, f, between_matrices);
}

void DropPackedRowMajor(Model& m) {
  for (LayerWeights& l : m.layers)
    for (int p = 0; p < kNumProj; ++p) {
      at::Tensor& w = l.proj(static_cast<Proj>(p));
      if (l.panels[p].defined())
        w = at::empty(w.sizes(), at::TensorOptions().dtype(w.scalar_type()).device(at::kMeta));
    }
}

void ReleaseRowMajorPages(const Model& m) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  auto release = [](const at::Tensor& t) {
    if (!t.defined() || t.numel() == 0) return;
    // Whole pages inside the tensor's storage only: neighbours must not be touched.
    const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
    const uintptr_t end = begin + t.storage().nbytes();
    const uintptr_t first = (begin + page - 1) & ~(page - 1), last = end & ~(page - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_PAGEOUT);
  };
  release(m.lm_head);
  for (const LayerWeights& l : m.layers)
    for (int p = 0; p < kNumProj; ++p) release(l.proj(static_cast<Proj>(p)));
}

}  // namespace amoeba
