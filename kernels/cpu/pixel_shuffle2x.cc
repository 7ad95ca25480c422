// pixel_shuffle2x on the CPU (spec sec. 9.3): token (r, q) with 4c channels becomes the 2x2 block of pixels
// (2r+dy, 2q+dx) with c channels each, channel c*4 + dy*2 + dx -> channel c of pixel (dy, dx). Both sides are
// channels-last. One input token per iteration; elements move as raw words. Bytes: 2 * in.
#include "ops.h"

namespace scalekv::cpu {
namespace {

template <typename T>
void shuffle_tokens(const PixelShuffle2xArgs& a, int64_t begin, int64_t end) {
  const int C = a.channels, W = a.width, H = a.height;
  const T* in = static_cast<const T*>(a.in);
  T* out = static_cast<T*>(a.out);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / (int64_t(H) * W);
    const int r = static_cast<int>(t / W % H), q = static_cast<int>(t % W);
    const T* src = in + t * 4 * C;
    for (int dy = 0; dy < 2; ++dy)
      for (int dx = 0; dx < 2; ++dx) {
        T* dst = out + ((b * 2 * H + 2 * r + dy) * 2 * W + 2 * q + dx) * C;
        for (int c = 0; c < C; ++c) dst[c] = src[c * 4 + dy * 2 + dx];
      }
  }
}

}  // namespace

void pixel_shuffle2x(ThreadPool& pool, const PixelShuffle2xArgs& a) {
  pool.parallel_for(int64_t(a.batch) * a.height * a.width, 256, [&](int64_t begin, int64_t end) {
    switch (dtype_size(a.dtype)) {
      case 1: shuffle_tokens<uint8_t>(a, begin, end); break;
      case 2: shuffle_tokens<uint16_t>(a, begin, end); break;
      default: shuffle_tokens<uint32_t>(a, begin, end); break;
    }
  });
}

}  // namespace scalekv::cpu
