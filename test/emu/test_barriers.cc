// __syncthreads: a correct reduction passes; a missing barrier, a barrier in a divergent branch and an
// early return before a barrier are all caught.
#include <cmath>
#include <vector>

#include "selftest.h"

namespace {

constexpr int kThreads = 256;

// Tree reduction of one block's slice into out[blockIdx.x].
__global__ void reduce_sum(const float* in, float* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const unsigned tid = threadIdx.x;
  smem[tid] = in[blockIdx.x * blockDim.x + tid];
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) smem[tid] += smem[tid + s];
    __syncthreads();
  }
  if (tid == 0) out[blockIdx.x] = smem[0];
}

// Planted bug: no barrier between the store and the first reads of other threads' slots.
__global__ void reduce_sum_missing_barrier(const float* in, float* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const unsigned tid = threadIdx.x;
  smem[tid] = in[blockIdx.x * blockDim.x + tid];
  for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
    if (tid < s) smem[tid] += smem[tid + s];
    __syncthreads();
  }
  if (tid == 0) out[blockIdx.x] = smem[0];
}

// Planted bug: each thread reads its left neighbour's slot without a barrier (the opposite direction, so
// neither a forward nor a reverse schedule alone would catch both kernels).
__global__ void shift_missing_barrier(const float* in, float* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const unsigned tid = threadIdx.x;
  smem[tid] = in[tid];
  out[tid] = tid > 0 ? smem[tid - 1] : 0.0f;
}

// Planted bug: the barrier sits in a branch only some threads take.
__global__ void barrier_in_branch(float* out) {
  if (threadIdx.x < 64) {
    out[threadIdx.x] = 1.0f;
    __syncthreads();
  }
}

// Planted bug: the two branches each have "their" barrier; CUDA requires all threads at the same one.
__global__ void barriers_in_both_branches(float* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Planted bug: out-of-range threads return before the block's barrier.
__global__ void early_return_before_barrier(const float* in, float* out, int n) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* smem = reinterpret_cast<float*>(smem_raw);
  const int tid = static_cast<int>(threadIdx.x);
  if (tid >= n) return;
  smem[tid] = in[tid];
  __syncthreads();
  out[tid] = smem[(tid + 1) % n];
}

std::vector<float> ramp(int n) {
  std::vector<float> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<float>(i % 17) - 3.0f;
  return v;
}

}  // namespace

EMU_TEST(reduction_with_barriers_is_exact) {
  const int blocks = 5;
  std::vector<float> in = ramp(blocks * kThreads), out(blocks, -1.0f);
  SKV_LAUNCH(reduce_sum, blocks, kThreads, kThreads * sizeof(float), nullptr, in.data(), out.data());
  for (int b = 0; b < blocks; ++b) {
    float want = 0;
    for (int i = 0; i < kThreads; ++i) want += in[static_cast<size_t>(b * kThreads + i)];
    CHECK(out[static_cast<size_t>(b)] == want);
  }
}

// Without a race detector the planted bug shows as a wrong result (the reader ran first and saw the 0xFF
// poison, a NaN); under ThreadSanitizer the race itself is reported, whatever the order.
EMU_TEST(missing_barrier_gives_wrong_result) {
  const int blocks = 3;
  std::vector<float> in = ramp(blocks * kThreads), good(blocks), bad(blocks);
  SKV_LAUNCH(reduce_sum, blocks, kThreads, kThreads * sizeof(float), nullptr, in.data(), good.data());
  if (selftest::tsan_active()) {
    EXPECT_DEATH(std::vector<float> child_in = ramp(blocks * kThreads); std::vector<float> child_out(blocks);
                 SKV_LAUNCH(reduce_sum_missing_barrier, blocks, kThreads, kThreads * sizeof(float), nullptr,
                            child_in.data(), child_out.data()),
                 "ThreadSanitizer: data race", "reduce_sum_missing_barrier");
    return;
  }
  if (!selftest::random_schedule()) return;
  SKV_LAUNCH(reduce_sum_missing_barrier, blocks, kThreads, kThreads * sizeof(float), nullptr, in.data(),
             bad.data());
  for (int b = 0; b < blocks; ++b) CHECK(!(bad[static_cast<size_t>(b)] == good[static_cast<size_t>(b)]));
}

EMU_TEST(missing_barrier_other_direction_gives_wrong_result) {
  if (selftest::tsan_active()) {
    EXPECT_DEATH(std::vector<float> child_in = ramp(kThreads); std::vector<float> child_out(kThreads);
                 SKV_LAUNCH(shift_missing_barrier, 1, kThreads, kThreads * sizeof(float), nullptr, child_in.data(),
                            child_out.data()),
                 "ThreadSanitizer: data race", "shift_missing_barrier");
    return;
  }
  if (!selftest::random_schedule()) return;
  std::vector<float> in = ramp(kThreads), out(kThreads);
  SKV_LAUNCH(shift_missing_barrier, 1, kThreads, kThreads * sizeof(float), nullptr, in.data(), out.data());
  int wrong = 0;
  for (int i = 1; i < kThreads; ++i) wrong += !(out[static_cast<size_t>(i)] == in[static_cast<size_t>(i - 1)]);
  CHECK(wrong > 0);
}

EMU_TEST(barrier_in_divergent_branch_aborts) {
  std::vector<float> out(kThreads);
  EXPECT_DEATH(SKV_LAUNCH(barrier_in_branch, 1, 128, 0, nullptr, out.data()),
               "kernel 'barrier_in_branch' block (0,0,0)",
               "barrier divergence");
}

EMU_TEST(barriers_at_different_sites_abort) {
  std::vector<float> out(kThreads);
  EXPECT_DEATH(SKV_LAUNCH(barriers_in_both_branches, 1, 64, 0, nullptr, out.data()), "barrier divergence",
               "test_barriers.cc");
}

EMU_TEST(early_return_before_barrier_aborts) {
  std::vector<float> in = ramp(100), out(100);
  EXPECT_DEATH(SKV_LAUNCH(early_return_before_barrier, 1, 128, 128 * sizeof(float), nullptr, in.data(), out.data(),
                          100),
               "kernel 'early_return_before_barrier'", "barrier divergence");
}
