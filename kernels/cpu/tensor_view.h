// Row loads for the CPU kernels: every kernel computes in f32 whatever the storage dtype.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../backend.h"
#include "numeric.h"

namespace scalekv::cpu {

inline void load_row_f32(const void* base, DType dtype, int64_t row, int dim, float* dst) {
  if (dtype == DType::f32) {
    std::memcpy(dst, static_cast<const float*>(base) + row * dim, sizeof(float) * dim);
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + row * dim;
    if (dtype == DType::bf16) {
      for (int d = 0; d < dim; ++d) dst[d] = bf16_to_f32(src[d]);
    } else {
      for (int d = 0; d < dim; ++d) dst[d] = f16_to_f32(src[d]);
    }
  }
}

inline void store_row_f32(void* base, DType dtype, int64_t row, int dim, const float* src) {
  if (dtype == DType::f32) {
    std::memcpy(static_cast<float*>(base) + row * dim, src, sizeof(float) * dim);
  } else {
    uint16_t* dst = static_cast<uint16_t*>(base) + row * dim;
    if (dtype == DType::bf16) {
      for (int d = 0; d < dim; ++d) dst[d] = f32_to_bf16(src[d]);
    } else {
      for (int d = 0; d < dim; ++d) dst[d] = f32_to_f16(src[d]);
    }
  }
}

// The 256 values of an 8-bit code, decoded once per format (fp8's bit decoding costs more than a table lookup).
inline const float* kv_code_table(KvFormat f) {
  static const auto tables = [] {
    struct Tables {
      float int8[256], fp8[256];
    } t;
    for (int b = 0; b < 256; ++b) {
      t.int8[b] = kv_decode(KvFormat::int8, uint8_t(b));
      t.fp8[b] = kv_decode(KvFormat::fp8_e4m3, uint8_t(b));
    }
    return t;
  }();
  return f == KvFormat::int8 ? tables.int8 : tables.fp8;
}

// A K or V history as the CPU kernels read it: rows of `dtype`, or 8-bit rows whose token scale bytes (kv_quant.h)
// hold their K and V scales; `values` says which one this is.
struct KvRows {
  const void* data;
  const uint8_t* scales;
  DType dtype;
  KvFormat format;
  bool values;

  size_t row_bytes(int dim) const { return size_t(dim) * (format == KvFormat::plain ? dtype_size(dtype) : 1); }

  void load(int64_t row, int dim, float* dst) const {
    if (format == KvFormat::plain) return load_row_f32(data, dtype, row, dim, dst);
    const uint8_t* src = static_cast<const uint8_t*>(data) + row * dim;
    const float* table = kv_code_table(format);
    const float scale = values ? kv_value_scale(format, scales[row]) : kv_key_scale(format, scales[row]);
    for (int d = 0; d < dim; ++d) dst[d] = table[src[d]] * scale;
  }
};

// The largest magnitude of an f32 row, a NaN counted as infinite.
inline float row_amax(const float* src, int dim) {
  float amax = 0.0f;
  for (int d = 0; d < dim; ++d)
    if (!(std::fabs(src[d]) <= amax)) amax = std::isnan(src[d]) ? INFINITY : std::fabs(src[d]);
  return amax;
}

// Quantises a token's f32 K and V rows into row `row` of 8-bit K and V pools and its scale byte.
inline void store_quant_token(void* k_base, void* v_base, uint8_t* scales, KvFormat format, int64_t row, int dim,
                              const float* k, const float* v) {
  const uint8_t s = kv_scale_byte(row_amax(k, dim), row_amax(v, dim));
  const float k_inv = kv_key_inv_scale(format, s), v_inv = kv_value_inv_scale(format, s);
  uint8_t* dk = static_cast<uint8_t*>(k_base) + row * dim;
  uint8_t* dv = static_cast<uint8_t*>(v_base) + row * dim;
  for (int d = 0; d < dim; ++d) {
    dk[d] = kv_encode(format, k[d], k_inv);
    dv[d] = kv_encode(format, v[d], v_inv);
  }
  scales[row] = s;
}

}  // namespace scalekv::cpu
