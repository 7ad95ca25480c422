// Per-element access for the model ops, whose float tensors are f32 or bf16 (the binding rejects the rest):
// every kernel computes in f32 and rounds to the storage dtype only when it stores.
#pragma once

#include <cstdint>

#include "../backend.h"
#include "numeric.h"

namespace scalekv::cpu {

inline float load_f32(const void* base, DType dtype, int64_t i) {
  return dtype == DType::f32 ? static_cast<const float*>(base)[i] : bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
}

inline void store_f32(void* base, DType dtype, int64_t i, float v) {
  if (dtype == DType::f32) static_cast<float*>(base)[i] = v;
  else static_cast<uint16_t*>(base)[i] = f32_to_bf16(v);
}

}  // namespace scalekv::cpu
