// 8-bit K/V rows (backend.h, KvFormat): one byte per element and one f32 scale per (token, head) row, so a row
// is dequantised as decode(byte) * scale. The scale is the row's largest magnitude over the format's largest code
// (127 for int8, 448 for fp8 e4m3), so every row uses the whole code range whatever its norm (keys are unit
// vectors, values are not). The same functions run on the CPU, in CUDA kernels and in the emulator, so the three
// backends store the same bytes for the same f32 row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SKV_QUANT_FN __host__ __device__ __forceinline__
#else
#define SKV_QUANT_FN inline
#endif

namespace scalekv {

enum class KvFormat : int32_t { plain = 0, int8 = 1, fp8_e4m3 = 2 };

SKV_QUANT_FN float kv_code_max(KvFormat f) { return f == KvFormat::int8 ? 127.0f : 448.0f; }

// The same 4 bytes as another type (memcpy folds to a register move, on the device too).
template <typename To, typename From>
SKV_QUANT_FN To kv_bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "a bit cast keeps the size");
  To y;
  memcpy(&y, &x, sizeof(To));
  return y;
}
SKV_QUANT_FN uint32_t kv_float_bits(float x) { return kv_bit_cast<uint32_t>(x); }
SKV_QUANT_FN float kv_bits_float(uint32_t u) { return kv_bit_cast<float>(u); }

// OCP fp8 e4m3 (bias 7, no infinities, 0x7f/0xff NaN) -> f32, exactly. Subnormals (exponent 0) are m * 2^-9.
SKV_QUANT_FN float fp8_e4m3_to_float(uint8_t b) {
  const uint32_t e = (b >> 3) & 0xFu, m = b & 7u;
  const float mag = e ? kv_bits_float(((e + 120u) << 23) | (m << 20)) : float(m) * 0.001953125f;
  return (b & 0x80u) ? -mag : mag;
}

// f32 -> fp8 e4m3, round to nearest even, saturating at 448 (never NaN; a NaN input gives 0).
SKV_QUANT_FN uint8_t float_to_fp8_e4m3(float x) {
  const uint8_t sign = (kv_float_bits(x) >> 24) & 0x80u;
  const float a = fabsf(x);
  if (!(a > 0.0f)) return sign;  // 0, -0 and NaN
  uint32_t code;
  if (a >= 448.0f) {
    code = 0x7Eu;
  } else if (a < 0.015625f) {  // below 2^-6: subnormal steps of 2^-9 (8 steps reach the smallest normal, code 8)
    code = uint32_t(rintf(a * 512.0f));
  } else {
    const uint32_t bits = kv_float_bits(a);
    const int exponent = int((bits >> 23) & 0xFFu) - 127;                     // in [-6, 8]
    const float mantissa = kv_bits_float((bits & 0x7FFFFFu) | (127u << 23));  // in [1, 2)
    // A mantissa that rounds up to 8 carries into the exponent, which the addition does by itself.
    code = (uint32_t(exponent + 7) << 3) + uint32_t(rintf((mantissa - 1.0f) * 8.0f));
    if (code > 0x7Eu) code = 0x7Eu;
  }
  return uint8_t(sign | code);
}

SKV_QUANT_FN float kv_decode(KvFormat f, uint8_t b) {
  return f == KvFormat::int8 ? float(int8_t(b)) : fp8_e4m3_to_float(b);
}

// One element x of a row whose scale is `inv_scale` = code_max / amax (0 for an all-zero row).
SKV_QUANT_FN uint8_t kv_encode(KvFormat f, float x, float inv_scale) {
  const float y = x * inv_scale;
  if (f == KvFormat::int8) return uint8_t(int8_t(fminf(fmaxf(rintf(y), -127.0f), 127.0f)));
  return float_to_fp8_e4m3(y);
}

// The stored scale and the encoding factor of a row whose largest magnitude is amax.
struct KvRowScale {
  float scale, inv_scale;
};
SKV_QUANT_FN KvRowScale kv_row_scale(KvFormat f, float amax) {
  if (amax == 0.0f) return {0.0f, 0.0f};
  // A NaN or infinite row stores zero codes with a NaN scale: it reads back as NaN, as it would in bf16.
  if (!(amax <= 3.402823466e38f)) return {NAN, 0.0f};
  return {amax / kv_code_max(f), kv_code_max(f) / amax};
}

}  // namespace scalekv
