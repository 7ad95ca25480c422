// image_to_u8 on the CPU: NCHW float image -> NHWC uint8 RGB (or BGR), as the official
// ((clamp(x, -1, 1) + 1) / 2 * 255).to(uint8), evaluated in f32 and truncated. NaN maps to 0 (the comparison
// chain sends it to -1). One output pixel per iteration.
#include "element.h"
#include "ops.h"

namespace scalekv::cpu {

void image_to_u8(ThreadPool& pool, const ImageToU8Args& a) {
  const int64_t plane = int64_t(a.height) * a.width;
  pool.parallel_for(a.batch * plane, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / plane, yx = p % plane;
      for (int k = 0; k < 3; ++k) {
        const int c = a.bgr ? 2 - k : k;
        const float x = load_f32(a.image, a.dtype, (b * 3 + c) * plane + yx);
        const float clamped = x > -1.0f ? (x < 1.0f ? x : 1.0f) : -1.0f;
        a.out[p * 3 + k] = static_cast<uint8_t>((clamped + 1.0f) / 2.0f * 255.0f);
      }
    }
  });
}

}  // namespace scalekv::cpu
