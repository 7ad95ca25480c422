// gemm: y[m, n] = epilogue(sum_k x[m, k] * w[n, k] + bias[n]), x [M, K], w [N, K] (Linear layout), f32 accumulation.
// Cost: 2*M*N*K FLOP; bytes ~ (M*K*ceil(N/BN) + N*K*ceil(M/BM)) * dsize + M*N*ysize.
//
// Kernels:
//   gemm_mma_kernel    bf16 x and w, K a multiple of 8, 16-byte aligned operands. Block tile 128 x 128, K step
//                      32, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 4 mma.m16n8k16 accumulators. x and w
//                      tiles ([rows][32] bf16, both K-contiguous: w rows are the "col" B operand as is) arrive by
//                      cp.async 16 B, double buffered (tile t+1 in flight while t is multiplied); rows past M/N and
//                      chunks past K are zero-filled. Fragments come from ldmatrix.x4 on rows XOR-swizzled in
//                      16-byte chunks (chunk ^ ((row >> 1) & 3)): a row is 64 B, so the 8 rows of an ldmatrix
//                      phase cover 8 distinct 16-byte bank groups. Smem 2 * (128 + 128) * 32 * 2 B = 32 KiB.
//   gemm_simt_kernel   every other case (f32, f32 x with bf16 w rounded to bf16 on load, odd K): 64 x 64 tile, K step 16, 256 threads
//                      with 4 x 4 outputs each (rows ty + 16i, cols tx + 16j: B reads are consecutive across the
//                      half-warp, A reads broadcast). Tiles are converted to f32 in smem, [k][m] and [k][n] (+1 pad).
// Both apply bias, the epilogue and the output conversion in registers and store with bounds checks.
// Race freedom: a smem buffer is refilled only after the __syncthreads that ends its last read.
#include "transformer_common.cuh"
// after the standard headers: under the emulator, portable.cuh defines __noinline__
#include "mma_tile.cuh"

namespace scalekv::cuda_ops {
namespace {


struct GemmParams {
  const void* x;
  const void* w;
  const void* bias;
  void* y;
  int m, n, k;
  DType bias_dtype, y_dtype;
  Epilogue epilogue;
};

__device__ __forceinline__ void store_output(const GemmParams& p, int row, int col, float acc) {
  if (row >= p.m || col >= p.n) return;
  if (p.bias) acc += tx::load_f32(p.bias, p.bias_dtype, col);
  tx::store_f32(p.y, p.y_dtype, static_cast<int64_t>(row) * p.n + col, tx::apply_epilogue(p.epilogue, acc));
}

// ---------------------------------------------------------------------------------------------------------
// bf16 tensor cores

constexpr int kBM = 128, kBN = 128, kBK = 32, kMmaThreads = 256;

using mma_tile::swz;
static_assert(kBK == mma_tile::kK, "tiles of the shared warp step");

// Rows [row0, row0 + 128) x K columns [k0, k0 + 32) of a [rows, K] bf16 matrix into a swizzled tile.
__device__ __forceinline__ void load_tile(const bf16* g, int rows, int k, int row0, int k0, bf16* s) {
  for (int e = threadIdx.x; e < kBM * 4; e += kMmaThreads) {
    const int row = e >> 2, chunk = e & 3;
    const int gr = row0 + row, gk = k0 + chunk * 8;
    const bool inside = gr < rows && gk < k;  // K % 8 == 0: a chunk is wholly inside or outside
    skv::cp_async_16(s + swz(row, chunk), inside ? g + static_cast<size_t>(gr) * k + gk : g, inside ? 16 : 0);
  }
}

__global__ void __launch_bounds__(kMmaThreads) gemm_mma_kernel(const GemmParams p) {
  SKV_DYNAMIC_SMEM(smem_raw);
  bf16* sA = reinterpret_cast<bf16*>(smem_raw);  // [2][BM][BK]
  bf16* sB = sA + 2 * kBM * kBK;                  // [2][BN][BK]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // the warp's tile starts at row wm*64, column wn*32
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const bf16* x = static_cast<const bf16*>(p.x);
  const bf16* w = static_cast<const bf16*>(p.w);
  // g = row within an 8-row group, t = column pair; mi = which ldmatrix matrix this lane addresses, lr = its row.
  const int g = lane >> 2, t = lane & 3, mi = lane >> 3, lr = lane & 7;

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  const int n_tiles = (p.k + kBK - 1) / kBK;  // >= 1: the launcher sends K = 0 to the SIMT kernel
  load_tile(x, p.m, p.k, m0, 0, sA);
  load_tile(w, p.n, p.k, n0, 0, sB);
  skv::cp_async_commit();

  for (int kt = 0; kt < n_tiles; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < n_tiles) {
      // buf ^ 1 was last read in iteration kt - 1, which ended with __syncthreads.
      load_tile(x, p.m, p.k, m0, (kt + 1) * kBK, sA + (buf ^ 1) * kBM * kBK);
      load_tile(w, p.n, p.k, n0, (kt + 1) * kBK, sB + (buf ^ 1) * kBN * kBK);
      skv::cp_async_commit();
      skv::cp_async_wait<1>();  // all but the newest group (tile kt + 1) have landed
    } else {
      skv::cp_async_wait<0>();
    }
    __syncthreads();  // publish every thread's copies of tile kt

    const bf16* a_s = sA + buf * kBM * kBK;
    const bf16* b_s = sB + buf * kBN * kBK;
    // B (k, n = w row): b0 = n 0-7 / k 0-7, b1 = n 0-7 / k 8-15 for n-block 2*nb2; b2, b3 for n 8-15.
    mma_tile::tile_products(acc, a_s, wm * 64, [&](uint32_t bfr[4], int kk, int nb2) {
      skv::ldmatrix_x4(bfr, b_s + swz(wn * 32 + nb2 * 16 + (mi >> 1) * 8 + lr, 2 * kk + (mi & 1)));
    });
    __syncthreads();  // every warp is done with buffer buf before iteration kt + 1 refills it
  }

  // Accumulator (mt, nt): [0..1] = (row g, cols 2t, 2t+1), [2..3] = (row g + 8, same cols).
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const int row = m0 + wm * 64 + mt * 16 + g, col = n0 + wn * 32 + nt * 8 + 2 * t;
      store_output(p, row, col, acc[mt][nt][0]);
      store_output(p, row, col + 1, acc[mt][nt][1]);
      store_output(p, row + 8, col, acc[mt][nt][2]);
      store_output(p, row + 8, col + 1, acc[mt][nt][3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// SIMT

constexpr int kSM = 64, kSN = 64, kSK = 16, kSimtThreads = 256;

// An x element as the product sees it: f32 x against bf16 w is rounded to bf16 first (backend.h), as autocast does.
template <typename TW>
__device__ __forceinline__ float x_operand(float v) { return v; }
template <>
__device__ __forceinline__ float x_operand<bf16>(float v) { return to_f32(__float2bfloat16_rn(v)); }
template <typename TW>
__device__ __forceinline__ float x_operand(bf16 v) { return to_f32(v); }

template <typename TX, typename TW>
__global__ void __launch_bounds__(kSimtThreads) gemm_simt_kernel(const GemmParams p) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* sA = reinterpret_cast<float*>(smem_raw);  // [SK][SM + 1]
  float* sB = sA + kSK * (kSM + 1);                 // [SK][SN + 1]
  const TX* x = static_cast<const TX*>(p.x);
  const TW* w = static_cast<const TW*>(p.w);
  const int tid = threadIdx.x, ty = tid / 16, txi = tid % 16;
  const int m0 = blockIdx.y * kSM, n0 = blockIdx.x * kSN;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

  for (int k0 = 0; k0 < p.k; k0 += kSK) {
    for (int e = tid; e < kSM * kSK; e += kSimtThreads) {
      const int row = e / kSK, kc = e % kSK, gk = k0 + kc;
      const int gm = m0 + row, gn = n0 + row;
      sA[kc * (kSM + 1) + row] = gm < p.m && gk < p.k ? x_operand<TW>(x[static_cast<size_t>(gm) * p.k + gk]) : 0.0f;
      sB[kc * (kSN + 1) + row] = gn < p.n && gk < p.k ? to_f32(w[static_cast<size_t>(gn) * p.k + gk]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = sA[kk * (kSM + 1) + ty + 16 * i];
        b[i] = sB[kk * (kSN + 1) + txi + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();  // all reads done before the next slice overwrites the tiles
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) store_output(p, m0 + ty + 16 * i, n0 + txi + 16 * j, acc[i][j]);
}

template <typename TX, typename TW>
void launch_simt(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid((p.n + kSN - 1) / kSN, (p.m + kSM - 1) / kSM);
  const size_t smem = sizeof(float) * kSK * (kSM + 1 + kSN + 1);
  const auto kernel = gemm_simt_kernel<TX, TW>;  // a template-id with a comma cannot be a macro argument
  SKV_LAUNCH(kernel, grid, dim3(kSimtThreads), smem, stream, p);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

void gemm(const GemmArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  if (a.m <= 0 || a.n <= 0) return;
  if ((a.m + kSM - 1) / kSM > 65535)
    throw BackendError(StatusCode::internal, "gemm: M = " + std::to_string(a.m) + " exceeds the grid limit");
  const GemmParams p{a.x, a.w, a.bias, a.y, a.m, a.n, a.k, a.bias_dtype, a.y_dtype, a.epilogue};
  const bool bf16_inputs = a.x_dtype == DType::bf16 && a.w_dtype == DType::bf16;
  if (bf16_inputs && a.k > 0 && a.k % 8 == 0 && aligned16(a.x) && aligned16(a.w)) {
    const dim3 grid((a.n + kBN - 1) / kBN, (a.m + kBM - 1) / kBM);
    const size_t smem = sizeof(bf16) * 2 * (kBM + kBN) * kBK;
    SKV_LAUNCH(gemm_mma_kernel, grid, dim3(kMmaThreads), smem, stream, p);
  } else if (bf16_inputs) {
    launch_simt<bf16, bf16>(p, stream);
  } else if (a.w_dtype == DType::bf16) {
    launch_simt<float, bf16>(p, stream);
  } else {
    launch_simt<float, float>(p, stream);
  }
  tx::check_launch("gemm");
}

}  // namespace scalekv::cuda_ops
