// resize_bilinear on the CPU: PyTorch's separable linear interpolation (align_corners=False), with the same
// per-axis source indices and weights and the same evaluation order (rows along W first, then along H), so
// results match torch's CPU kernel to the rounding of single operations.
// FLOPs: ~6 per output element; bytes: 4*(in + out [+ out when accumulating]).
#include <algorithm>
#include <vector>

#include "ops.h"

namespace scalekv::cpu {
namespace {

struct AxisTaps {
  std::vector<int> i0, i1;
  std::vector<float> w0, w1;
};

// torch 1.13 area_pixel_compute_source_index: float scale times a double offset, rounded once to float;
// equal sizes take the identity taps exactly (torch special-cases them too).
AxisTaps axis_taps(int in, int out) {
  AxisTaps t;
  t.i0.resize(out);
  t.i1.resize(out);
  t.w0.resize(out);
  t.w1.resize(out);
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int d = 0; d < out; ++d) {
    if (in == out) {
      t.i0[d] = t.i1[d] = d;
      t.w0[d] = 1.0f;
      t.w1[d] = 0.0f;
      continue;
    }
    float src = static_cast<float>(static_cast<double>(scale) * (d + 0.5) - 0.5);
    if (src < 0.0f) src = 0.0f;
    const int i0 = static_cast<int>(src);
    t.i0[d] = i0;
    t.i1[d] = i0 < in - 1 ? i0 + 1 : i0;
    t.w1[d] = std::min(std::max(src - static_cast<float>(i0), 0.0f), 1.0f);
    t.w0[d] = 1.0f - t.w1[d];
  }
  return t;
}

}  // namespace

void resize_bilinear(ThreadPool& pool, const ResizeBilinearArgs& a) {
  const AxisTaps ty = axis_taps(a.in_h, a.out_h), tx = axis_taps(a.in_w, a.out_w);
  const int64_t rows = int64_t(a.batch) * a.channels * a.out_h;
  pool.parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t plane = r / a.out_h;
      const int y = static_cast<int>(r % a.out_h);
      const float* src0 = a.in + (plane * a.in_h + ty.i0[y]) * a.in_w;
      const float* src1 = a.in + (plane * a.in_h + ty.i1[y]) * a.in_w;
      float* dst = a.out + r * a.out_w;
      for (int x = 0; x < a.out_w; ++x) {
        const float r0 = src0[tx.i0[x]] * tx.w0[x] + src0[tx.i1[x]] * tx.w1[x];
        const float r1 = src1[tx.i0[x]] * tx.w0[x] + src1[tx.i1[x]] * tx.w1[x];
        const float v = r0 * ty.w0[y] + r1 * ty.w1[y];
        dst[x] = a.accumulate ? dst[x] + v : v;
      }
    }
  });
}

}  // namespace scalekv::cpu
