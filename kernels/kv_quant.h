// 8-bit K/V rows (backend.h, KvFormat): one byte per element, and one scale byte per (token, head) that holds the
// scales of its K row and its V row as powers of two. A row is dequantised as decode(code) * 2^e / code_max
// (code_max 127 for int8, 448 for fp8 e4m3), e the smallest exponent with the row's largest magnitude <= 2^e, so
// every row uses at least the upper half of the code range: for fp8 that loses nothing against an exact f32 scale
// (a power of two only shifts e4m3's exponent), for int8 at most one bit. One byte for both rows is what brings the
// 8B's ScaleKV arena under 2,860 MiB (bench/RESULTS.md); a scale per row cannot be shared by tokens or heads,
// because eviction keeps a different token set per head.
//   bits 7..5: -e_K, e_K in [-6, 0]. Keys are L2-normalised (8-bit K/V needs qkNormRope's normalize), so their
//              largest magnitude is in [1/sqrt(head_dim), 1]; a key a rounding above 1 saturates by that rounding.
//   bits 4..0: e_V + 16, e_V in [-16, 15]; a value row below 2^-16 loses precision (not magnitude), above 2^15 it
//              saturates.
//   0xFF (-e_K = 7): a token whose K or V row holds a NaN or an infinity. Both rows store zero codes and read back
//              as NaN: a non-finite key or value poisons every query that attends to it either way.
// The same functions run on the CPU, in CUDA kernels and in the emulator, so the three backends store the same
// bytes for the same f32 rows.
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

// One element x of a row whose encoding factor is `inv_scale` = code_max * 2^-e (0 for a non-finite row).
SKV_QUANT_FN uint8_t kv_encode(KvFormat f, float x, float inv_scale) {
  const float y = x * inv_scale;
  if (f == KvFormat::int8) return uint8_t(int8_t(fminf(fmaxf(rintf(y), -127.0f), 127.0f)));
  return float_to_fp8_e4m3(y);
}

constexpr uint8_t kKvScaleNonFinite = 0xFF;
constexpr int kKvKeyExpMin = -6, kKvKeyExpMax = 0, kKvValueExpMin = -16, kKvValueExpMax = 15;

// 2^e as f32 for e in [-126, 127].
SKV_QUANT_FN float kv_pow2(int e) { return kv_bits_float(uint32_t(e + 127) << 23); }

// The smallest e in [lo, hi] with amax <= 2^e (lo for a zero row); amax finite and >= 0.
SKV_QUANT_FN int kv_scale_exponent(float amax, int lo, int hi) {
  if (!(amax > 0.0f)) return lo;
  const uint32_t bits = kv_float_bits(amax);
  int e = int((bits >> 23) & 0xFFu) - 127;   // amax in [2^e, 2^(e+1)) for a normal amax
  if (e == -127) return lo;                  // subnormal: below every lo
  if ((bits & 0x7FFFFFu) != 0) ++e;          // not a power of two: the next one up
  return e < lo ? lo : e > hi ? hi : e;
}

// The largest magnitudes of a token's K and V rows (a NaN counted as infinite) -> its scale byte.
SKV_QUANT_FN uint8_t kv_scale_byte(float k_amax, float v_amax) {
  if (!(k_amax <= 3.402823466e38f) || !(v_amax <= 3.402823466e38f)) return kKvScaleNonFinite;
  const int ek = kv_scale_exponent(k_amax, kKvKeyExpMin, kKvKeyExpMax);
  const int ev = kv_scale_exponent(v_amax, kKvValueExpMin, kKvValueExpMax);
  return uint8_t((-ek << 5) | (ev - kKvValueExpMin));
}

// The encoding factors of a token's K and V rows under its scale byte (0 for 0xFF: both rows store zero codes).
SKV_QUANT_FN float kv_key_inv_scale(KvFormat f, uint8_t s) {
  return s == kKvScaleNonFinite ? 0.0f : kv_code_max(f) * kv_pow2(s >> 5);
}
SKV_QUANT_FN float kv_value_inv_scale(KvFormat f, uint8_t s) {
  return s == kKvScaleNonFinite ? 0.0f : kv_code_max(f) * kv_pow2(-kKvValueExpMin - (s & 31));
}

// The dequantisation factors of the K and V rows of a scale byte: 2^e * (1 / code_max) (NaN for 0xFF).
SKV_QUANT_FN float kv_key_scale(KvFormat f, uint8_t s) {
  return s == kKvScaleNonFinite ? NAN : (1.0f / kv_code_max(f)) * kv_pow2(-(s >> 5));
}
SKV_QUANT_FN float kv_value_scale(KvFormat f, uint8_t s) {
  return s == kKvScaleNonFinite ? NAN : (1.0f / kv_code_max(f)) * kv_pow2((s & 31) + kKvValueExpMin);
}

}  // namespace scalekv
