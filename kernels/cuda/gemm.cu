// gemm: y[m, n] = epilogue(sum_k x[m, k] * w[n, k] + bias[n]), x [M, K], w [N, K] (Linear layout), f32 accumulation.
// Cost: 2*M*N*K FLOP; bytes ~ (M*K*ceil(N/BN) * xsize + N*K*ceil(M/BM) * wsize) + M*N*ysize.
//
// Kernels:
//   gemm_mma_kernel<TX, TY>  bf16 w, x bf16 or f32 (the model's bf16 mode: f32 activations against bf16 weights),
//                      K a multiple of 8, 16-byte aligned x and w; any M, N (rows past M/N are zero-filled on load
//                      and not stored). Block tile 128 x 128, K step 32, 4 warps as 2 (M) x 2 (N), warp tile
//                      64 x 64 = 4 x 8 mma.m16n8k16 accumulators (8 ldmatrix.x4 per 32 MMAs; 229-233 registers,
//                      no spills). A 4-stage pipeline: while tile t is multiplied, tiles t+1..t+3 are in flight.
//                      w tiles ([128][32] bf16, K-contiguous: w rows are the "col" B operand as is) and bf16 x
//                      tiles arrive by cp.async 16 B. f32 x is rounded to bf16 on the way
//                      into shared memory: each thread loads eight float4 pieces of tile t+3 into registers before
//                      tile t's MMAs (piece tid + 128 i: a warp's load is 512 consecutive bytes, fully coalesced),
//                      and after them rounds them (round to nearest even, as __float2bfloat16_rn and autocast) and
//                      stores them 8 B at a time into the same swizzled layout, so the global latency hides behind
//                      the MMAs and the products are exactly those of the rounded x. Pieces past K are zero
//                      (K % 8 == 0: a piece is wholly inside or outside).
//                      Fragments come from ldmatrix.x4 on rows XOR-swizzled in 16-byte chunks
//                      (chunk ^ ((row >> 1) & 3)): a row is 64 B, so the 8 rows of an ldmatrix phase cover 8
//                      distinct 16-byte bank groups. Smem 4 * (128 + 128) * 32 * 2 B = 64 KiB (past the default
//                      48 KiB: the launcher opts each instantiation in once per device).
//                      Epilogue: bias and the activation in registers, then the 128 x 128 output tile (TY, at most
//                      64 KiB) is staged in the pipeline's shared memory with 16-byte chunks XOR-swizzled by
//                      (row & 7) (the float2 / bf16x2 fragment stores of a warp hit distinct banks) and written out
//                      row-contiguously in 16-byte stores (per element where y is unaligned or N * ysize % 16 != 0).
//   gemm_simt_kernel   every other case: f32 x and w (the exact conformance mode), and, reported as a slow path
//                      (note_slow_path), bf16 operands with K % 8 != 0 or a base not 16-byte aligned: 64 x 64 tile,
//                      K step 16, 256 threads with 4 x 4 outputs each (rows ty + 16i, cols tx + 16j: B reads are
//                      consecutive across the half-warp, A reads broadcast). Tiles are converted to f32 in smem,
//                      [k][m] and [k][n] (+1 pad); f32 x against bf16 w is rounded to bf16 on load. Stores per
//                      element with bounds checks.
// Race freedom. mma: iteration t waits for its own cp.async group, then one __syncthreads publishes tile t (copies
// and the register stores of iteration t-3) and ends every warp's reads of stage (t-1) % 4, the only stage
// iteration t then refills (by cp.async and by its register stores); nothing else writes a stage while it is
// read. The epilogue reuses the pipeline smem only after cp_async_wait<0> and a __syncthreads (all reads of
// every stage done), and reads the staged tile only after another. simt: a smem tile is refilled only after the
// __syncthreads that ends its last read.
#include <atomic>
#include <type_traits>

#include "transformer_common.cuh"

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

__device__ __forceinline__ float bias_at(const GemmParams& p, int col) {
  return p.bias && col < p.n ? tx::load_f32(p.bias, p.bias_dtype, col) : 0.0f;
}

// ---------------------------------------------------------------------------------------------------------
// bf16 tensor cores

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kMmaThreads = 128;
constexpr int kWarpsN = 2, kWM = 64, kWN = 64;  // 2 x 2 warps of 64 x 64
constexpr int kMT = kWM / 16, kNT = kWN / 8;    // m16 row blocks and n8 column blocks per warp
constexpr int kChunks = kBK / 8;                 // 16-byte chunks per tile row
constexpr size_t kStageElems = static_cast<size_t>(kBM + kBN) * kBK;
constexpr int kXC = kBM * kChunks / kMmaThreads;  // x (and w) chunks per thread and tile
static_assert(kBM == kBN && kXC * kMmaThreads == kBM * kChunks, "whole chunks per thread");
static_assert(kBM / kWM * kWarpsN * 32 == kMmaThreads && kBN == kWarpsN * kWN, "warps cover the block tile");

__device__ __forceinline__ int swz(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 3); }

// Rows [row0, row0 + 128) x K columns [k0, k0 + 32) of a [rows, K] bf16 matrix into a swizzled tile.
__device__ __forceinline__ void load_tile(const bf16* g, int rows, int k, int row0, int k0, bf16* s) {
  for (int e = threadIdx.x; e < kBM * kChunks; e += kMmaThreads) {
    const int row = e / kChunks, chunk = e % kChunks;
    const int gr = row0 + row, gk = k0 + chunk * 8;
    const bool inside = gr < rows && gk < k;  // K % 8 == 0: a chunk is wholly inside or outside
    skv::cp_async_16(s + swz(row, chunk), inside ? g + static_cast<size_t>(gr) * k + gk : g, inside ? 16 : 0);
  }
}

// f32 x: an x tile is 128 rows x 8 float4 pieces; this thread's are pieces threadIdx.x + 128 i (a warp's load is
// 4 whole rows, 512 consecutive bytes), staged in registers between the global loads and the rounding stores.
constexpr int kXPieces = kBM * kBK / 4 / kMmaThreads;
struct XChunks {
  float4 v[kXPieces];
};

__device__ __forceinline__ void load_x_chunks(const float* x, int m, int k, int row0, int k0, XChunks& r) {
#pragma unroll
  for (int i = 0; i < kXPieces; ++i) {
    const int e = threadIdx.x + i * kMmaThreads, gr = row0 + e / (kBK / 4), gk = k0 + (e % (kBK / 4)) * 4;
    r.v[i] = gr < m && gk < k ? *reinterpret_cast<const float4*>(x + static_cast<size_t>(gr) * k + gk)
                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// Piece q of a row is the low (q even) or high half of 16-byte chunk q / 2.
__device__ __forceinline__ void store_x_chunks(const XChunks& r, bf16* s) {
#pragma unroll
  for (int i = 0; i < kXPieces; ++i) {
    const int e = threadIdx.x + i * kMmaThreads, q = e % (kBK / 4);
    const float4 a = r.v[i];
    *reinterpret_cast<uint2*>(s + swz(e / (kBK / 4), q / 2) + (q % 2) * 4) =
        make_uint2(skv::pack_bf16x2(a.x, a.y), skv::pack_bf16x2(a.z, a.w));
  }
}

// Two adjacent outputs as one 8-byte (f32) or 4-byte (bf16) shared-memory store.
__device__ __forceinline__ void store_pair(float* d, float a, float b) { *reinterpret_cast<float2*>(d) = make_float2(a, b); }
__device__ __forceinline__ void store_pair(bf16* d, float a, float b) { *reinterpret_cast<uint32_t*>(d) = skv::pack_bf16x2(a, b); }

// The staged output tile [BM][BN] of TY: 16-byte chunk c of row r sits at chunk c ^ (r & 7).
template <typename TY>
__device__ __forceinline__ int staged(int row, int col) {
  constexpr int kPer = 16 / sizeof(TY);
  return row * kBN + (((col / kPer) ^ (row & 7)) * kPer) + col % kPer;
}

template <typename TX, typename TY>
__global__ void __launch_bounds__(kMmaThreads) gemm_mma_kernel(const GemmParams p) {
  constexpr bool kRoundX = std::is_same<TX, float>::value;
  SKV_DYNAMIC_SMEM(smem_raw);
  bf16* const stages = reinterpret_cast<bf16*>(smem_raw);  // [kStages][A: BM][BK], [B: BN][BK]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;  // the warp's tile starts at row wm*64, column wn*64
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const TX* x = static_cast<const TX*>(p.x);
  const bf16* w = static_cast<const bf16*>(p.w);
  // g = row within an 8-row group, t = column pair; mi = which ldmatrix matrix this lane addresses, lr = its row.
  const int g = lane >> 2, t = lane & 3, mi = lane >> 3, lr = lane & 7;

  // Starts tile kt's loads into its stage: cp.async for w (and bf16 x); f32 x into `xr` (stored by the caller).
  XChunks xr;
  const auto issue = [&](int kt) {
    bf16* a_s = stages + (kt % kStages) * kStageElems;
    if constexpr (kRoundX) load_x_chunks(x, p.m, p.k, m0, kt * kBK, xr);
    else load_tile(x, p.m, p.k, m0, kt * kBK, a_s);
    load_tile(w, p.n, p.k, n0, kt * kBK, a_s + kBM * kBK);
  };

  float acc[kMT][kNT][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  const int n_tiles = (p.k + kBK - 1) / kBK;  // >= 1: the launcher sends K = 0 to the SIMT kernel
  // One commit group per tile slot (empty past the last tile), so cp_async_wait<kStages - 2> always means
  // "tile kt has landed".
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) {
      issue(s);
      if constexpr (kRoundX) store_x_chunks(xr, stages + s * kStageElems);
    }
    skv::cp_async_commit();
  }

  for (int kt = 0; kt < n_tiles; ++kt) {
    skv::cp_async_wait<kStages - 2>();
    // Publishes tile kt (this iteration's copies, iteration kt - 3's register stores) and ends every warp's
    // reads of stage (kt - 1) % kStages, which the loads below refill.
    __syncthreads();
    const int next = kt + kStages - 1;
    if (next < n_tiles) issue(next);
    skv::cp_async_commit();

    const bf16* a_s = stages + (kt % kStages) * kStageElems;
    const bf16* b_s = a_s + kBM * kBK;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      // A 16x16: a0 = rows 0-7 / k 0-7, a1 = rows 8-15 / k 0-7, a2 = rows 0-7 / k 8-15, a3 = rows 8-15 / k 8-15.
      uint32_t af[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        skv::ldmatrix_x4(af[mt], a_s + swz(wm * kWM + mt * 16 + (mi & 1) * 8 + lr, 2 * kk + (mi >> 1)));
      // B (k, n = w row): b0 = n 0-7 / k 0-7, b1 = n 0-7 / k 8-15 for n-block 2*nb2; b2, b3 for n 8-15.
      uint32_t bfr[kNT / 2][4];
#pragma unroll
      for (int nb2 = 0; nb2 < kNT / 2; ++nb2)
        skv::ldmatrix_x4(bfr[nb2], b_s + swz(wn * kWN + nb2 * 16 + (mi >> 1) * 8 + lr, 2 * kk + (mi & 1)));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nb2 = 0; nb2 < kNT / 2; ++nb2) {
          skv::mma_m16n8k16_bf16(acc[mt][2 * nb2], af[mt], bfr[nb2], acc[mt][2 * nb2]);
          skv::mma_m16n8k16_bf16(acc[mt][2 * nb2 + 1], af[mt], bfr[nb2] + 2, acc[mt][2 * nb2 + 1]);
        }
      }
    }
    if constexpr (kRoundX) {
      if (next < n_tiles) store_x_chunks(xr, stages + (next % kStages) * kStageElems);
    }
  }

  // Epilogue. Accumulator (mt, nt): [0..1] = (row g, cols 2t, 2t+1), [2..3] = (row g + 8, same cols).
  skv::cp_async_wait<0>();  // only empty groups remain; no copy may land in the staged tile
  __syncthreads();          // every warp is done reading the stages
  TY* const out_s = reinterpret_cast<TY*>(smem_raw);
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) {
    const int col = wn * kWN + nt * 8 + 2 * t;
    const float b0 = bias_at(p, n0 + col), b1 = bias_at(p, n0 + col + 1);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = wm * kWM + mt * 16 + g + 8 * h;
        store_pair(out_s + staged<TY>(row, col), tx::apply_epilogue(p.epilogue, acc[mt][nt][2 * h] + b0),
                   tx::apply_epilogue(p.epilogue, acc[mt][nt][2 * h + 1] + b1));
      }
    }
  }
  __syncthreads();
  constexpr int kPer = 16 / sizeof(TY), kRowChunks = kBN / kPer;
  TY* const y = static_cast<TY*>(p.y);
  const bool vec = reinterpret_cast<uintptr_t>(p.y) % 16 == 0 && p.n % kPer == 0;
  for (int e = threadIdx.x; e < kBM * kRowChunks; e += kMmaThreads) {
    const int row = e / kRowChunks, col = (e % kRowChunks) * kPer, gr = m0 + row, gc = n0 + col;
    if (gr >= p.m || gc >= p.n) continue;
    const TY* src = out_s + staged<TY>(row, col);
    TY* dst = y + static_cast<size_t>(gr) * p.n + gc;
    if (vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int j = 0; j < kPer && gc + j < p.n; ++j) dst[j] = src[j];
    }
  }
}

// Opts `kernel` into `smem` bytes of dynamic shared memory on the current device, once per device (and per
// kernel instantiation: each has its own mask). The attribute is per device context, so a second GPU needs its own call.
template <typename Kernel>
void opt_in_smem_once(Kernel kernel, size_t smem, std::atomic<uint64_t>& done_devices) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) device = 0;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;  // devices past 64: every launch
  if (bit && (done_devices.load(std::memory_order_acquire) & bit)) return;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, "cuda: gemm: " + std::to_string(smem) +
                                               " bytes of shared memory refused: " + cudaGetErrorString(err));
  done_devices.fetch_or(bit, std::memory_order_acq_rel);
}

template <typename TX, typename TY>
void launch_mma(const GemmParams& p, cudaStream_t stream) {
  constexpr size_t smem = sizeof(bf16) * kStages * kStageElems;
  static_assert(smem >= sizeof(TY) * kBM * kBN, "the staged output tile fits in the pipeline's shared memory");
  const auto kernel = gemm_mma_kernel<TX, TY>;  // a template-id with a comma cannot be a macro argument
  static std::atomic<uint64_t> opted_in{0};
  opt_in_smem_once(kernel, smem, opted_in);
  const dim3 grid((p.n + kBN - 1) / kBN, (p.m + kBM - 1) / kBM);
  SKV_LAUNCH(kernel, grid, dim3(kMmaThreads), smem, stream, p);
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

__device__ __forceinline__ void store_output(const GemmParams& p, int row, int col, float acc) {
  if (row >= p.m || col >= p.n) return;
  tx::store_f32(p.y, p.y_dtype, static_cast<int64_t>(row) * p.n + col, tx::apply_epilogue(p.epilogue, acc + bias_at(p, col)));
}

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
  skv::declare_simt_flops(2.0 * p.m * p.n * p.k);
  SKV_LAUNCH(kernel, grid, dim3(kSimtThreads), smem, stream, p);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Why bf16 w (with bf16 or f32 x) cannot take the tensor cores, or null when it can.
const char* mma_blocker(const GemmArgs& a) {
  if (a.k % 8 != 0) return "K % 8 != 0";
  if (!aligned16(a.x)) return "x not 16-byte aligned";
  if (!aligned16(a.w)) return "w not 16-byte aligned";
  return nullptr;
}

}  // namespace

void gemm(const GemmArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  if (a.m <= 0 || a.n <= 0) return;
  if ((a.m + kSM - 1) / kSM > 65535)
    throw BackendError(StatusCode::internal, "gemm: M = " + std::to_string(a.m) + " exceeds the grid limit");
  const GemmParams p{a.x, a.w, a.bias, a.y, a.m, a.n, a.k, a.bias_dtype, a.y_dtype, a.epilogue};
  const bool x_bf16 = a.x_dtype == DType::bf16, y_bf16 = a.y_dtype == DType::bf16;
  if (a.w_dtype != DType::bf16 || a.k == 0) {
    // f32 x and w: the exact path, not a slow one; K = 0: nothing to multiply (y = epilogue(bias)).
    if (a.w_dtype != DType::bf16) launch_simt<float, float>(p, stream);
    else if (x_bf16) launch_simt<bf16, bf16>(p, stream);
    else launch_simt<float, bf16>(p, stream);
  } else if (const char* blocker = mma_blocker(a)) {
    note_slow_path("gemm", blocker);
    if (x_bf16) launch_simt<bf16, bf16>(p, stream);
    else launch_simt<float, bf16>(p, stream);
  } else if (x_bf16) {
    if (y_bf16) launch_mma<bf16, bf16>(p, stream);
    else launch_mma<bf16, float>(p, stream);
  } else {
    if (y_bf16) launch_mma<float, bf16>(p, stream);
    else launch_mma<float, float>(p, stream);
  }
  tx::check_launch("gemm");
}

}  // namespace scalekv::cuda_ops
