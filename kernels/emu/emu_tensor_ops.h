// skv:: tensor-core and async-copy wrappers (portable.cuh's nvcc branch) on the CPU. mma and ldmatrix are
// warp collectives: the 32 lanes' registers are gathered at a warp barrier, the operation is done once with
// the PTX fragment layouts, and each lane gets its own registers back. cp.async copies are queued per thread
// and land in shared memory only at cp_async_wait, so a missing wait reads poisoned bytes.
#pragma once

#include <cstdint>

#include "emu_device.h"

namespace skv {

// Declared under their CUDA names (for using-declarations); calls go through the macros below, which add
// the call site for the divergence check.
void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]);
void ldmatrix_x4(uint32_t r[4], const void* smem_row);
void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row);
void ldmatrix_x2(uint32_t r[2], const void* smem_row);
void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row);

void mma_m16n8k16_bf16_at(const skv_emu::Site& s, float d[4], const uint32_t a[4], const uint32_t b[2],
                          const float c[4]);
void ldmatrix_at(const skv_emu::Site& s, int matrices, bool trans, uint32_t* r, const void* smem_row);

// cp.async.cg.shared.global, 16 bytes; src_bytes < 16 zero-fills the rest (0 = a pure zero fill).
void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16);
void cp_async_commit();
void cp_async_wait_groups(int n);
template <int N>
void cp_async_wait() {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
  cp_async_wait_groups(N);
}

}  // namespace skv

#define mma_m16n8k16_bf16(...) mma_m16n8k16_bf16_at(SKV_EMU_HERE, __VA_ARGS__)
#define ldmatrix_x4(r, p) ldmatrix_at(SKV_EMU_HERE, 4, false, r, p)
#define ldmatrix_x4_trans(r, p) ldmatrix_at(SKV_EMU_HERE, 4, true, r, p)
#define ldmatrix_x2(r, p) ldmatrix_at(SKV_EMU_HERE, 2, false, r, p)
#define ldmatrix_x2_trans(r, p) ldmatrix_at(SKV_EMU_HERE, 2, true, r, p)
