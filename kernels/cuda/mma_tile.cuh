// The warp step of conv2d_mma_kernel's implicit GEMM (gemm_mma_kernel has its own 64 x 64 warp tiles): 8 warps as
// 2 (M) x 4 (N) over a 128 x 128 block tile, each warp owning 64 x 32 = 4 x 4 mma.m16n8k16 accumulators, A read from a
// [128 rows][32 k] bf16 smem tile whose 64-byte rows are XOR-swizzled in 16-byte chunks.
#pragma once

#include <cstdint>

#include "portable.cuh"

namespace scalekv::cuda_ops::mma_tile {

constexpr int kK = 32;  // K elements of a tile row

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][32] tile: chunk ^ ((row >> 1) & 3), so the 8
// rows of an ldmatrix phase cover 8 distinct bank groups.
__device__ __forceinline__ int swz(int row, int chunk) { return row * kK + ((chunk ^ ((row >> 1) & 3)) << 3); }

// A fragments of k16 step kk for the warp's rows row0 .. row0 + 63: a0 = rows 0-7 / k 0-7, a1 = rows 8-15 / k 0-7,
// a2 = rows 0-7 / k 8-15, a3 = rows 8-15 / k 8-15 of each 16-row block.
template <typename T>
__device__ __forceinline__ void load_a(uint32_t af[4][4], const T* tile, int row0, int kk) {
  const int lane = threadIdx.x % 32, mi = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) skv::ldmatrix_x4(af[mt], tile + swz(row0 + mt * 16 + (mi & 1) * 8 + lr, 2 * kk + (mi >> 1)));
}

// acc[mt][nt] += A block mt x B block nt; bfr[nb2] holds b[0], b[1] of n-block 2*nb2, then of 2*nb2 + 1.
__device__ __forceinline__ void mma_4x4(float acc[4][4][4], const uint32_t af[4][4], const uint32_t bfr[2][4]) {
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nb2 = 0; nb2 < 2; ++nb2) {
      skv::mma_m16n8k16_bf16(acc[mt][2 * nb2], af[mt], bfr[nb2], acc[mt][2 * nb2]);
      skv::mma_m16n8k16_bf16(acc[mt][2 * nb2 + 1], af[mt], bfr[nb2] + 2, acc[mt][2 * nb2 + 1]);
    }
}

// The products of one [128][32] A tile with the matching B tile: for each k16 step, A fragments of the warp's rows
// row0 .. row0 + 63 and, from load_b(uint32_t bfr[4], int kk, int nb2), b[0], b[1] of the warp's n-block 2*nb2 then
// of 2*nb2 + 1 (B layouts differ between the callers).
template <typename T, typename LoadB>
__device__ __forceinline__ void tile_products(float acc[4][4][4], const T* a_tile, int row0, LoadB&& load_b) {
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t af[4][4], bfr[2][4];
    load_a(af, a_tile, row0, kk);
#pragma unroll
    for (int nb2 = 0; nb2 < 2; ++nb2) load_b(bfr[nb2], kk, nb2);
    mma_4x4(acc, af, bfr);
  }
}

}  // namespace scalekv::cuda_ops::mma_tile
