// pixel_shuffle2x (spec sec. 9.3): out[b, 2r+dy, 2q+dx, c] = in[b, r, q, c*4 + dy*2 + dx], channels-last on
// both sides, any dtype (moved as raw words). One thread per output element. Bytes: 2 * in.
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

template <typename T>
__global__ void pixel_shuffle2x_kernel(const T* in, T* out, int64_t total, int height, int width, int channels) {
  for (int64_t e = elem::global_thread(); e < total; e += elem::global_stride()) {
    const int c = static_cast<int>(e % channels);
    const int X = static_cast<int>(e / channels % (2 * width));
    const int Y = static_cast<int>(e / (int64_t(channels) * 2 * width) % (2 * height));
    const int64_t b = e / (int64_t(channels) * 4 * width * height);
    const int64_t token = (b * height + Y / 2) * width + X / 2;
    out[e] = in[token * 4 * channels + c * 4 + (Y % 2) * 2 + X % 2];
  }
}

}  // namespace

void pixel_shuffle2x(const PixelShuffle2xArgs& a, cudaStream_t stream) {
  const int64_t total = int64_t(a.batch) * a.height * a.width * 4 * a.channels;
  if (total == 0) return;
  elem::dispatch_word(a.dtype, [&](auto word) {
    using T = decltype(word);
    SKV_LAUNCH(pixel_shuffle2x_kernel<T>, dim3(elem::grid_for(total)), dim3(elem::kThreads), 0, stream,
               static_cast<const T*>(a.in), static_cast<T*>(a.out), total, a.height, a.width, a.channels);
  });
  elem::check_launch("pixelShuffle2x");
}

}  // namespace scalekv::cuda_ops
