// upsample_nearest2x on the CPU: every input element is written to a 2x2 output block; one output row per
// iteration. Elements are moved as raw words, so any dtype works. Bytes: in + 4*in.
#include <cstring>

#include "ops.h"

namespace scalekv::cpu {
namespace {

template <typename T>
void upsample_rows(const UpsampleNearest2xArgs& a, int64_t begin, int64_t end) {
  const int W = a.width, OH = 2 * a.height, OW = 2 * a.width;
  const T* in = static_cast<const T*>(a.in);
  T* out = static_cast<T*>(a.out);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t plane = r / OH;
    const int y = static_cast<int>(r % OH);
    const T* src = in + (plane * a.height + y / 2) * W;
    T* dst = out + r * OW;
    for (int x = 0; x < W; ++x) dst[2 * x] = dst[2 * x + 1] = src[x];
  }
}

}  // namespace

void upsample_nearest2x(ThreadPool& pool, const UpsampleNearest2xArgs& a) {
  const int64_t rows = int64_t(a.batch) * a.channels * 2 * a.height;
  pool.parallel_for(rows, 64, [&](int64_t begin, int64_t end) {
    switch (dtype_size(a.dtype)) {
      case 1: upsample_rows<uint8_t>(a, begin, end); break;
      case 2: upsample_rows<uint16_t>(a, begin, end); break;
      default: upsample_rows<uint32_t>(a, begin, end); break;
    }
  });
}

}  // namespace scalekv::cpu
