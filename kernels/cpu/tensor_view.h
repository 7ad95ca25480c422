// Row loads for the CPU kernels: every kernel computes in f32 whatever the storage dtype.
#pragma once

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

}  // namespace scalekv::cpu
