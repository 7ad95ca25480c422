// mma.sync m16n8k16 and ldmatrix as warp collectives, with the fragment layouts of the PTX ISA
// ("Matrix fragments for mma.m16n8k16", "ldmatrix"). groupID g = lane / 4, thread-in-group t = lane % 4.
#include <cstdint>
#include <cstring>

#include "block_state.h"
#include "profile_internal.h"

namespace skv {

using skv_emu::Site;

static float bf16_lo(uint32_t r) { return skv_emu::bf16_bits_to_float(static_cast<uint16_t>(r & 0xffffu)); }
static float bf16_hi(uint32_t r) { return skv_emu::bf16_bits_to_float(static_cast<uint16_t>(r >> 16)); }

struct MmaRecord {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
  const float* c;
};

static void mma_combine(void* const records[32], unsigned) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const MmaRecord& r = *static_cast<MmaRecord*>(records[lane]);
    const int g = lane / 4, t = lane % 4;
    // a: {a0,a1} (g, 2t..) {a2,a3} (g+8, 2t..) {a4,a5} (g, 2t+8..) {a6,a7} (g+8, 2t+8..)
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i & 1) * 8, col = 2 * t + (i >> 1) * 8;
      A[row][col] = bf16_lo(r.a[i]);
      A[row][col + 1] = bf16_hi(r.a[i]);
    }
    // b: {b0,b1} (k = 2t.., n = g) {b2,b3} (k = 2t+8.., n = g)
    for (int i = 0; i < 2; ++i) {
      B[2 * t + i * 8][g] = bf16_lo(r.b[i]);
      B[2 * t + i * 8 + 1][g] = bf16_hi(r.b[i]);
    }
    // c: {c0,c1} (g, 2t..) {c2,c3} (g+8, 2t..)
    for (int i = 0; i < 4; ++i) C[g + (i >> 1) * 8][2 * t + (i & 1)] = r.c[i];
  }
  // bf16 products are exact in f32; the sum is formed in double and rounded once (the tensor core's
  // f32 accumulation differs from this by rounding only, which the tests' tolerances cover).
  if (skv_emu::profile::detail::counting()) skv_emu::profile::detail::mma();
  float D[16][8];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double acc = C[m][n];
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[m][k]) * B[k][n];
      D[m][n] = static_cast<float>(acc);
    }
  for (int lane = 0; lane < 32; ++lane) {
    const MmaRecord& r = *static_cast<MmaRecord*>(records[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) r.d[i] = D[g + (i >> 1) * 8][2 * t + (i & 1)];
  }
}

void mma_m16n8k16_bf16_at(const Site& s, float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  MmaRecord r{d, a, b, c};
  skv_emu::warp_collective(s, "skv::mma_m16n8k16_bf16", 0xffffffffu, &r, &mma_combine);
}

struct LdmatrixRecord {
  uint32_t* r;
  const void* row;
};

// Lane l supplies row l % 8 of matrix l / 8 (only lanes < 8 * Matrices count); register m of lane l gets
// matrix m's row l / 4, elements 2(l % 4) and 2(l % 4) + 1 (of the transpose with .trans).
template <int Matrices, bool Trans>
static void ldmatrix_combine(void* const records[32], unsigned) {
  skv_emu::SimThread& self = skv_emu::current("ldmatrix");
  const unsigned char* lo = self.lane.smem;
  const size_t bytes = self.lane.smem_bytes;
  uint16_t M[Matrices][8][8];
  const unsigned char* rows[8 * Matrices];
  for (int lane = 0; lane < 8 * Matrices; ++lane) {
    const auto* row = static_cast<const unsigned char*>(static_cast<LdmatrixRecord*>(records[lane])->row);
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0 || row < lo || row + 16 > lo + bytes) {
      const skv_emu::SimThread& culprit = self.block->threads[(self.linear & ~31u) + static_cast<unsigned>(lane)];
      skv_emu::fatal(&culprit, "%s at %s:%d: row address %p is %s (shared memory is [%p, %p))", culprit.op,
                     culprit.site.file, culprit.site.line, static_cast<const void*>(row),
                     reinterpret_cast<uintptr_t>(row) % 16 ? "not 16-byte aligned" : "outside shared memory",
                     static_cast<const void*>(lo), static_cast<const void*>(lo + bytes));
    }
    std::memcpy(M[lane / 8][lane % 8], row, 16);
    rows[lane] = row;
  }
  if (skv_emu::profile::detail::counting()) skv_emu::profile::detail::ldmatrix(rows, Matrices);
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* out = static_cast<LdmatrixRecord*>(records[lane])->r;
    const int i = lane / 4, j = 2 * (lane % 4);
    for (int m = 0; m < Matrices; ++m) {
      const uint16_t e0 = Trans ? M[m][j][i] : M[m][i][j];
      const uint16_t e1 = Trans ? M[m][j + 1][i] : M[m][i][j + 1];
      out[m] = static_cast<uint32_t>(e0) | static_cast<uint32_t>(e1) << 16;
    }
  }
}

void ldmatrix_at(const Site& s, int matrices, bool trans, uint32_t* r, const void* smem_row) {
  LdmatrixRecord rec{r, smem_row};
  if (matrices == 4)
    skv_emu::warp_collective(s, trans ? "skv::ldmatrix_x4_trans" : "skv::ldmatrix_x4", 0xffffffffu, &rec,
                             trans ? &ldmatrix_combine<4, true> : &ldmatrix_combine<4, false>);
  else
    skv_emu::warp_collective(s, trans ? "skv::ldmatrix_x2_trans" : "skv::ldmatrix_x2", 0xffffffffu, &rec,
                             trans ? &ldmatrix_combine<2, true> : &ldmatrix_combine<2, false>);
}

// ---- cp.async ---------------------------------------------------------------------------------------------
void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  skv_emu::SimThread& t = skv_emu::current("skv::cp_async_16");
  auto* dst = static_cast<unsigned char*>(smem_dst);
  const unsigned char* lo = t.lane.smem;
  if (src_bytes < 0 || src_bytes > 16)
    skv_emu::fatal(&t, "skv::cp_async_16: src_bytes %d is not in [0, 16]", src_bytes);
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || dst < lo || dst + 16 > lo + t.lane.smem_bytes)
    skv_emu::fatal(&t, "skv::cp_async_16: destination %p is not a 16-byte aligned slot of shared memory [%p, %p)",
                   smem_dst, static_cast<const void*>(lo), static_cast<const void*>(lo + t.lane.smem_bytes));
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0)
    skv_emu::fatal(&t, "skv::cp_async_16: source %p is not 16-byte aligned", gmem_src);
  if (skv_emu::profile::detail::counting())
    skv_emu::profile::detail::cp_async(__builtin_return_address(0), smem_dst, gmem_src, src_bytes);
  skv_emu::CpAsyncCopy c{dst, t.cp_committed, {}};
  std::memcpy(c.bytes, gmem_src, static_cast<size_t>(src_bytes));  // ASan checks exactly src_bytes
  std::memset(c.bytes + src_bytes, 0, static_cast<size_t>(16 - src_bytes));
  t.cp_pending.push_back(c);
}

void cp_async_commit() { ++skv_emu::current("skv::cp_async_commit").cp_committed; }

// Completes every copy of the committed groups except the `n` most recent; copies not yet committed stay
// pending, as with cp.async.wait_group.
void cp_async_wait_groups(int n) {
  skv_emu::SimThread& t = skv_emu::current("skv::cp_async_wait");
  const int complete_below = t.cp_committed - n;
  size_t kept = 0;
  for (size_t i = 0; i < t.cp_pending.size(); ++i) {
    const skv_emu::CpAsyncCopy& c = t.cp_pending[i];
    if (c.group < complete_below)
      std::memcpy(c.dst, c.bytes, 16);
    else
      t.cp_pending[kept++] = c;
  }
  t.cp_pending.resize(kept);
}

}  // namespace skv
