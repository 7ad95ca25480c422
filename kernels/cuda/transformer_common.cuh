// Device helpers shared by the transformer-op kernels (gemm.cu, layer_norm.cu, ...): dtype-dispatched loads
// and stores in f32, the activations as torch computes them, warp/block sums, the status word, launch checks.
#pragma once

#include <type_traits>

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

// One warp's online-softmax state for R query rows in the SIMT attention kernels (cross_attention.cu,
// segment_attention.cu): per 32-key tile, lane j holds key j's logit of each row; `add_tile` folds the tile into
// the running max / sum and accumulates P V from the tile's V rows in shared memory ([32][c] f32), lane l
// owning channels l, l + 32, ... (DV of them).
template <int R, int DV>
struct WarpSoftmaxRows {
  float m[R], l[R], o[R][DV];

  __device__ void init() {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;  // this lane's partial sum
#pragma unroll
      for (int i = 0; i < DV; ++i) o[r][i] = 0.0f;
    }
  }

  // s[r] = q_rows[r] . k_row over c channels: this lane's key against the warp's R query rows (smem, f32).
  static __device__ void dots(const float* q_rows, const float* k_row, int c, float (&s)[R]) {
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = 0.0f;
    for (int d = 0; d < c; ++d) {
      const float kd = k_row[d];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] += q_rows[r * c + d] * kd;
    }
  }

  // x[r]: this lane's key logit for row r (-INFINITY where masked; a fully masked tile adds nothing). Overwrites x.
  __device__ void add_tile(float (&x)[R], const float* sV, int c, int lane) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float m_new = fmaxf(m[r], warp_max(x[r]));
      // A row with no finite logit yet keeps zero weight instead of exp(-inf - -inf) = NaN.
      const float m_safe = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m[r] - m_safe);  // 0 on the first tile
      x[r] = expf(x[r] - m_safe);
      l[r] = l[r] * alpha + x[r];
      m[r] = m_new;
#pragma unroll
      for (int i = 0; i < DV; ++i) o[r][i] *= alpha;
    }
    for (int j = 0; j < 32; ++j) {
      float pj[R];
#pragma unroll
      for (int r = 0; r < R; ++r) pj[r] = __shfl_sync(0xffffffffu, x[r], j);
#pragma unroll
      for (int i = 0; i < DV; ++i) {
        const int d = lane + 32 * i;
        if (d < c) {
          const float vd = sV[j * c + d];
#pragma unroll
          for (int r = 0; r < R; ++r) o[r][i] += pj[r] * vd;
        }
      }
    }
  }

  // Row r's normalised output channels to out[0, c) (zeros for a row that saw no key).
  template <typename T>
  __device__ void store(int r, T* out, DType dtype, int c, int lane) const {
    const float total = warp_sum(l[r]);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
#pragma unroll
    for (int i = 0; i < DV; ++i) {
      const int d = lane + 32 * i;
      if (d < c) store_f32(out, dtype, d, o[r][i] * inv);
    }
  }
};

// The per-lane channel registers of the SIMT attention kernels (cross_attention.cu, segment_attention.cu): lane l
// holds channels l, l + 32, ...; DV = 1, 2, 4 or 8 covers head_dim up to 32 * DV (at most 256).
template <class Launch>
void dispatch_channels_per_lane(int head_dim, Launch&& launch) {
  if (head_dim <= 32) launch(std::integral_constant<int, 1>{});
  else if (head_dim <= 64) launch(std::integral_constant<int, 2>{});
  else if (head_dim <= 128) launch(std::integral_constant<int, 4>{});
  else launch(std::integral_constant<int, 8>{});
}

// Launches `Kernel` with `smem` bytes of dynamic shared memory, opting it in past the default 48 KiB first: once
// per device, or again when a launch needs more than any before (the kernel is a template argument so that each
// kernel has its own record).
template <auto Kernel, class... Args>
void launch_with_smem(const char* what, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
  static SmemOptIn opted_in;
  opt_in_smem(Kernel, smem, opted_in, what);
  SKV_LAUNCH(Kernel, grid, block, smem, stream, args...);
  check_launch(what);
}

}  // namespace scalekv::cuda_ops::tx
