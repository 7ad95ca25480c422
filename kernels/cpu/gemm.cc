// y = epilogue(x · wᵀ + bias) on the CPU, blocked like a BLAS sgemm: each task owns an [MC x NC] tile of y,
// walks K in KC slices, packs the slice of x as f32 rows and the slice of w transposed into NR-wide panels
// ([KC][NR], so the inner loop is a contiguous vector FMA over NR outputs), and runs an MR x NR register
// micro-kernel over the tile. Tiles are spread over the pool, so small-M calls (one token) parallelise over N.
// Cost: 2*M*N*K FLOP; packing converts each x slice once per N tile and each w slice once per M tile.
#include <algorithm>
#include <cstring>
#include <vector>

#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {
namespace {

constexpr int MR = 4, NR = 16;          // micro-tile: 4 x 16 f32 accumulators
constexpr int MC = 64, NC = 128, KC = 256;  // cache blocks: packed x 64 KiB, packed w 128 KiB

// Loads x[row, k0 : k0 + kc] as f32 (rounded through bf16 with `round_bf16`: f32 x against bf16 w).
inline void load_slice(const void* base, DType dtype, int64_t row, int64_t ld, int k0, int kc, float* dst, bool round_bf16 = false) {
  if (dtype == DType::f32) {
    std::memcpy(dst, static_cast<const float*>(base) + row * ld + k0, sizeof(float) * kc);
    if (round_bf16)
      for (int i = 0; i < kc; ++i) dst[i] = bf16_to_f32(f32_to_bf16(dst[i]));
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(base) + row * ld + k0;
    for (int i = 0; i < kc; ++i) dst[i] = bf16_to_f32(src[i]);
  }
}

// acc[MR][NR] += A[MR rows of lda][kc] * B[kc][NR].
inline void micro_kernel(const float* A, int lda, const float* B, int kc, float acc[MR][NR]) {
  for (int p = 0; p < kc; ++p) {
    const float* b = B + p * NR;
    for (int i = 0; i < MR; ++i) {
      const float a = A[i * lda + p];
      for (int j = 0; j < NR; ++j) acc[i][j] += a * b[j];
    }
  }
}

void gemm_tile(const GemmArgs& a, int m0, int n0, std::vector<float>& xa, std::vector<float>& wb,
               std::vector<float>& acc) {
  const int mc = std::min(MC, a.m - m0), nc = std::min(NC, a.n - n0);
  const int panels = (nc + NR - 1) / NR;
  std::fill(acc.begin(), acc.end(), 0.0f);
  for (int k0 = 0; k0 < a.k; k0 += KC) {
    const int kc = std::min(KC, a.k - k0);
    // x rows padded to a multiple of MR with zeros so the micro-kernel never branches.
    for (int i = 0; i < (mc + MR - 1) / MR * MR; ++i) {
      float* dst = xa.data() + int64_t(i) * KC;
      if (i < mc) load_slice(a.x, a.x_dtype, m0 + i, a.k, k0, kc, dst, a.w_dtype == DType::bf16);
      else std::fill(dst, dst + kc, 0.0f);
    }
    // w panel q holds columns n0 + q*NR .. +NR as [kc][NR]; columns past N are zero.
    float row[KC];
    std::fill(wb.begin(), wb.begin() + int64_t(panels) * KC * NR, 0.0f);
    for (int j = 0; j < nc; ++j) {
      load_slice(a.w, a.w_dtype, n0 + j, a.k, k0, kc, row);
      float* panel = wb.data() + int64_t(j / NR) * KC * NR + j % NR;
      for (int p = 0; p < kc; ++p) panel[p * NR] = row[p];
    }
    for (int i0 = 0; i0 < mc; i0 += MR) {
      for (int q = 0; q < panels; ++q) {
        float reg[MR][NR];
        for (int i = 0; i < MR; ++i)
          std::memcpy(reg[i], acc.data() + int64_t(i0 + i) * NC + q * NR, sizeof(float) * NR);
        micro_kernel(xa.data() + int64_t(i0) * KC, KC, wb.data() + int64_t(q) * KC * NR, kc, reg);
        for (int i = 0; i < MR; ++i)
          std::memcpy(acc.data() + int64_t(i0 + i) * NC + q * NR, reg[i], sizeof(float) * NR);
      }
    }
  }
  float bias[NC];
  for (int j = 0; j < nc; ++j) {
    if (!a.bias) bias[j] = 0.0f;
    else if (a.bias_dtype == DType::f32) bias[j] = static_cast<const float*>(a.bias)[n0 + j];
    else bias[j] = bf16_to_f32(static_cast<const uint16_t*>(a.bias)[n0 + j]);
  }
  float out[NC];
  for (int i = 0; i < mc; ++i) {
    const float* r = acc.data() + int64_t(i) * NC;
    for (int j = 0; j < nc; ++j) out[j] = apply_epilogue(a.epilogue, r[j] + bias[j]);
    if (a.y_dtype == DType::f32) {
      std::memcpy(static_cast<float*>(a.y) + int64_t(m0 + i) * a.n + n0, out, sizeof(float) * nc);
    } else {
      uint16_t* dst = static_cast<uint16_t*>(a.y) + int64_t(m0 + i) * a.n + n0;
      for (int j = 0; j < nc; ++j) dst[j] = f32_to_bf16(out[j]);
    }
  }
}

}  // namespace

void gemm(ThreadPool& pool, const GemmArgs& a) {
  if (a.m <= 0 || a.n <= 0) return;
  const int m_tiles = (a.m + MC - 1) / MC, n_tiles = (a.n + NC - 1) / NC;
  pool.parallel_for(int64_t(m_tiles) * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xa(int64_t(MC + MR) * KC), wb(int64_t(NC) * KC), acc(int64_t(MC + MR) * NC);
    for (int64_t t = begin; t < end; ++t)
      gemm_tile(a, int(t / n_tiles) * MC, int(t % n_tiles) * NC, xa, wb, acc);
  });
}

}  // namespace scalekv::cpu
