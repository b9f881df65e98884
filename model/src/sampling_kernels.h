// Passes over a row of logits or probabilities for sampling and logprobs, per instruction set
// (ActiveKernelIsa). A sampler reads the whole vocabulary for every token of every sequence: with
// scalar loops and a sort, one top-p token over 32,000 logits took ~2 ms, more than a 16-sequence
// decode step of the 100m preset. Sums go to a double every 1024 elements (32,000-term float sums
// drift past 1e-6).
#pragma once
#include <cstdint>

namespace amoeba {

// max(x[0, n)); -inf when n is 0. NaNs are skipped.
float RowMax(const float* x, int64_t n);
// sum(exp(x - mx)) over x[0, n).
double SumExp(const float* x, int64_t n, float mx);
// p[i] = exp((x[i] - mx) * scale), exactly 0 where that is below e^-87 (so -inf logits, a
// grammar's masked tokens, get 0) and for NaN logits; returns sum(p).
double ExpScaled(const float* x, int64_t n, float mx, float scale, float* p);
// sum(p[i]) over p[i] >= at_least, and how many those are (*count).
double MassAtLeast(const float* p, int64_t n, float at_least, int64_t* count);
// p[i] = 0 where p[i] < at_least; returns sum(p) after.
double ZeroBelow(float* p, int64_t n, float at_least);
// The indices i with lo <= x[i] < hi, ascending, into out (room for n); returns how many.
int64_t IndicesInRange(const float* x, int64_t n, float lo, float hi, int32_t* out);
// The first i with p[0] + ... + p[i] >= r (subtracting in order, as a draw walks a
// distribution); the last i with p[i] > 0 when rounding leaves r above the total, and 0 when
// every p is 0.
int64_t FirstReachingMass(const float* p, int64_t n, double r);

}  // namespace amoeba
