// mma.m16n8k16 and ldmatrix fragment layouts: fragments built by hand from the PTX tables, and the usual
// ldmatrix -> mma path (A row-major, B from K-major rows, B from N-major rows with .trans), all against a
// CPU product of the same bf16-rounded inputs. A planted wrong fragment index must give a wrong result.
#include <cmath>
#include <cstdint>
#include <vector>

#include "selftest.h"

namespace {

using bf16 = __nv_bfloat16;

// Fragments straight from global memory. A: 16x16 row-major, B: [k=16][n=8], C/D: 16x8 row-major.
// bug = 1 swaps a[1] and a[2] (rows g+8 and columns 2t+8 confused), a classic fragment mix-up.
__global__ void mma_direct(const bf16* A, const bf16* B, const float* C, float* D, int bug) {
  const int lane = static_cast<int>(threadIdx.x), g = lane / 4, t = lane % 4;
  uint32_t a[4], b[2];
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i & 1) * 8, col = 2 * t + (i >> 1) * 8;
    a[i] = skv::pack_bf16x2(A[row * 16 + col], A[row * 16 + col + 1]);
  }
  if (bug) {
    const uint32_t tmp = a[1];
    a[1] = a[2];
    a[2] = tmp;
  }
  for (int i = 0; i < 2; ++i) b[i] = skv::pack_bf16x2(B[(2 * t + 8 * i) * 8 + g], B[(2 * t + 8 * i + 1) * 8 + g]);
  for (int i = 0; i < 4; ++i) c[i] = C[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)];
  skv::mma_m16n8k16_bf16(d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)] = d[i];
}

// S = Q K^T and O = Q V through shared memory and ldmatrix, the way attention tiles do it.
// Q: [16][16], K: [8 keys][16 dims], V: [16 keys][8 dims]; S, O: [16][8].
__global__ void mma_via_ldmatrix(const bf16* Q, const bf16* K, const bf16* V, float* S, float* O) {
  SKV_DYNAMIC_SMEM(smem);
  bf16* q = reinterpret_cast<bf16*>(smem);  // 256 elements
  bf16* k = q + 256;                        // 128
  bf16* v = k + 128;                        // 128
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) q[i] = Q[i];
  for (int i = lane; i < 128; i += 32) {
    k[i] = K[i];
    v[i] = V[i];
  }
  __syncthreads();
  uint32_t a[4], bk[2], bv[2];
  skv::ldmatrix_x4(a, q + (lane % 16) * 16 + (lane / 16) * 8);
  skv::ldmatrix_x2(bk, k + (lane % 8) * 16 + ((lane / 8) % 2) * 8);
  skv::ldmatrix_x2_trans(bv, v + (lane % 16) * 8);
  const float zero[4] = {0, 0, 0, 0};
  float s[4], o[4];
  skv::mma_m16n8k16_bf16(s, a, bk, zero);
  skv::mma_m16n8k16_bf16(o, a, bv, zero);
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    S[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)] = s[i];
    O[(g + (i >> 1) * 8) * 8 + 2 * t + (i & 1)] = o[i];
  }
}

// Every lane's registers from ldmatrix over a 16x16 tile of element ids (row * 16 + col).
__global__ void ldmatrix_ids(uint32_t* out, int variant) {
  SKV_DYNAMIC_SMEM(smem);
  uint16_t* tile = reinterpret_cast<uint16_t*>(smem);
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) tile[i] = static_cast<uint16_t>(i);
  __syncthreads();
  const int m = lane / 8, r = lane % 8;
  const uint16_t* row = tile + ((m / 2) * 8 + r) * 16 + (m % 2) * 8;  // matrix m = 8x8 quadrant (m/2, m%2)
  uint32_t regs[4] = {0, 0, 0, 0};
  switch (variant) {
    case 0: skv::ldmatrix_x4(regs, row); break;
    case 1: skv::ldmatrix_x4_trans(regs, row); break;
    case 2: skv::ldmatrix_x2(regs, lane < 16 ? row : nullptr); break;  // lanes >= 16: address unused
    case 3: skv::ldmatrix_x2_trans(regs, lane < 16 ? row : nullptr); break;
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = regs[i];
}

__global__ void ldmatrix_from_global(const uint16_t* g, uint32_t* out) {
  SKV_DYNAMIC_SMEM(smem);
  (void)smem;
  uint32_t r[4];
  skv::ldmatrix_x4(r, g + (threadIdx.x % 8) * 8);
  out[threadIdx.x] = r[0];
}

__global__ void ldmatrix_misaligned(uint32_t* out) {
  SKV_DYNAMIC_SMEM(smem);
  uint32_t r[4];
  skv::ldmatrix_x4(r, smem + 8 + (threadIdx.x % 8) * 32);
  out[threadIdx.x] = r[0];
}

__global__ void mma_half_warp(float* out) {
  uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  float c[4] = {0, 0, 0, 0}, d[4];
  skv::mma_m16n8k16_bf16(d, a, b, c);
  out[threadIdx.x] = d[0];
}

std::vector<bf16> random_bf16(size_t n, uint32_t seed) {
  std::vector<bf16> v(n);
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    v[i] = bf16(static_cast<float>(static_cast<int>(seed >> 20) - 2048) / 512.0f);
  }
  return v;
}

// out[m][n] = c[m][n] + sum_k a(m, k) * b(k, n), in double.
template <class A, class B>
std::vector<double> gemm(int M, int N, int K, A a, B b, const float* c) {
  std::vector<double> out(static_cast<size_t>(M * N));
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double acc = c ? c[m * N + n] : 0.0;
      for (int k = 0; k < K; ++k) acc += static_cast<double>(a(m, k)) * static_cast<double>(b(k, n));
      out[static_cast<size_t>(m * N + n)] = acc;
    }
  return out;
}

int mismatches(const std::vector<float>& got, const std::vector<double>& want) {
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i)
    bad += !(std::fabs(got[i] - want[i]) <= 1e-5 * (1.0 + std::fabs(want[i])));
  return bad;
}

}  // namespace

EMU_TEST(mma_fragments_match_cpu_product) {
  const std::vector<bf16> A = random_bf16(256, 1), B = random_bf16(128, 2);
  std::vector<float> C(128), D(128, -1.0f);
  for (int i = 0; i < 128; ++i) C[static_cast<size_t>(i)] = static_cast<float>(i % 7) * 0.25f;
  const auto want = gemm(
      16, 8, 16, [&](int m, int k) { return static_cast<float>(A[static_cast<size_t>(m * 16 + k)]); },
      [&](int k, int n) { return static_cast<float>(B[static_cast<size_t>(k * 8 + n)]); }, C.data());
  SKV_LAUNCH(mma_direct, 1, 32, 0, nullptr, A.data(), B.data(), C.data(), D.data(), 0);
  CHECK(mismatches(D, want) == 0);
  SKV_LAUNCH(mma_direct, 1, 32, 0, nullptr, A.data(), B.data(), C.data(), D.data(), 1);
  CHECK(mismatches(D, want) > 64);  // planted wrong fragment index: most of the tile is wrong
}

EMU_TEST(ldmatrix_then_mma_match_cpu_product) {
  const std::vector<bf16> Q = random_bf16(256, 3), K = random_bf16(128, 4), V = random_bf16(128, 5);
  std::vector<float> S(128), O(128);
  SKV_LAUNCH(mma_via_ldmatrix, 1, 32, 512 * sizeof(bf16), nullptr, Q.data(), K.data(), V.data(), S.data(), O.data());
  const auto q = [&](int m, int k) { return static_cast<float>(Q[static_cast<size_t>(m * 16 + k)]); };
  const auto kt = [&](int k, int n) { return static_cast<float>(K[static_cast<size_t>(n * 16 + k)]); };  // K^T
  const auto v = [&](int k, int n) { return static_cast<float>(V[static_cast<size_t>(k * 8 + n)]); };
  CHECK(mismatches(S, gemm(16, 8, 16, q, kt, nullptr)) == 0);
  CHECK(mismatches(O, gemm(16, 8, 16, q, v, nullptr)) == 0);
}

EMU_TEST(ldmatrix_lane_layouts) {
  for (int variant = 0; variant < 4; ++variant) {
    std::vector<uint32_t> out(128, 0xdeadbeefu);
    SKV_LAUNCH(ldmatrix_ids, 1, 32, 512, nullptr, out.data(), variant);
    const bool trans = variant % 2 == 1;
    const int matrices = variant < 2 ? 4 : 2;
    for (int lane = 0; lane < 32; ++lane)
      for (int m = 0; m < matrices; ++m) {
        const int i = lane / 4, j = 2 * (lane % 4);
        const auto id = [&](int r, int c) { return static_cast<uint32_t>(((m / 2) * 8 + r) * 16 + (m % 2) * 8 + c); };
        const uint32_t want = trans ? (id(j, i) | id(j + 1, i) << 16) : (id(i, j) | id(i, j + 1) << 16);
        CHECK(out[static_cast<size_t>(lane * 4 + m)] == want);
      }
  }
}

EMU_TEST(ldmatrix_outside_shared_memory_aborts) {
  std::vector<uint16_t> g(64);
  std::vector<uint32_t> out(32);
  EXPECT_DEATH(SKV_LAUNCH(ldmatrix_from_global, 1, 32, 256, nullptr, g.data(), out.data()), "ldmatrix",
               "outside shared memory");
  EXPECT_DEATH(SKV_LAUNCH(ldmatrix_misaligned, 1, 32, 512, nullptr, out.data()), "not 16-byte aligned");
}

EMU_TEST(mma_needs_a_full_warp) {
  std::vector<float> out(16);
  EXPECT_DEATH(SKV_LAUNCH(mma_half_warp, 1, 16, 0, nullptr, out.data()), "skv::mma_m16n8k16_bf16",
               "which does not exist");
}
