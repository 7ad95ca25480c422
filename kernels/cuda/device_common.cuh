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

// Block-wide exclusive scan of v over a block of kWarps full warps (every thread must call it). Returns the
// exclusive prefix and the block total in *total. `scratch` (shared) holds kWarps + 1 ints.
template <int kWarps>
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int* total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_sync(0xffffffffu, incl, lane >= o ? lane - o : lane);
    if (lane >= o) incl += y;
  }
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int x = lane < kWarps ? scratch[lane] : 0;
    int wincl = x;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_sync(0xffffffffu, wincl, lane >= o ? lane - o : lane);
      if (lane >= o) wincl += y;
    }
    if (lane < kWarps) scratch[lane] = wincl - x;  // exclusive warp offsets
    if (lane == 31) scratch[kWarps] = wincl;        // block total
  }
  __syncthreads();
  const int excl = scratch[warp] + incl - v;
  *total = scratch[kWarps];
  __syncthreads();  // scratch may be reused by the next call
  return excl;
}

// Records the first data error of the stream (later ones keep the first code and detail).
__device__ __forceinline__ void report_status(int32_t* status, StatusCode code, int32_t detail) {
  if (atomicCAS(reinterpret_cast<int*>(status), 0, static_cast<int>(code)) == 0) status[1] = detail;
}

}  // namespace scalekv::cuda_ops
