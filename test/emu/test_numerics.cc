// bf16 / half conversions (round to nearest even, NaN-safe, as cuda_bf16.hpp / cuda_fp16.hpp) and the
// bit and min/max intrinsics.
#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "selftest.h"

namespace {
uint16_t bits(__nv_bfloat16 b) { return b.__x; }
uint16_t bits(__half h) { return h.__x; }
}  // namespace

EMU_TEST(bf16_rounds_to_nearest_even) {
  CHECK(bits(__float2bfloat16(1.0f)) == 0x3f80);
  CHECK(bits(__float2bfloat16(1.00390625f)) == 0x3f80);  // tie, round down to even
  CHECK(bits(__float2bfloat16(1.01171875f)) == 0x3f82);  // tie, round up to even
  CHECK(bits(__float2bfloat16(__uint_as_float(0x3f808001u))) == 0x3f81);  // just above the tie
  CHECK(bits(__float2bfloat16_rn(-2.5f)) == 0xc020);
  CHECK(bits(__float2bfloat16(FLT_MAX)) == 0x7f80);      // rounds up to inf, as on the GPU
  CHECK(bits(__float2bfloat16(-INFINITY)) == 0xff80);
  CHECK(bits(__float2bfloat16(NAN)) == 0x7fff);
  CHECK(bits(__float2bfloat16(__uint_as_float(0xffffffffu))) == 0x7fff);  // NaN stays NaN (no carry into inf)
  CHECK(bits(__float2bfloat16(__uint_as_float(0x7f80ffffu))) == 0x7fff);
  CHECK(__bfloat162float(__float2bfloat16(3.0f)) == 3.0f);
  const __nv_bfloat162 p = __floats2bfloat162_rn(1.5f, -4.0f);
  CHECK(__low2float(p) == 1.5f && __high2float(p) == -4.0f);
  CHECK(skv::pack_bf16x2(1.0f, 2.0f) == (0x3f80u | 0x4000u << 16));
}

EMU_TEST(half_conversion_matches_float16) {
  CHECK(bits(__float2half(1.0f)) == 0x3c00);
  CHECK(bits(__float2half(65504.0f)) == 0x7bff);
  CHECK(bits(__float2half(65520.0f)) == 0x7c00);  // the tie above the largest half rounds to inf
  CHECK(bits(__float2half(5.9604645e-8f)) == 0x0001);
  CHECK(bits(__float2half(2.9802322e-8f)) == 0x0000);  // half of the smallest subnormal: tie to even (0)
  CHECK(bits(__float2half(NAN)) == 0x7fff);
#ifdef __FLT16_MAX__
  int bad = 0;
  for (uint64_t u = 0; u < (1ull << 32); u += 4099) {
    const float f = __uint_as_float(static_cast<uint32_t>(u));
    if (std::isnan(f)) continue;
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    bad += bits(__float2half(f)) != want;
  }
  CHECK(bad == 0);
  for (uint32_t h = 0; h < 65536; ++h) {
    _Float16 v;
    const uint16_t b = static_cast<uint16_t>(h);
    std::memcpy(&v, &b, 2);
    __half raw;
    raw.__x = b;
    const float got = __half2float(raw);
    CHECK(std::isnan(got) ? std::isnan(static_cast<float>(v)) : got == static_cast<float>(v));
  }
#endif
}

EMU_TEST(bit_and_minmax_intrinsics) {
  CHECK(__popc(0xf0f0u) == 8);
  CHECK(__clz(1) == 31 && __clz(0) == 32 && __clz(-1) == 0);
  CHECK(__ffs(0) == 0 && __ffs(8) == 4);
  CHECK(__brev(1u) == 0x80000000u);
  CHECK(__float_as_uint(1.0f) == 0x3f800000u && __int_as_float(0x40000000) == 2.0f);
  static_assert(std::is_same_v<decltype(min(3, 5u)), unsigned>);
  static_assert(std::is_same_v<decltype(max(3, 5)), int>);
  static_assert(std::is_same_v<decltype(min(1.0f, 2.0f)), float>);
  CHECK(min(-1, 2) == -1 && max(2.5f, -1.0f) == 2.5f);
  CHECK(rsqrtf(4.0f) == 0.5f && __expf(0.0f) == 1.0f && __fdividef(1.0f, 4.0f) == 0.25f);
}
