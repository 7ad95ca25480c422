// Device helpers shared by the transformer-op kernels (gemm.cu, layer_norm.cu, ...): dtype-dispatched loads
// and stores in f32, the activations as torch computes them, warp/block sums, the status word, launch checks.
#pragma once

#include <string>

#include "device_common.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops::tx {


// Element i of an f32 or bf16 tensor whose dtype is only known at run time (uniform across the grid).
__device__ __forceinline__ float load_f32(const void* p, DType t, int64_t i) {
  return t == DType::f32 ? static_cast<const float*>(p)[i] : __bfloat162float(static_cast<const bf16*>(p)[i]);
}
__device__ __forceinline__ void store_f32(void* p, DType t, int64_t i, float v) {
  if (t == DType::f32) static_cast<float*>(p)[i] = v;
  else static_cast<bf16*>(p)[i] = __float2bfloat16(v);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float apply_epilogue(Epilogue e, float x) {
  return e == Epilogue::gelu_tanh ? gelu_tanh(x) : e == Epilogue::silu ? silu(x) : x;
}


// Sum over the block (blockDim.x a multiple of 32, at most 1024); `scratch` holds 32 floats of shared memory
// and may be reused after the call returns (its last read is fenced by the trailing barrier).
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += scratch[w];  // same order in every thread: one value for all
  __syncthreads();
  return total;
}


// Grid-stride loops: enough blocks to fill the device, capped so the index arithmetic stays in range.
inline unsigned elementwise_blocks(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

// The shared memory of a one-block-per-row kernel that stages its row as f32 after 32 floats of block_sum
// scratch (layer_norm.cu, rms_norm.cu); throws where the row or the grid does not fit a launch.
inline size_t row_staging_smem(const char* what, int channels, int64_t rows) {
  const size_t smem = sizeof(float) * (32 + static_cast<size_t>(channels));
  if (smem > 48 * 1024)
    throw BackendError(StatusCode::internal, std::string(what) + ": " + std::to_string(channels) +
                                                 " channels exceed the CUDA kernel's limit of 12256");
  if (rows > 0x7fffffff) throw BackendError(StatusCode::internal, std::string(what) + ": too many rows");
  return smem;
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, std::string("cuda: ") + what + " launch: " + cudaGetErrorName(err) + ": " +
                                               cudaGetErrorString(err));
}

}  // namespace scalekv::cuda_ops::tx
