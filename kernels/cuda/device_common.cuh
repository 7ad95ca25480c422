// Device helpers every kernel family shares: f32 <-> storage conversions, warp reductions over a full warp,
// and the status word. In scalekv::cuda_ops, so kernels in its nested and anonymous namespaces find them.
#pragma once

#include <atomic>
#include <mutex>
#include <string>

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

// ---------------------------------------------------------------------------------------------------------
// Host side: per-device launch facts, queried or set once rather than on every launch.

// The current device; throws BackendError (what: the caller, for the message) where CUDA cannot say.
inline int current_device(const char* what) {
  int dev = 0;
  const cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, std::string("cuda: ") + what + ": cudaGetDevice: " + cudaGetErrorString(err));
  return dev;
}

// Host side: whether a device pointer suits 16-byte vector loads and cp.async.
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// SMs of the current device, queried once per device (0-63; later devices every call).
inline int sm_count(const char* what) {
  static std::atomic<int> cached[64];  // 0: not yet queried
  const int dev = current_device(what);
  int n = dev >= 0 && dev < 64 ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (n > 0) return n;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess || n <= 0)
    throw BackendError(StatusCode::device, std::string("cuda: ") + what + ": SM count: " + cudaGetErrorString(err));
  if (dev >= 0 && dev < 64) cached[dev].store(n, std::memory_order_relaxed);
  return n;
}

// Dynamic shared memory one kernel instantiation has been opted in to, per device (0: the default 48 KiB). One
// static per instantiation, in its launcher (a static inside a template over the kernel's type would be shared
// by every kernel of that signature).
struct SmemOptIn {
  std::atomic<int> bytes[64];  // zero-initialised as a static
};

// Opts `kernel` in to at least `bytes` of dynamic shared memory on the current device, calling
// cudaFuncSetAttribute only the first time per device, or when a launch needs more than before (the attribute is
// per device context; it is never lowered, so a smaller launch after a larger one needs nothing). Devices past
// 64 call it every time.
template <typename Kernel>
void opt_in_smem(Kernel kernel, size_t bytes, SmemOptIn& state, const char* what) {
  if (bytes <= 48 * 1024) return;
  const int dev = current_device(what);
  std::atomic<int>* const done = dev >= 0 && dev < 64 ? &state.bytes[dev] : nullptr;
  if (done && done->load(std::memory_order_acquire) >= static_cast<int>(bytes)) return;
  static std::mutex mutex;  // two threads raising the same kernel: the larger value must be the one set last
  const std::lock_guard<std::mutex> lock(mutex);
  if (done && done->load(std::memory_order_acquire) >= static_cast<int>(bytes)) return;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, std::string("cuda: ") + what + ": " + std::to_string(bytes) +
                                               " bytes of shared memory refused: " + cudaGetErrorString(err));
  if (done) done->store(static_cast<int>(bytes), std::memory_order_release);
}

}  // namespace scalekv::cuda_ops
