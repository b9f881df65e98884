#include "bench/compute_peak.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <utility>

#include "model/kernels.h"

#define AMOEBA_PEAK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))
#define AMOEBA_PEAK_AVX2 __attribute__((target("avx2,fma")))
#define AMOEBA_PEAK_AVX_VNNI __attribute__((target("avxvnni,avx2")))
#define AMOEBA_PEAK_AMX __attribute__((target("amx-tile,amx-int8")))

namespace amoeba::bench {
namespace {

// Every loop folds its chains into this, so none is dead code.
std::atomic<int64_t> sink{0};

// Hides a value from the optimizer: the chains cannot be folded into constants.
template <typename V>
inline void Opaque(V& v) {
  asm volatile("" : "+x"(v));
}

// Each loop runs independent chains of one instruction on registers (more chains than the
// instruction's latency × issue rate, so only the issue rate bounds them) and returns the
// multiply-adds it did.
template <size_t... J>
AMOEBA_PEAK_AVX512 int64_t Fp32Zmm(int64_t iters, std::index_sequence<J...>) {
  __m512 acc[] = {_mm512_set1_ps(1e-3f * J)...};
  __m512 a = _mm512_set1_ps(0.999f), b = _mm512_set1_ps(1e-6f);
  Opaque(a);
  Opaque(b);
  for (int64_t i = 0; i < iters; ++i) ((acc[J] = _mm512_fmadd_ps(acc[J], a, b)), ...);
  alignas(64) float out[16];  // a store, not _mm512_reduce_*: gcc 12 warns inside those
  _mm512_store_ps(out, (acc[J] + ...));
  sink += static_cast<int64_t>(out[0]);
  return iters * static_cast<int64_t>(sizeof...(J)) * 16;
}

template <size_t... J>
AMOEBA_PEAK_AVX2 int64_t Fp32Ymm(int64_t iters, std::index_sequence<J...>) {
  __m256 acc[] = {_mm256_set1_ps(1e-3f * J)...};
  __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-6f);
  Opaque(a);
  Opaque(b);
  for (int64_t i = 0; i < iters; ++i) ((acc[J] = _mm256_fmadd_ps(acc[J], a, b)), ...);
  alignas(32) float out[8];
  _mm256_store_ps(out, (acc[J] + ...));
  sink += static_cast<int64_t>(out[0]);
  return iters * static_cast<int64_t>(sizeof...(J)) * 8;
}

template <size_t... J>
AMOEBA_PEAK_AVX512 int64_t DotZmm(int64_t iters, std::index_sequence<J...>) {
  __m512i acc[] = {_mm512_set1_epi32(J)...};
  __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-5);
  Opaque(a);
  Opaque(b);
  for (int64_t i = 0; i < iters; ++i) ((acc[J] = _mm512_dpbusd_epi32(acc[J], a, b)), ...);
  alignas(64) int32_t out[16];
  _mm512_store_si512(out, (acc[J] + ...));
  sink += out[0];
  return iters * static_cast<int64_t>(sizeof...(J)) * 64;
}

template <size_t... J>
AMOEBA_PEAK_AVX_VNNI int64_t DotYmm(int64_t iters, std::index_sequence<J...>) {
  __m256i acc[] = {_mm256_set1_epi32(J)...};
  __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-5);
  Opaque(a);
  Opaque(b);
  for (int64_t i = 0; i < iters; ++i) ((acc[J] = _mm256_dpbusd_avx_epi32(acc[J], a, b)), ...);
  sink += _mm256_extract_epi32((acc[J] + ...), 0);
  return iters * static_cast<int64_t>(sizeof...(J)) * 32;
}

// AVX2 without VNNI, as the kernel does it: unsigned × signed byte pairs to int16, pairs of those
// to int32, added. Each chain feeds its own accumulator back as the unsigned bytes, so the
// products cannot be hoisted out of the loop.
template <size_t... J>
AMOEBA_PEAK_AVX2 int64_t DotAvx2(int64_t iters, std::index_sequence<J...>) {
  __m256i acc[] = {_mm256_set1_epi32(J)...};
  __m256i b = _mm256_set1_epi8(-5), ones = _mm256_set1_epi16(1);
  Opaque(b);
  Opaque(ones);
  for (int64_t i = 0; i < iters; ++i)
    ((acc[J] = _mm256_add_epi32(acc[J], _mm256_madd_epi16(_mm256_maddubs_epi16(acc[J], b), ones))),
     ...);
  sink += _mm256_extract_epi32((acc[J] + ...), 0);
  return iters * static_cast<int64_t>(sizeof...(J)) * 32;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Four 16 × 16 int32 accumulators, each `tdpbssd` one 16 × 64 by 64 × 16 int8 product.
AMOEBA_PEAK_AMX int64_t DotAmx(int64_t iters) {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
  alignas(64) int8_t operand[16 * 64];
  std::fill(operand, operand + sizeof(operand), int8_t{1});
  alignas(64) int32_t out[16 * 16];
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, operand, 64);
  _tile_loadd(5, operand, 64);
  for (int64_t i = 0; i < iters; ++i) {
    _tile_dpbssd(0, 4, 5);
    _tile_dpbssd(1, 4, 5);
    _tile_dpbssd(2, 4, 5);
    _tile_dpbssd(3, 4, 5);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  sink += out[0];
  return iters * 4 * 16 * 16 * 64;
}

// The best rate of three runs of `loop` on `threads` threads at once (each ~10 ms).
template <typename Loop>
double MultiplyAddsPerSecond(int threads, int64_t iters, Loop loop) {
  threads = std::max(threads, 1);
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    std::atomic<int64_t> done{0};
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) done += loop(iters);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(done.load()) / s);
  }
  return best;
}

}  // namespace

ComputePeak MeasureFp32Peak(int threads) {
  if (CpuHasAvx512())
    return {"vfmadd231ps zmm", MultiplyAddsPerSecond(threads, 1 << 22, [](int64_t n) {
              return Fp32Zmm(n, std::make_index_sequence<16>());
            })};
  if (CpuHasAvx2Fma())
    return {"vfmadd231ps ymm", MultiplyAddsPerSecond(threads, 1 << 22, [](int64_t n) {
              return Fp32Ymm(n, std::make_index_sequence<12>());
            })};
  return {};
}

ComputePeak MeasureInt8Peak(QuantKernel kernel, int threads) {
  switch (kernel) {
    case QuantKernel::kAmxInt8:
      return {"tdpbssd", MultiplyAddsPerSecond(threads, 1 << 17, DotAmx)};
    case QuantKernel::kAvx512Vnni:
      return {"vpdpbusd zmm", MultiplyAddsPerSecond(threads, 1 << 22, [](int64_t n) {
                return DotZmm(n, std::make_index_sequence<16>());
              })};
    case QuantKernel::kAvxVnni:
      return {"vpdpbusd ymm", MultiplyAddsPerSecond(threads, 1 << 22, [](int64_t n) {
                return DotYmm(n, std::make_index_sequence<12>());
              })};
    case QuantKernel::kAvx2:
      return {"vpmaddubsw + vpmaddwd + vpaddd ymm",
              MultiplyAddsPerSecond(threads, 1 << 21, [](int64_t n) {
                return DotAvx2(n, std::make_index_sequence<12>());
              })};
    case QuantKernel::kScalar:
    case QuantKernel::kAuto:
      break;
  }
  return {};
}

}  // namespace amoeba::bench
