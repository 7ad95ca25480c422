// What only the sanitizer builds can catch. ASan: out-of-bounds shared and global accesses (shared memory
// is an exact-size heap block per block). TSan: races between simulated threads, e.g. a missing
// __syncthreads, whatever order the scheduler picked.
#include <vector>

#include "selftest.h"

namespace {

// Planted bug: writes one float past the dynamic shared memory.
__global__ void smem_overrun(float* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  smem[threadIdx.x + 1] = 1.0f;  // thread blockDim.x - 1 writes smem[blockDim.x]
  __syncthreads();
  out[threadIdx.x] = smem[threadIdx.x];
}

// Planted bug: the last thread reads past the input.
__global__ void global_overrun(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

// Planted bug: the last 16-byte chunk is copied with a full 16 bytes from a 24-byte tail.
__global__ void cp_async_overrun(const unsigned char* in, unsigned char* out) {
  SKV_DYNAMIC_SMEM(smem);
  skv::cp_async_16(smem + threadIdx.x * 16, in + threadIdx.x * 16, 16);
  skv::cp_async_commit();
  skv::cp_async_wait<0>();
  out[threadIdx.x] = smem[threadIdx.x * 16];
}

__global__ void reduce_missing_barrier(const float* in, float* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const unsigned tid = threadIdx.x;
  smem[tid] = in[tid];
  // missing __syncthreads()
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) smem[tid] += smem[tid + s];
    __syncthreads();
  }
  if (tid == 0) out[0] = smem[0];
}

__global__ void reduce_ok(const float* in, float* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const unsigned tid = threadIdx.x;
  smem[tid] = in[tid];
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) smem[tid] += smem[tid + s];
    __syncthreads();
  }
  if (tid == 0) out[0] = smem[0];
}

// Planted bug: a warp reduction through shared memory without __syncwarp between the steps.
__global__ void warp_smem_missing_syncwarp(float* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const unsigned lane = threadIdx.x;
  smem[lane] = 1.0f;
  for (unsigned s = 16; s > 0; s >>= 1)
    if (lane < s) smem[lane] += smem[lane + s];
  if (lane == 0) out[0] = smem[0];
}

__global__ void warp_smem_with_syncwarp(float* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const unsigned lane = threadIdx.x;
  smem[lane] = 1.0f;
  __syncwarp();
  for (unsigned s = 16; s > 0; s >>= 1) {
    const float v = lane < s ? smem[lane + s] : 0.0f;
    __syncwarp();
    if (lane < s) smem[lane] += v;
    __syncwarp();
  }
  if (lane == 0) out[0] = smem[0];
}

}  // namespace

EMU_TEST(asan_catches_shared_memory_overrun) {
  if (!selftest::asan_active()) return (void)std::fprintf(stderr, "  skipped: not an AddressSanitizer build\n");
  std::vector<float> out(64);
  EXPECT_DEATH(SKV_LAUNCH(smem_overrun, 1, 64, 64 * sizeof(float), nullptr, out.data()), "heap-buffer-overflow",
               "kernel 'smem_overrun' block (0,0,0) thread (63,0,0)", "smem_overrun");
}

EMU_TEST(asan_catches_global_overrun) {
  if (!selftest::asan_active()) return (void)std::fprintf(stderr, "  skipped: not an AddressSanitizer build\n");
  std::vector<float> in(64), out(64);
  EXPECT_DEATH(SKV_LAUNCH(global_overrun, 1, 64, 0, nullptr, in.data(), out.data()), "heap-buffer-overflow",
               "kernel 'global_overrun'");
}

EMU_TEST(asan_catches_cp_async_source_overrun) {
  if (!selftest::asan_active()) return (void)std::fprintf(stderr, "  skipped: not an AddressSanitizer build\n");
  unsigned char* in = static_cast<unsigned char*>(aligned_alloc(16, 48));  // 2 full chunks + a 16-byte tail
  std::vector<unsigned char> out(4);
  EXPECT_DEATH(SKV_LAUNCH(cp_async_overrun, 1, 4, 64, nullptr, in, out.data()), "heap-buffer-overflow",
               "cp_async_16");
  free(in);
}

// The buffers of the racy launches are made inside the forked child: ThreadSanitizer stops tracking the
// main thread's synchronisation after a fork with other (fiber) threads alive, so host accesses made
// before the fork would be reported against the kernel too.
EMU_TEST(tsan_reports_missing_syncthreads) {
  if (!selftest::tsan_active()) return (void)std::fprintf(stderr, "  skipped: not a ThreadSanitizer build\n");
  std::vector<float> in(128, 1.0f), out(1);
  SKV_LAUNCH(reduce_ok, 1, 128, 128 * sizeof(float), nullptr, in.data(), out.data());  // no report
  CHECK(out[0] == 128.0f);
  EXPECT_DEATH(std::vector<float> child_in(128, 1.0f); std::vector<float> child_out(1);
               SKV_LAUNCH(reduce_missing_barrier, 1, 128, 128 * sizeof(float), nullptr, child_in.data(),
                          child_out.data()),
               "ThreadSanitizer: data race", "in reduce_missing_barrier", "'block (0,0,0) thread (");
}

EMU_TEST(tsan_reports_missing_syncwarp) {
  if (!selftest::tsan_active()) return (void)std::fprintf(stderr, "  skipped: not a ThreadSanitizer build\n");
  std::vector<float> out(1);
  SKV_LAUNCH(warp_smem_with_syncwarp, 1, 32, 32 * sizeof(float), nullptr, out.data());
  CHECK(out[0] == 32.0f);
  EXPECT_DEATH(std::vector<float> child_out(1);
               SKV_LAUNCH(warp_smem_missing_syncwarp, 1, 32, 32 * sizeof(float), nullptr, child_out.data()),
               "ThreadSanitizer: data race", "in warp_smem_missing_syncwarp");
}
