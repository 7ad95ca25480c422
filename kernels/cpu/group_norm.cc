// group_norm on the CPU, one (batch, group) per task: mean, then the biased variance about it (two passes,
// double accumulators, so long groups lose nothing to cancellation), then y = (x - mean)*s + bias[c] with
// s = rstd*weight[c] (not torch's x*s + (bias - mean*s), which cancels badly when |mean| >> std), and the
// optional swish y*sigmoid(y).
// In place is safe: a task reads its whole group before writing any of it. Bytes: 3 reads + 1 write of x.
#include <cmath>

#include "element.h"
#include "ops.h"

namespace scalekv::cpu {

void group_norm(ThreadPool& pool, const GroupNormArgs& a) {
  const int cpg = a.channels / a.groups;
  const int64_t n = int64_t(cpg) * a.spatial;
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
