// IEEE half conversions with the rounding of cuda_fp16.hpp (round to nearest even, NaN -> 0x7FFF).
#include <cstdint>

#include "emu_cuda_types.h"

namespace skv_emu {

uint16_t float_to_half_bits(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t x = u & 0x7fffffffu;
  if (x > 0x7f800000u) return 0x7fff;
  if (x >= 0x47800000u) return sign | 0x7c00u;  // >= 65536 (and inf): overflow to inf
  if (x < 0x38800000u) {                        // below 2^-14: a half subnormal (or zero)
    const int shift = 126 - static_cast<int>(x >> 23);
    if (shift > 24) return sign;
    const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
    uint32_t r = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = (x - 0x38000000u) >> 13;  // rebias 127 -> 15 and drop 13 mantissa bits
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry into the exponent is correct, up to inf
  return static_cast<uint16_t>(sign | r);
}

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return sign ? -v : v;
  }
  if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
  return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

}  // namespace skv_emu
