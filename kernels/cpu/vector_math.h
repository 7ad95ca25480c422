// Math the CPU kernels' vector loops can call: branch-free, so a loop over it vectorises at whatever instruction
// set the caller is compiled for (isa.h).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace scalekv::cpu {

// Cephes' expf without branches: 2^n * p(r), r = x - n ln 2; 0 below the f32 range (exp(-inf) = 0 exactly).
// n is x / ln 2 rounded to nearest by adding and subtracting 1.5 * 2^23 (|x / ln 2| < 128 is far inside the 2^22
// this needs): std::floor would be a libm call that keeps GCC from vectorising the loops that call this.
SKV_ALWAYS_INLINE float exp_poly(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float n = (xc * 1.44269504088896341f + kRound) - kRound;
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.0f : y * scale;
}

// Sums over a row in kSumLanes interleaved partial sums: a fixed-size inner loop the compiler keeps in vector
// registers at the caller's instruction-set level (a sequential sum is one dependent add per element). The order
// differs from a sequential sum by the usual f32 reassociation error.
constexpr int kSumLanes = 16;

SKV_ALWAYS_INLINE float sum_lanes(const float* x, int n) {
  float part[kSumLanes] = {};
  int i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int j = 0; j < kSumLanes; ++j) part[j] += x[i + j];
  float s = 0.0f;
  for (; i < n; ++i) s += x[i];
  for (float p : part) s += p;
  return s;
}

// sum of (x - centre)^2
SKV_ALWAYS_INLINE float sum_sq_lanes(const float* x, int n, float centre) {
  float part[kSumLanes] = {};
  int i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int j = 0; j < kSumLanes; ++j) part[j] += (x[i + j] - centre) * (x[i + j] - centre);
  float s = 0.0f;
  for (; i < n; ++i) s += (x[i] - centre) * (x[i] - centre);
  for (float p : part) s += p;
  return s;
}

}  // namespace scalekv::cpu
