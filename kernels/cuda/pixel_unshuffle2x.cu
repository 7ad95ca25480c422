// pixel_unshuffle2x: out[b, r*W + q, c*4 + dy*2 + dx] = in[b, c, 2r+dy, 2q+dx] (NCHW latent -> tokens), any
// dtype (moved as raw words). One thread per output element. Bytes: 2 * in.
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

template <typename T>
__global__ void pixel_unshuffle2x_kernel(const T* in, T* out, int64_t total, int height, int width, int channels) {
  for (int64_t e = elem::global_thread(); e < total; e += elem::global_stride()) {
    const int k = static_cast<int>(e % (4 * channels));
    const int64_t token = e / (4 * channels);
    const int q = static_cast<int>(token % width), r = static_cast<int>(token / width % height);
    const int64_t b = token / (int64_t(width) * height);
    const int c = k / 4, dy = (k / 2) % 2, dx = k % 2;
    out[e] = in[((b * channels + c) * 2 * height + 2 * r + dy) * 2 * width + 2 * q + dx];
  }
}

}  // namespace

void pixel_unshuffle2x(const PixelUnshuffle2xArgs& a, cudaStream_t stream) {
  const int64_t total = int64_t(a.batch) * a.height * a.width * 4 * a.channels;
  if (total == 0) return;
  elem::dispatch_word(a.dtype, [&](auto word) {
    using T = decltype(word);
    SKV_LAUNCH(pixel_unshuffle2x_kernel<T>, dim3(elem::grid_for(total)), dim3(elem::kThreads), 0, stream,
               static_cast<const T*>(a.in), static_cast<T*>(a.out), total, a.height, a.width, a.channels);
  });
  elem::check_launch("pixelUnshuffle2x");
}

}  // namespace scalekv::cuda_ops
