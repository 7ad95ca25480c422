// upsample_nearest2x: out[b,c,y,x] = in[b,c,y/2,x/2], NCHW, any dtype (moved as raw words). One thread per
// output element. Bytes: in + 4*in.
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

template <typename T>
__global__ void upsample_nearest2x_kernel(const T* in, T* out, int64_t total, int height, int width) {
  const int ow = 2 * width, oh = 2 * height;
  for (int64_t e = elem::global_thread(); e < total; e += elem::global_stride()) {
    const int x = static_cast<int>(e % ow), y = static_cast<int>(e / ow % oh);
    const int64_t plane = e / (int64_t(ow) * oh);
    out[e] = in[(plane * height + y / 2) * width + x / 2];
  }
}

}  // namespace

void upsample_nearest2x(const UpsampleNearest2xArgs& a, cudaStream_t stream) {
  const int64_t total = int64_t(a.batch) * a.channels * 4 * a.height * a.width;
  if (total == 0) return;
  elem::dispatch_word(a.dtype, [&](auto word) {
    using T = decltype(word);
    SKV_LAUNCH(upsample_nearest2x_kernel<T>, dim3(elem::grid_for(total)), dim3(elem::kThreads), 0, stream,
               static_cast<const T*>(a.in), static_cast<T*>(a.out), total, a.height, a.width);
  });
  elem::check_launch("upsampleNearest2x");
}

}  // namespace scalekv::cuda_ops
