// Device helpers every kernel family shares: f32 <-> storage conversions, warp reductions over a full warp,
// and the status word. In scalekv::cuda_ops, so kernels in its nested and anonymous namespaces find them.
#pragma once

#include "../backend.h"
#include "portable.cuh"

namespace scalekv::cuda_ops {

using bf16 = __nv_bfloat16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Records the first data error of the stream (later ones keep the first code and detail).
__device__ __forceinline__ void report_status(int32_t* status, StatusCode code, int32_t detail) {
  if (atomicCAS(reinterpret_cast<int*>(status), 0, static_cast<int>(code)) == 0) status[1] = detail;
}

}  // namespace scalekv::cuda_ops
