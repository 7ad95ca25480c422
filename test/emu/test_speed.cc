// Measures the scheduler's cost per fiber switch and per warp collective, and keeps it within a loose
// bound so that a regression to a syscall-based switch would fail.
#include <chrono>
#include <vector>

#include "selftest.h"

namespace {

__global__ void many_barriers(int rounds, int* out) {
  int acc = 0;
  for (int i = 0; i < rounds; ++i) {
    acc += i;
    __syncthreads();
  }
  out[threadIdx.x] = acc;
}

__global__ void many_shuffles(int rounds, float* out) {
  float v = static_cast<float>(threadIdx.x);
  for (int i = 0; i < rounds; ++i) v += __shfl_xor_sync(0xffffffffu, v, i & 31) * 1e-3f;
  out[threadIdx.x] = v;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

EMU_TEST(switch_cost) {
  const int threads = 256, rounds = 2000;
  std::vector<int> out(threads);
  auto t0 = std::chrono::steady_clock::now();
  SKV_LAUNCH(many_barriers, 1, threads, 0, nullptr, rounds, out.data());
  const double barrier_s = seconds_since(t0);
  // Each thread is resumed once per round and yields once: two context switches.
  const double ns_per_switch = barrier_s * 1e9 / (2.0 * threads * (rounds + 1));

  std::vector<float> fout(threads);
  t0 = std::chrono::steady_clock::now();
  SKV_LAUNCH(many_shuffles, 1, threads, 0, nullptr, rounds, fout.data());
  const double ns_per_lane_shuffle = seconds_since(t0) * 1e9 / (double(threads) * rounds);
  std::fprintf(stderr, "  %.1f ns per fiber switch (barrier round trip / 2), %.1f ns per lane per __shfl_xor_sync\n",
               ns_per_switch, ns_per_lane_shuffle);
  // swapcontext (a sigprocmask syscall per switch) would cost ~0.5 us per switch; ThreadSanitizer's own
  // fiber switch is that slow, so it is only reported there.
  if (!selftest::tsan_active()) CHECK(ns_per_switch < (selftest::asan_active() ? 1000 : 300));
}
