// The one include of every kernels/cuda source. Under nvcc it is plain CUDA; under the SIMT emulator
// (SCALEKV_EMU, g++) kernels/emu/emu_runtime.h supplies the same names on the CPU. Kernels therefore:
//   - launch only through SKV_LAUNCH (g++ cannot parse <<< >>>),
//   - use only dynamic shared memory, declared with SKV_DYNAMIC_SMEM (the emulator gives each block its
//     own poisoned buffer),
//   - reach tensor-core and async-copy instructions only through the skv:: wrappers below.
#pragma once

#include <cstdint>

#if defined(SCALEKV_EMU)
#include "../emu/emu_runtime.h"
// One addon links both the nvcc and the emulator builds of these sources: everything they define lives in
// scalekv::cuda_ops, which the emulator build renames so that no symbol (launcher, kernel, inline host
// helper) is defined twice or silently bound to the other build's copy.
#define cuda_ops cuda_ops_emu
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define SKV_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
#define SKV_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

namespace skv {

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: d = a * b + c for one warp.
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), groupID = lane / 4, tid = lane % 4:
//   a (16x16, row-major), 4 regs of 2 bf16: a[0]: (g, 2t..2t+1)  a[1]: (g+8, 2t..)  a[2]: (g, 2t+8..)
//                                           a[3]: (g+8, 2t+8..)
//   b (16x8, "col"), 2 regs of 2 bf16:      b[0]: (k = 2t..2t+1, n = g)  b[1]: (k = 2t+8.., n = g)
//   c/d (16x8 f32), 4 floats:               d[0..1]: (g, 2t..2t+1)  d[2..3]: (g+8, 2t..2t+1)
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  (void)a; (void)b;
  d[0] = c[0]; d[1] = c[1]; d[2] = c[2]; d[3] = c[3];
  __trap();
#endif
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l supplies the address of row (l % 8) of matrix
// (l / 8); register i of every lane receives matrix i in the mma operand layout (lane l holds row l / 4,
// elements 2(l % 4), 2(l % 4) + 1; with .trans the matrix is transposed first).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr));
}

// cp.async.cg.shared.global 16 bytes; src_bytes < 16 zero-fills the rest (0 = a pure zero fill).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes = 16) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Host side: the emulator's cost counters take the SIMT FLOPs of the next launch from this; nothing on a GPU.
inline void declare_simt_flops(double) {}
// Host side: the next launch writes what later kernels take as addresses, so the emulator's cost counters run all
// of its blocks even when they sample the others; nothing on a GPU.
inline void declare_every_block() {}

}  // namespace skv
#endif

namespace skv {
// Packs two floats into one register of two bf16 (low half = first), the mma operand element order.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
}  // namespace skv
