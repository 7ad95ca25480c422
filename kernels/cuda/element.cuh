// Shared pieces of the latent and VAE-decoder kernels: f32 <-> storage conversions, the runtime-dtype
// dispatch of their launchers, and the grid size of their grid-stride loops.
#pragma once

#include <algorithm>
#include <string>

#include "../backend.h"
#include "device_common.cuh"
#include "portable.cuh"

namespace scalekv::cuda_ops::elem {



// Calls fn(T{}) with T = float or bf16 for a float dtype; the binding has already rejected the others.
template <typename Fn>
void dispatch_float(DType dtype, const char* op, Fn&& fn) {
  if (dtype == DType::f32) fn(float{});
  else if (dtype == DType::bf16) fn(bf16{});
  else throw BackendError(StatusCode::internal, std::string(op) + ": unsupported dtype " + dtype_name(dtype));
}

// Calls fn(T{}) with an unsigned word of the dtype's size, for ops that only move elements.
template <typename Fn>
void dispatch_word(DType dtype, Fn&& fn) {
  switch (dtype_size(dtype)) {
    case 1: fn(uint8_t{}); break;
    case 2: fn(uint16_t{}); break;
    default: fn(uint32_t{}); break;
  }
}

// Launchers check their own launches (the backends call them under their lock and add nothing).
inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, std::string(op) + ": launch failed: CUDA error " + std::to_string(static_cast<int>(err)));
}

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements: enough to fill the device, capped so the grid stays 1-D.
inline unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16)));
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t global_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

}  // namespace scalekv::cuda_ops::elem
