// pixel_unshuffle2x on the CPU, the inverse channel mapping of pixel_shuffle2x read from a channels-first
// latent: token (r, q), channel c*4 + dy*2 + dx <- latent[c, 2r+dy, 2q+dx]. One output token per iteration;
// elements move as raw words. Bytes: 2 * in.
#include "ops.h"

namespace scalekv::cpu {
namespace {

template <typename T>
void unshuffle_tokens(const PixelUnshuffle2xArgs& a, int64_t begin, int64_t end) {
  const int C = a.channels, W = a.width, H = a.height;
  const int64_t plane = int64_t(2 * H) * 2 * W;
  const T* in = static_cast<const T*>(a.in);
  T* out = static_cast<T*>(a.out);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / (int64_t(H) * W);
    const int r = static_cast<int>(t / W % H), q = static_cast<int>(t % W);
    T* dst = out + t * 4 * C;
    for (int c = 0; c < C; ++c) {
      const T* src = in + (b * C + c) * plane;
      for (int dy = 0; dy < 2; ++dy)
        for (int dx = 0; dx < 2; ++dx) dst[c * 4 + dy * 2 + dx] = src[int64_t(2 * r + dy) * 2 * W + 2 * q + dx];
    }
  }
}

}  // namespace

void pixel_unshuffle2x(ThreadPool& pool, const PixelUnshuffle2xArgs& a) {
  pool.parallel_for(int64_t(a.batch) * a.height * a.width, 256, [&](int64_t begin, int64_t end) {
    switch (dtype_size(a.dtype)) {
      case 1: unshuffle_tokens<uint8_t>(a, begin, end); break;
      case 2: unshuffle_tokens<uint16_t>(a, begin, end); break;
      default: unshuffle_tokens<uint32_t>(a, begin, end); break;
    }
  });
}

}  // namespace scalekv::cpu
