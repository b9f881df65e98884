#include "model/kernels.h"

#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "model/team.h"
#include "simd.h"

namespace amoeba {

namespace {

using simd::Load16;
using simd::Load8;

AMOEBA_AVX2 inline float HSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  return _mm_cvtss_f32(_mm_add_ss(s, sh));
}

inline float ToFloat(float v) {
  return v;
}
inline float ToFloat(at::Half v) {
  return static_cast<float>(v);
}

// Sum of w[i] * x[i] with four independent FMA chains; w is fp32 or fp16.
template <typename T>
AMOEBA_AVX2 inline float DotAvx2(const T* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(Load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(Load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(Load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(Load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(Load8(w + i), _mm256_loadu_ps(x + i), a0);
  float s = HSum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += ToFloat(w[i]) * x[i];
  return s;
}

// Rows [r0, r1) of y = W x, one row at a time: each thread reads one sequential stream (rows are
// contiguous unless sliced), which the hardware prefetcher follows best; x stays in L1.
template <typename T>
AMOEBA_AVX2 void GemvAvx2(const T* W, int64_t ld, int64_t in, const float* x, float* y, int64_t r0,
                          int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) y[r] = DotAvx2(W + r * ld, x, in);
}

// GemvAvx2 for n inputs: the weight row stays in L1 across them.
AMOEBA_AVX2 void RowwiseAvx2(const float* W, int64_t ld, int64_t in, const float* x, int64_t n,
                             float* y, int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < n; ++j) y[j * out + r] = DotAvx2(W + r * ld, x + j * in, in);
}

// R weight rows against C inputs over one k-block [k0, k1): R*C accumulators stay in registers.
// `accumulate`: add to y (later k-blocks) instead of overwriting it (the first).
template <int R, int C, typename T>
AMOEBA_AVX2 inline void SkinnyTile(const T* W, int64_t ld, int64_t in, const float* x, int64_t n0,
                                   float* y, int64_t out, int64_t r, int rows, int64_t k0,
                                   int64_t k1, bool accumulate) {
  const T* w[R];
  for (int a = 0; a < R; ++a) w[a] = W + (r + std::min(a, rows - 1)) * ld;
  __m256 acc[R][C];
  for (int a = 0; a < R; ++a)
    for (int j = 0; j < C; ++j) acc[a][j] = _mm256_setzero_ps();
  int64_t i = k0;
  // Weights stream from DRAM: prefetch the next tile's rows during the first input group.
  const bool prefetch = n0 == 0;
  for (; i + 8 <= k1; i += 8) {
    if (prefetch && (i & 15) == 0) {
      for (int a = 0; a < R; ++a)
        _mm_prefetch(reinterpret_cast<const char*>(w[a] + R * ld + i), _MM_HINT_T0);
    }
    __m256 wv[R];
    for (int a = 0; a < R; ++a) wv[a] = Load8(w[a] + i);
    for (int j = 0; j < C; ++j) {
      const __m256 xv = _mm256_loadu_ps(x + (n0 + j) * in + i);
      for (int a = 0; a < R; ++a) acc[a][j] = _mm256_fmadd_ps(wv[a], xv, acc[a][j]);
    }
  }
  for (int j = 0; j < C; ++j) {
    const float* xr = x + (n0 + j) * in;
    for (int a = 0; a < rows; ++a) {
      float s = HSum(acc[a][j]);
      for (int64_t t = i; t < k1; ++t) s += ToFloat(w[a][t]) * xr[t];
      float& dst = y[(n0 + j) * out + r + a];
      dst = accumulate ? dst + s : s;
    }
  }
}

// Rows [r0, r1) for n inputs, k-blocked so the inputs' block stays in L1 while the weight rows
// stream past it once.
template <typename T>
AMOEBA_AVX2 void SkinnyAvx2(const T* W, int64_t ld, int64_t in, const float* x, int64_t n, float* y,
                            int64_t out, int64_t r0, int64_t r1) {
  constexpr int R = 2, C = 4;
  const int64_t kblock =
      std::max<int64_t>(64, (16384 / std::max<int64_t>(n, 1)) / 8 * 8);  // ~16 KB of x
  for (int64_t k0 = 0; k0 < in; k0 += kblock) {
    const int64_t k1 = std::min(in, k0 + kblock);
    const bool acc = k0 > 0;
    for (int64_t r = r0; r < r1; r += R) {
      const int rows = static_cast<int>(std::min<int64_t>(R, r1 - r));
      int64_t n0 = 0;
      for (; n0 + C <= n; n0 += C) SkinnyTile<R, C>(W, ld, in, x, n0, y, out, r, rows, k0, k1, acc);
      switch (n - n0) {
        case 3:
          SkinnyTile<R, 3>(W, ld, in, x, n0, y, out, r, rows, k0, k1, acc);
          break;
        case 2:
          SkinnyTile<R, 2>(W, ld, in, x, n0, y, out, r, rows, k0, k1, acc);
          break;
        case 1:
          SkinnyTile<R, 1>(W, ld, in, x, n0, y, out, r, rows, k0, k1, acc);
          break;
        default:
          break;
      }
    }
  }
}

// R weight rows against C inputs over the whole of `in`: R*C zmm accumulators (≤ 24 of the 32
// registers), R + C loads per R*C FMAs, one horizontal sum per output at the end. The first input
// group pulls the rows from DRAM and prefetches the next tile; later groups find them in L1/L2.
template <int R, int C, typename T>
AMOEBA_AVX512 inline void TileAvx512(const T* W, int64_t ld, int64_t in, const float* x, int64_t n0,
                                     float* y, int64_t out, int64_t r, int rows, int group,
                                     int groups) {
  const T* w[R];
  for (int a = 0; a < R; ++a) w[a] = W + (r + std::min(a, rows - 1)) * ld;
  const float* xr[C];
  for (int j = 0; j < C; ++j) xr[j] = x + (n0 + j) * in;
  __m512 acc[R][C];
  for (int a = 0; a < R; ++a)
    for (int j = 0; j < C; ++j) acc[a][j] = _mm512_setzero_ps();
  int64_t i = 0;
  // Which group prefetches the next tile's 16 inputs at i: (i / 16) % groups, counted rather
  // than divided (a 64-bit division per 16 inputs was in the loop).
  int owner = 0;
  for (; i + 16 <= in; i += 16) {
    if (owner == group) {
      for (int a = 0; a < R; ++a)
        _mm_prefetch(reinterpret_cast<const char*>(w[a] + R * ld + i), _MM_HINT_T0);
    }
    if (++owner == groups) owner = 0;
    __m512 wv[R];
    for (int a = 0; a < R; ++a) wv[a] = Load16(w[a] + i);
    for (int j = 0; j < C; ++j) {
      __m512 xv = _mm512_loadu_ps(xr[j] + i);
      // Keep xv in a register: folded into each FMA as a memory operand, it would be loaded R
      // times, and loads (not FMAs) would bound the loop.
      asm("" : "+v"(xv));
      for (int a = 0; a < R; ++a) acc[a][j] = _mm512_fmadd_ps(wv[a], xv, acc[a][j]);
    }
  }
  if (i < in) {
    const __mmask16 m = static_cast<__mmask16>((1u << (in - i)) - 1);
    __m512 wv[R];
    for (int a = 0; a < R; ++a) wv[a] = Load16(w[a] + i, m);
    for (int j = 0; j < C; ++j) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, xr[j] + i);
      for (int a = 0; a < R; ++a) acc[a][j] = _mm512_fmadd_ps(wv[a], xv, acc[a][j]);
    }
  }
  for (int j = 0; j < C; ++j)
    for (int a = 0; a < rows; ++a) y[(n0 + j) * out + r + a] = _mm512_reduce_add_ps(acc[a][j]);
}

// Tiles of R rows; inputs in groups of C (the remainder group uses a narrower tile).
template <int R, int C, typename T>
AMOEBA_AVX512 void SkinnyRowsAvx512(const T* W, int64_t ld, int64_t in, const float* x, int64_t n,
                                    float* y, int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += R) {
    const int rows = static_cast<int>(std::min<int64_t>(R, r1 - r));
    // Every input group prefetches its share of the next tile's rows, so DRAM reads are spread
    // over the whole tile's compute instead of bunched into the first group.
    const int groups = static_cast<int>((n + C - 1) / C);
    int64_t n0 = 0;
    for (; n0 + C <= n; n0 += C)
      TileAvx512<R, C>(W, ld, in, x, n0, y, out, r, rows, static_cast<int>(n0 / C), groups);
    const int g = static_cast<int>(n0 / C);
    switch (n - n0) {
      case 4:
        TileAvx512<R, 4>(W, ld, in, x, n0, y, out, r, rows, g, groups);
        break;
      case 3:
        TileAvx512<R, 3>(W, ld, in, x, n0, y, out, r, rows, g, groups);
        break;
      case 2:
        TileAvx512<R, 2>(W, ld, in, x, n0, y, out, r, rows, g, groups);
        break;
      case 1:
        TileAvx512<R, 1>(W, ld, in, x, n0, y, out, r, rows, g, groups);
        break;
      default:
        break;
    }
  }
}

// Tile shape by batch: groups of C = 4 inputs against R = 6 weight rows (24 accumulators) measured
// best on streamed weights (wider input groups, e.g. 3x8, spill x out of L1 at n = 16).
template <typename T>
void SkinnyAvx512(const T* W, int64_t ld, int64_t in, const float* x, int64_t n, float* y,
                  int64_t out, int64_t r0, int64_t r1) {
  if (n >= 4) {
    SkinnyRowsAvx512<6, 4>(W, ld, in, x, n, y, out, r0, r1);
  } else if (n == 3) {
    SkinnyRowsAvx512<6, 3>(W, ld, in, x, n, y, out, r0, r1);
  } else {
    SkinnyRowsAvx512<8, 2>(W, ld, in, x, n, y, out, r0, r1);
  }
}

template <typename T>
void SkinnyScalar(const T* W, int64_t ld, int64_t in, const float* x, int64_t n, float* y,
                  int64_t out, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* w = W + r * ld;
    for (int64_t j = 0; j < n; ++j) {
      const float* xr = x + j * in;
      float s = 0.f;
      for (int64_t i = 0; i < in; ++i) s += ToFloat(w[i]) * xr[i];
      y[j * out + r] = s;
    }
  }
}

// Rows per parallel task: large enough to amortise scheduling, multiple of 4 for the GEMV.
// Rows per parallel chunk: a few chunks per thread, but never less work per chunk than the cost
// of waking a thread (small products, e.g. unmerged adapters' rank-r factors, run serially).
int64_t GrainRows(int64_t out, int64_t macs_per_row) {
  constexpr int64_t kMinMacsPerChunk = 32768;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t g = (out + threads * 4 - 1) / (threads * 4);
  g = std::max<int64_t>(g,
                        (kMinMacsPerChunk + macs_per_row - 1) / std::max<int64_t>(1, macs_per_row));
  return std::max<int64_t>(16, (g + 3) / 4 * 4);
}

template <typename T>
void LinearTyped(const float* x, int64_t n, const at::Tensor& W, float* y, LinearPath path) {
  const int64_t out = W.size(0), in = W.size(1);
  const T* w = W.data_ptr<T>();
  const int64_t ld = W.stride(0);
  // Half weights with many rows (prefill): the skinny kernel over blocks of inputs that stay in
  // L2, instead of widening the whole matrix to fp32 for BLAS on every call.
  constexpr bool kHalf = std::is_same_v<T, at::Half>;
  if (kHalf && path != LinearPath::kTorch && n > kSkinnyMaxRows &&
      ActiveKernelIsa() != KernelIsa::kScalar) {
    constexpr int64_t kBlock = 128;
    for (int64_t r0 = 0; r0 < n; r0 += kBlock) {
      const int64_t rows = std::min(kBlock, n - r0);
      at::parallel_for(0, out, GrainRows(out, in * rows), [&](int64_t a, int64_t b) {
        if (ActiveKernelIsa() == KernelIsa::kAvx512) {
          SkinnyAvx512(w, ld, in, x + r0 * in, rows, y + r0 * out, out, a, b);
        } else {
          SkinnyAvx2(w, ld, in, x + r0 * in, rows, y + r0 * out, out, a, b);
        }
      });
    }
    return;
  }
  if (path == LinearPath::kTorch || n > kSkinnyMaxRows) {
    // BLAS GEMM (prefill) or the libtorch baseline; half weights are widened first (libtorch
    // 1.13 has no half GEMM on CPU): the baseline and the scalar fallback only.
    at::Tensor xt = at::from_blob(const_cast<float*>(x), {n, in});
    at::Tensor yt = at::from_blob(y, {n, out});
    at::Tensor wf = W.scalar_type() == at::kFloat ? W : W.to(at::kFloat);
    if (path == LinearPath::kTorch) {
      yt.copy_(at::linear(xt, wf));
    } else {
      at::mm_out(yt, xt, wf.t());
    }
  } else if (ActiveKernelIsa() == KernelIsa::kScalar) {
    at::parallel_for(0, out, GrainRows(out, in * n), [&](int64_t r0, int64_t r1) {
      SkinnyScalar(w, ld, in, x, n, y, out, r0, r1);
    });
  } else if (n == 1) {
    at::parallel_for(0, out, GrainRows(out, in * n),
                     [&](int64_t r0, int64_t r1) { GemvAvx2(w, ld, in, x, y, r0, r1); });
  } else if (ActiveKernelIsa() == KernelIsa::kAvx512) {
    at::parallel_for(0, out, GrainRows(out, in * n), [&](int64_t r0, int64_t r1) {
      SkinnyAvx512(w, ld, in, x, n, y, out, r0, r1);
    });
  } else {
    at::parallel_for(0, out, GrainRows(out, in * n),
                     [&](int64_t r0, int64_t r1) { SkinnyAvx2(w, ld, in, x, n, y, out, r0, r1); });
  }
}

}  // namespace

namespace {
std::atomic<int> g_forced_isa{static_cast<int>(KernelIsa::kAuto)};
}  // namespace

bool CpuHasAvx512() {
  static const bool has = CpuHasAvx2Fma() && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return has;
}

bool CpuHasAvx512Bf16() {
  static const bool has = CpuHasAvx512() && __builtin_cpu_supports("avx512bf16");
  return has;
}

bool CpuHasAmx(AmxExtension extension) {
  static const unsigned edx = [] {
    unsigned eax, ebx, ecx, edx = 0;
    return __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) ? edx : 0u;
  }();
  // The tiles, and Linux's permission to use their state: it hands it out per process on request
  // (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once.
  static const bool tiles = [] {
    if (!((edx >> 24) & 1)) return false;  // AMX-TILE
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return tiles && ((edx >> static_cast<int>(extension)) & 1);
}

bool CpuHasAmxBf16() {
  static const bool has = CpuHasAvx512Bf16() && CpuHasAmx(AmxExtension::kBf16);
  return has;
}

void ForceKernelIsa(KernelIsa isa) {
  g_forced_isa.store(static_cast<int>(isa));
}

KernelIsa ActiveKernelIsa() {
  const auto best = CpuHasAvx512()    ? KernelIsa::kAvx512
                    : CpuHasAvx2Fma() ? KernelIsa::kAvx2
                                      : KernelIsa::kScalar;
  const auto forced = static_cast<KernelIsa>(g_forced_isa.load(std::memory_order_relaxed));
  if (forced == KernelIsa::kAuto || static_cast<int>(forced) > static_cast<int>(best)) return best;
  return forced;
}

const char* KernelIsaName(KernelIsa isa) {
  switch (isa) {
    case KernelIsa::kAvx512:
      return "avx512";
    case KernelIsa::kAvx2:
      return "avx2";
    case KernelIsa::kScalar:
      return "scalar";
    default:
      return "auto";
  }
}

bool CpuHasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

void Linear(const float* x, int64_t n, const at::Tensor& W, const float* bias, float* y,
            LinearPath path) {
  const int64_t out = W.size(0);
  if (n == 0 || out == 0) return;
  TORCH_CHECK(W.stride(1) == 1 || W.size(1) <= 1, "Linear: weight needs unit column stride");
  if (W.scalar_type() == at::kHalf) {
    LinearTyped<at::Half>(x, n, W, y, path);
  } else {
    TORCH_CHECK(W.scalar_type() == at::kFloat, "Linear: weights must be fp32 or fp16");
    LinearTyped<float>(x, n, W, y, path);
  }
  if (bias) {
    for (int64_t j = 0; j < n; ++j) AddInPlace(y + j * out, bias, out);
  }
}

namespace {

float DotScalar(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void LinearRowwise(const float* x, int64_t n, const at::Tensor& W, float* y) {
  const int64_t out = W.size(0), in = W.size(1);
  if (n == 0 || out == 0) return;
  TORCH_CHECK(W.scalar_type() == at::kFloat && (W.stride(1) == 1 || in <= 1),
              "LinearRowwise: fp32 weight with unit column stride");
  const float* w = W.data_ptr<float>();
  const int64_t ld = W.stride(0);
  const bool avx2 = ActiveKernelIsa() != KernelIsa::kScalar;
  at::parallel_for(0, out, GrainRows(out, in * n), [&](int64_t r0, int64_t r1) {
    if (avx2) {
      RowwiseAvx2(w, ld, in, x, n, y, out, r0, r1);
    } else {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < n; ++j) y[j * out + r] = DotScalar(w + r * ld, x + j * in, in);
    }
  });
}

// The elementwise loops below auto-vectorise; target_clones adds an AVX2 copy picked at load time.
#define AMOEBA_CLONES __attribute__((target_clones("avx2", "default")))

float Dot(const float* a, const float* b, int64_t n) {
  return CpuHasAvx2Fma() ? DotAvx2(a, b, n) : DotScalar(a, b, n);  // scores, RmsNorm
}

AMOEBA_CLONES void RmsNorm(const float* x, const float* w, int64_t rows, int64_t dim, double eps,
                           float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* o = out + r * dim;
    const float ss = Dot(xr, xr, dim);
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + static_cast<float>(eps));
    for (int64_t i = 0; i < dim; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

namespace {
void SiluMulScalar(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
}

// Every element goes through the same vector code (the tail through a padded copy), so a value
// does not depend on where it sits in the range: rows stay independent of the batch.
AMOEBA_AVX2 inline __m256 Silu8Times(__m256 x, __m256 y) {
  const __m256 e = simd::Exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)), y);
}

AMOEBA_AVX2 void SiluMulAvx2(float* a, const float* b, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(a + i, Silu8Times(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  if (i < n) {
    alignas(32) float ta[8] = {}, tb[8] = {};
    std::copy(a + i, a + n, ta);
    std::copy(b + i, b + n, tb);
    _mm256_store_ps(ta, Silu8Times(_mm256_load_ps(ta), _mm256_load_ps(tb)));
    std::copy(ta, ta + (n - i), a + i);
  }
}

AMOEBA_AVX512 void SiluMulAvx512(float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
    const __m512 x = _mm512_maskz_loadu_ps(m, a + i), y = _mm512_maskz_loadu_ps(m, b + i);
    const __m512 e = simd::Exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    _mm512_mask_storeu_ps(
        a + i, m, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)), y));
  }
}
}  // namespace

void SiluMul(float* a, const float* b, int64_t n) {
  // Vector exp: a decode step's MLP width (~2-6K values) is too little to split across threads
  // (a fork/join costs more); a batch's worth is split.
  const KernelIsa isa = ActiveKernelIsa();
  ParallelFor(0, n, 16384, [&](int64_t s, int64_t e) {
    if (isa == KernelIsa::kAvx512) {
      SiluMulAvx512(a + s, b + s, e - s);
    } else if (isa == KernelIsa::kAvx2) {
      SiluMulAvx2(a + s, b + s, e - s);
    } else {
      SiluMulScalar(a + s, b + s, e - s);
    }
  });
}

AMOEBA_CLONES void AddInPlace(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

AMOEBA_CLONES void Axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

namespace {
// The rule: the first largest value, NaNs skipped; 0 when there is none.
int64_t ArgmaxScalar(const float* x, int64_t n) {
  int64_t best = -1;
  float v = 0;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isnan(x[i]) && (best < 0 || x[i] > v)) v = x[i], best = i;
  return best < 0 ? 0 : best;
}

// One pass for the largest value (max_ps returns its second operand when the first is NaN, so
// NaNs never win), one for its first index: ArgmaxScalar's pick. All -inf or NaN: the scalar rule.
AMOEBA_AVX2 int64_t ArgmaxAvx2(const float* x, int64_t n) {
  const float inf = std::numeric_limits<float>::infinity();
  __m256 m0 = _mm256_set1_ps(-inf), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
    m1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), m1);
    m2 = _mm256_max_ps(_mm256_loadu_ps(x + i + 16), m2);
    m3 = _mm256_max_ps(_mm256_loadu_ps(x + i + 24), m3);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  float v = -inf;
  for (float l : lanes) v = l > v ? l : v;
  for (int64_t j = i; j < n; ++j) v = x[j] > v ? x[j] : v;
  if (v == -inf) return ArgmaxScalar(x, n);
  const __m256 vv = _mm256_set1_ps(v);
  for (i = 0; i + 8 <= n; i += 8)
    if (const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vv, _CMP_EQ_OQ)))
      return i + __builtin_ctz(static_cast<unsigned>(mask));
  for (; i < n; ++i)
    if (x[i] == v) return i;
  return 0;
}

// max(a, b), b where a is NaN. The masked form: gcc 12 warns of the plain one's undefined source.
AMOEBA_AVX512 inline __m512 Max16(__m512 a, __m512 b) {
  return _mm512_mask_max_ps(b, 0xFFFF, a, b);
}

// ArgmaxAvx2 in 16 lanes, the tails masked.
AMOEBA_AVX512 int64_t ArgmaxAvx512(const float* x, int64_t n) {
  const float inf = std::numeric_limits<float>::infinity();
  __m512 m0 = _mm512_set1_ps(-inf), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    m0 = Max16(_mm512_loadu_ps(x + i), m0);
    m1 = Max16(_mm512_loadu_ps(x + i + 16), m1);
    m2 = Max16(_mm512_loadu_ps(x + i + 32), m2);
    m3 = Max16(_mm512_loadu_ps(x + i + 48), m3);
  }
  for (; i < n; i += 16) {
    const __mmask16 k = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
    m0 = _mm512_mask_max_ps(m0, k, _mm512_maskz_loadu_ps(k, x + i), m0);
  }
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, Max16(Max16(m0, m1), Max16(m2, m3)));
  float v = -inf;
  for (float l : lanes) v = l > v ? l : v;
  if (v == -inf) return ArgmaxScalar(x, n);
  const __m512 vv = _mm512_set1_ps(v);
  for (i = 0; i < n; i += 16) {
    const __mmask16 k = static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1);
    if (const __mmask16 eq =
            _mm512_mask_cmp_ps_mask(k, _mm512_maskz_loadu_ps(k, x + i), vv, _CMP_EQ_OQ))
      return i + __builtin_ctz(static_cast<unsigned>(eq));
  }
  return 0;
}

AMOEBA_AVX2 void FloatToHalfF16c(const float* x, at::Half* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) y[i] = static_cast<at::Half>(x[i]);
}
}  // namespace

int64_t Argmax(const float* x, int64_t n) {
  switch (ActiveKernelIsa()) {
    case KernelIsa::kAvx512:
      return ArgmaxAvx512(x, n);
    case KernelIsa::kAvx2:
      return ArgmaxAvx2(x, n);
    default:
      return ArgmaxScalar(x, n);
  }
}

void FloatToHalf(const float* x, at::Half* y, int64_t n) {
  if (CpuHasAvx2Fma()) return FloatToHalfF16c(x, y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<at::Half>(x[i]);
}

AMOEBA_CLONES void Scale(float* y, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

}  // namespace amoeba
