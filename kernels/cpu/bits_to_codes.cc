// bits_to_codes on the CPU: channels-last bits -> channels-first +-value codes, one pixel per iteration.
// Bytes: B*H*W*D*(bits size + 4).
#include "ops.h"

namespace scalekv::cpu {

void bits_to_codes(ThreadPool& pool, const BitsToCodesArgs& a) {
  const int64_t plane = int64_t(a.height) * a.width;
  const int64_t pixels = a.batch * plane;
  pool.parallel_for(pixels, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / plane, yx = p % plane;
      float* codes = a.codes + b * a.dim * plane + yx;
      for (int c = 0; c < a.dim; ++c) {
        const int64_t src = p * a.dim + c;
        const bool one = a.bits_dtype == DType::u8 ? static_cast<const uint8_t*>(a.bits)[src] != 0
                                                   : static_cast<const int32_t*>(a.bits)[src] != 0;
        codes[c * plane] = one ? a.value : -a.value;
      }
    }
  });
}

}  // namespace scalekv::cpu
