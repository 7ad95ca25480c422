// cp.async: copies land at cp_async_wait, per commit group; a missing wait leaves the poison in place;
// src_bytes < 16 zero-fills; bad operands abort.
#include <cstdint>
#include <vector>

#include "selftest.h"

namespace {

// Each thread copies 16 bytes in; mode 0: commit + wait<0>; 1: commit, no wait; 2: two groups, wait<1>.
__global__ void stage(const uint8_t* in, uint8_t* out, int mode, int src_bytes) {
  SKV_DYNAMIC_SMEM(smem);
  const unsigned t = threadIdx.x;
  skv::cp_async_16(smem + t * 16, in + t * 16, src_bytes);
  skv::cp_async_commit();
  if (mode == 2) {
    skv::cp_async_16(smem + (blockDim.x + t) * 16, in + (blockDim.x + t) * 16, src_bytes);
    skv::cp_async_commit();
    skv::cp_async_wait<1>();
  } else if (mode == 0) {
    skv::cp_async_wait<0>();
  }
  __syncthreads();
  const unsigned n = mode == 2 ? 2 * blockDim.x : blockDim.x;
  for (unsigned i = t; i < n * 16; i += blockDim.x) out[i] = smem[i];
}

__global__ void misaligned_copy(const uint8_t* in) {
  SKV_DYNAMIC_SMEM(smem);
  skv::cp_async_16(smem + 8, in);
}

__global__ void too_many_bytes(const uint8_t* in) {
  SKV_DYNAMIC_SMEM(smem);
  skv::cp_async_16(smem, in, 17);
}

std::vector<uint8_t> pattern(size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(i * 7 + 1);
  return v;
}

}  // namespace

EMU_TEST(cp_async_lands_at_wait) {
  const int threads = 64;
  alignas(16) static uint8_t in[2 * 64 * 16];
  const std::vector<uint8_t> p = pattern(sizeof in);
  std::copy(p.begin(), p.end(), in);
  std::vector<uint8_t> out(2 * threads * 16);
  SKV_LAUNCH(stage, 1, threads, 2 * threads * 16, nullptr, in, out.data(), 0, 16);
  for (int i = 0; i < threads * 16; ++i) CHECK(out[static_cast<size_t>(i)] == in[i]);
}

EMU_TEST(cp_async_without_wait_reads_poison) {
  alignas(16) static uint8_t in[64 * 16];
  const std::vector<uint8_t> p = pattern(sizeof in);
  std::copy(p.begin(), p.end(), in);
  std::vector<uint8_t> out(64 * 16);
  SKV_LAUNCH(stage, 1, 64, 64 * 16, nullptr, in, out.data(), 1, 16);
  for (size_t i = 0; i < out.size(); ++i) CHECK(out[i] == 0xff);
}

EMU_TEST(cp_async_wait_group_keeps_newest_groups_pending) {
  alignas(16) static uint8_t in[2 * 32 * 16];
  const std::vector<uint8_t> p = pattern(sizeof in);
  std::copy(p.begin(), p.end(), in);
  std::vector<uint8_t> out(2 * 32 * 16);
  SKV_LAUNCH(stage, 1, 32, 2 * 32 * 16, nullptr, in, out.data(), 2, 16);
  for (size_t i = 0; i < 32 * 16; ++i) CHECK(out[i] == in[i]);            // group 0: waited for
  for (size_t i = 32 * 16; i < out.size(); ++i) CHECK(out[i] == 0xff);    // group 1: still in flight
}

EMU_TEST(cp_async_zero_fills_past_src_bytes) {
  alignas(16) static uint8_t in[32 * 16];
  const std::vector<uint8_t> p = pattern(sizeof in);
  std::copy(p.begin(), p.end(), in);
  std::vector<uint8_t> out(32 * 16);
  SKV_LAUNCH(stage, 1, 32, 32 * 16, nullptr, in, out.data(), 0, 5);
  for (size_t i = 0; i < out.size(); ++i) CHECK(out[i] == (i % 16 < 5 ? in[i] : 0));
  SKV_LAUNCH(stage, 1, 32, 32 * 16, nullptr, in, out.data(), 0, 0);
  for (size_t i = 0; i < out.size(); ++i) CHECK(out[i] == 0);
}

EMU_TEST(cp_async_bad_operands_abort) {
  alignas(16) static uint8_t in[64];
  EXPECT_DEATH(SKV_LAUNCH(misaligned_copy, 1, 1, 64, nullptr, in), "skv::cp_async_16", "16-byte aligned");
  EXPECT_DEATH(SKV_LAUNCH(too_many_bytes, 1, 1, 64, nullptr, in), "src_bytes 17");
}
