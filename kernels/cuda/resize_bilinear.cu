// resize_bilinear: PyTorch linear interpolation (align_corners=False) of NCHW f32 planes, up or down, with
// the taps of kernels/backend.h (f32 scale, source index from a double product rounded once to f32). One
// thread per output element computes its two taps per axis and evaluates rows along W, then along H, as the
// CPU kernel does. FLOPs ~6 per output; bytes 4*(4 reads + 1 write [+1 read when accumulating]) per output.
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

struct Tap {
  int i0, i1;
  float w0, w1;
};

__device__ __forceinline__ Tap tap(int d, int in, int out, float scale) {
  if (in == out) return Tap{d, d, 1.0f, 0.0f};
  float src = static_cast<float>(static_cast<double>(scale) * (d + 0.5) - 0.5);
  src = fmaxf(src, 0.0f);
  const int i0 = static_cast<int>(src);
  const float w1 = fminf(fmaxf(src - static_cast<float>(i0), 0.0f), 1.0f);
  return Tap{i0, i0 < in - 1 ? i0 + 1 : i0, 1.0f - w1, w1};
}

__global__ void resize_bilinear_kernel(const ResizeBilinearArgs a, int64_t total, float scale_y, float scale_x) {
  for (int64_t e = elem::global_thread(); e < total; e += elem::global_stride()) {
    const int x = static_cast<int>(e % a.out_w);
    const int y = static_cast<int>(e / a.out_w % a.out_h);
    const int64_t plane = e / (int64_t(a.out_w) * a.out_h);
    const Tap ty = tap(y, a.in_h, a.out_h, scale_y), tx = tap(x, a.in_w, a.out_w, scale_x);
    const float* row0 = a.in + (plane * a.in_h + ty.i0) * a.in_w;
    const float* row1 = a.in + (plane * a.in_h + ty.i1) * a.in_w;
    const float r0 = row0[tx.i0] * tx.w0 + row0[tx.i1] * tx.w1;
    const float r1 = row1[tx.i0] * tx.w0 + row1[tx.i1] * tx.w1;
    const float v = r0 * ty.w0 + r1 * ty.w1;
    a.out[e] = a.accumulate ? a.out[e] + v : v;
  }
}

}  // namespace

void resize_bilinear(const ResizeBilinearArgs& a, cudaStream_t stream) {
  const int64_t total = int64_t(a.batch) * a.channels * a.out_h * a.out_w;
  if (total == 0) return;
  const float scale_y = static_cast<float>(a.in_h) / static_cast<float>(a.out_h);
  const float scale_x = static_cast<float>(a.in_w) / static_cast<float>(a.out_w);
  SKV_LAUNCH(resize_bilinear_kernel, dim3(elem::grid_for(total)), dim3(elem::kThreads), 0, stream, a, total, scale_y,
             scale_x);
  elem::check_launch("resizeBilinear");
}

}  // namespace scalekv::cuda_ops
