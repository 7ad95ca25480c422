// Warp collectives: shuffle semantics (PTX shfl.sync, with widths), votes, and the divergence checks
// (a mask that leaves out the caller, names an exited or missing lane, or lanes at different collectives).
#include <cmath>
#include <vector>

#include "selftest.h"

namespace {

// out[tid * 4 + k]: idx / up / down / xor results for one (delta, width) pair.
__global__ void shuffles(int* out, int delta, int width) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int v = 100 + lane;
  out[threadIdx.x * 4 + 0] = __shfl_sync(0xffffffffu, v, delta, width);
  out[threadIdx.x * 4 + 1] = __shfl_up_sync(0xffffffffu, v, static_cast<unsigned>(delta), width);
  out[threadIdx.x * 4 + 2] = __shfl_down_sync(0xffffffffu, v, static_cast<unsigned>(delta), width);
  out[threadIdx.x * 4 + 3] = __shfl_xor_sync(0xffffffffu, v, delta, width);
}

__global__ void warp_sum(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[threadIdx.x] = v;
}

__global__ void votes(const int* pred, unsigned* out) {
  const int p = pred[threadIdx.x];
  out[threadIdx.x * 3 + 0] = __ballot_sync(0xffffffffu, p);
  out[threadIdx.x * 3 + 1] = static_cast<unsigned>(__any_sync(0xffffffffu, p));
  out[threadIdx.x * 3 + 2] = static_cast<unsigned>(__all_sync(0xffffffffu, p));
}

// Lanes 0..15 shuffle among themselves with a half mask: legal.
__global__ void half_warp_shuffle(float* out) {
  if (threadIdx.x < 16) {
    const float v = static_cast<float>(threadIdx.x);
    out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, v, 1);
  }
}

// Reads lane 20 with a mask naming only lanes 0..15: undefined on the GPU, poison here.
__global__ void read_outside_mask(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 20);
}

// Planted bug: a full mask while only half the warp takes the branch.
__global__ void full_mask_in_branch(float* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

// Planted bug: the mask leaves out the calling lanes 16..31.
__global__ void mask_without_caller(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

// Planted bug: the two halves reach different shuffles, each with a full mask.
__global__ void shuffles_at_different_sites(float* out) {
  float v = 1.0f;
  if (threadIdx.x < 16)
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  else
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  out[threadIdx.x] = v;
}

// Planted bug: a 48-thread block's second warp has 16 lanes, but the mask names all 32.
__global__ void full_mask_partial_warp(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Planted bug: width 12 is not a power of two.
__global__ void bad_width(float* out) { out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0, 12); }

// Planted bug: one lane at __syncthreads while the rest of its warp wants it in a shuffle.
__global__ void barrier_vs_shuffle(float* out) {
  if (threadIdx.x == 3) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.0f, 0);
    __syncthreads();
  }
}

int expected_shuffle(int mode, int lane, int delta, int width) {
  const int base = lane & ~(width - 1);
  int src = lane;
  switch (mode) {
    case 0: src = base + (delta & (width - 1)); break;
    case 1: src = lane - delta >= base ? lane - delta : lane; break;
    case 2: src = lane + delta < base + width ? lane + delta : lane; break;
    case 3: src = (lane ^ delta) < base + width ? (lane ^ delta) : lane; break;
  }
  return 100 + src;
}

}  // namespace

EMU_TEST(shuffle_modes_match_ptx_semantics) {
  const int widths[] = {32, 16, 8, 4, 2, 1};
  for (int width : widths)
    for (int delta = 0; delta < 32; delta += 3) {
      std::vector<int> out(64 * 4, -1);
      SKV_LAUNCH(shuffles, 1, 64, 0, nullptr, out.data(), delta, width);
      for (int t = 0; t < 64; ++t)
        for (int mode = 0; mode < 4; ++mode)
          CHECK(out[static_cast<size_t>(t * 4 + mode)] == expected_shuffle(mode, t % 32, delta, width));
    }
}

EMU_TEST(warp_butterfly_sum) {
  std::vector<float> in(96), out(96);
  for (int i = 0; i < 96; ++i) in[static_cast<size_t>(i)] = static_cast<float>(i);
  SKV_LAUNCH(warp_sum, 1, 96, 0, nullptr, in.data(), out.data());
  for (int w = 0; w < 3; ++w) {
    float want = 0;
    for (int l = 0; l < 32; ++l) want += in[static_cast<size_t>(w * 32 + l)];
    for (int l = 0; l < 32; ++l) CHECK(out[static_cast<size_t>(w * 32 + l)] == want);
  }
}

EMU_TEST(ballot_any_all) {
  std::vector<int> pred(64, 0);
  for (int i = 0; i < 32; i += 5) pred[static_cast<size_t>(i)] = 1;
  for (int i = 32; i < 64; ++i) pred[static_cast<size_t>(i)] = 7;
  std::vector<unsigned> out(64 * 3);
  SKV_LAUNCH(votes, 1, 64, 0, nullptr, pred.data(), out.data());
  unsigned want0 = 0;
  for (int i = 0; i < 32; i += 5) want0 |= 1u << i;
  for (int t = 0; t < 32; ++t) {
    CHECK(out[static_cast<size_t>(t * 3)] == want0);
    CHECK(out[static_cast<size_t>(t * 3 + 1)] == 1u);
    CHECK(out[static_cast<size_t>(t * 3 + 2)] == 0u);
  }
  for (int t = 32; t < 64; ++t) {
    CHECK(out[static_cast<size_t>(t * 3)] == 0xffffffffu);
    CHECK(out[static_cast<size_t>(t * 3 + 2)] == 1u);
  }
}

EMU_TEST(half_warp_mask_is_legal_and_source_outside_mask_is_poison) {
  std::vector<float> out(32, -1.0f);
  SKV_LAUNCH(half_warp_shuffle, 1, 32, 0, nullptr, out.data());
  for (int t = 0; t < 15; ++t) CHECK(out[static_cast<size_t>(t)] == static_cast<float>(t + 1));
  CHECK(std::isnan(out[15]));  // lane 16 is in the segment but outside the mask: undefined, so poison
  SKV_LAUNCH(read_outside_mask, 1, 32, 0, nullptr, out.data());
  for (int t = 0; t < 16; ++t) CHECK(std::isnan(out[static_cast<size_t>(t)]));
}

EMU_TEST(full_mask_with_inactive_lanes_aborts) {
  std::vector<float> out(32);
  EXPECT_DEATH(SKV_LAUNCH(full_mask_in_branch, 1, 32, 0, nullptr, out.data()), "kernel 'full_mask_in_branch'",
               "__shfl_down_sync", "mask 0xffffffff");
}

EMU_TEST(mask_without_caller_aborts) {
  std::vector<float> out(32);
  EXPECT_DEATH(SKV_LAUNCH(mask_without_caller, 1, 32, 0, nullptr, out.data()),
               "does not include the calling lane");
}

EMU_TEST(shuffles_at_different_sites_abort) {
  std::vector<float> out(32);
  EXPECT_DEATH(SKV_LAUNCH(shuffles_at_different_sites, 1, 32, 0, nullptr, out.data()), "warp divergence");
}

EMU_TEST(mask_naming_missing_lane_aborts) {
  std::vector<float> out(48);
  EXPECT_DEATH(SKV_LAUNCH(full_mask_partial_warp, 1, 48, 0, nullptr, out.data()), "which does not exist");
}

EMU_TEST(bad_shuffle_width_aborts) {
  std::vector<float> out(32);
  EXPECT_DEATH(SKV_LAUNCH(bad_width, 1, 32, 0, nullptr, out.data()), "width 12 is not a power of two");
}

EMU_TEST(barrier_while_warp_waits_in_shuffle_aborts) {
  std::vector<float> out(64);
  EXPECT_DEATH(SKV_LAUNCH(barrier_vs_shuffle, 1, 64, 0, nullptr, out.data()), "kernel 'barrier_vs_shuffle'",
               "divergence");
}
