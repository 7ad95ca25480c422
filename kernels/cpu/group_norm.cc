// group_norm on the CPU, one (batch, group) per task: mean, then the biased variance about it (two passes,
// double accumulators, so long groups lose nothing to cancellation), then y = (x - mean)*s + bias[c] with
// s = rstd*weight[c] (not torch's x*s + (bias - mean*s), which cancels badly when |mean| >> std), and the
// optional swish y*sigmoid(y).
// In place is safe: a task reads its whole group before writing any of it. Bytes: 3 reads + 1 write of x.
// f32 groups take a vectorised path at the CPU's level (isa.h): eight double partial sums, the swish through
// vector_math.h's exp; other dtypes the element-wise one.
#include <cmath>

#include "element.h"
#include "isa.h"
#include "ops.h"
#include "vector_math.h"

namespace scalekv::cpu {
namespace {

SKV_ALWAYS_INLINE void group_f32_impl(const GroupNormArgs& a, int64_t bg) {
  const int cpg = a.channels / a.groups;
  const int64_t n = int64_t(cpg) * a.spatial;
  const int g = static_cast<int>(bg % a.groups);
  const float* x = static_cast<const float*>(a.x) + bg * n;
  float* out = static_cast<float*>(a.out) + bg * n;
  double part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += x[i + j];
  double sum = 0.0;
  for (; i < n; ++i) sum += x[i];
  for (double p : part) sum += p;
  const double mean = sum / double(n);
  double sq_part[8] = {};
  for (i = 0; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const double d = x[i + j] - mean;
      sq_part[j] += d * d;
    }
  double sq = 0.0;
  for (; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  for (double p : sq_part) sq += p;
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / double(n) + double(a.eps)));
  const float m = static_cast<float>(mean);
  for (int cc = 0; cc < cpg; ++cc) {
    const int c = g * cpg + cc;
    const float s = rstd * load_f32(a.weight, a.param_dtype, c);
    const float t = load_f32(a.bias, a.param_dtype, c);
    const float* xc = x + int64_t(cc) * a.spatial;
    float* oc = out + int64_t(cc) * a.spatial;
    if (a.swish) {
      for (int64_t k = 0; k < a.spatial; ++k) {
        const float y = (xc[k] - m) * s + t;
        oc[k] = y / (1.0f + exp_poly(-y));
      }
    } else {
      for (int64_t k = 0; k < a.spatial; ++k) oc[k] = (xc[k] - m) * s + t;
    }
  }
}

SKV_TARGET_AVX512 void group_f32_avx512(const GroupNormArgs& a, int64_t bg) { group_f32_impl(a, bg); }
SKV_TARGET_AVX2 void group_f32_avx2(const GroupNormArgs& a, int64_t bg) { group_f32_impl(a, bg); }
void group_f32_generic(const GroupNormArgs& a, int64_t bg) { group_f32_impl(a, bg); }

}  // namespace

void group_norm(ThreadPool& pool, const GroupNormArgs& a) {
  const int cpg = a.channels / a.groups;
  const int64_t n = int64_t(cpg) * a.spatial;
  if (a.dtype == DType::f32) {
    const auto group = for_isa(group_f32_avx512, group_f32_avx2, group_f32_generic);
    pool.parallel_for(int64_t(a.batch) * a.groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) group(a, bg);
    });
    return;
  }
  pool.parallel_for(int64_t(a.batch) * a.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bg = begin; bg < end; ++bg) {
      const int g = static_cast<int>(bg % a.groups);
      const int64_t base = bg * n;  // groups are contiguous in NCHW
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) sum += load_f32(a.x, a.dtype, base + i);
      const double mean = sum / double(n);
      double sq = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const double d = load_f32(a.x, a.dtype, base + i) - mean;
        sq += d * d;
      }
      const float rstd = static_cast<float>(1.0 / std::sqrt(sq / double(n) + double(a.eps)));
      for (int cc = 0; cc < cpg; ++cc) {
        const int c = g * cpg + cc;
        const float s = rstd * load_f32(a.weight, a.param_dtype, c);
        const float t = load_f32(a.bias, a.param_dtype, c);
        const float m = static_cast<float>(mean);
        const int64_t off = base + int64_t(cc) * a.spatial;
        for (int64_t i = 0; i < a.spatial; ++i) {
          float y = (load_f32(a.x, a.dtype, off + i) - m) * s + t;
          if (a.swish) y = y / (1.0f + std::exp(-y));
          store_f32(a.out, a.dtype, off + i, y);
        }
      }
    }
  });
}

}  // namespace scalekv::cpu
