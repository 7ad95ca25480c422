// gemm: y[m, n] = epilogue(sum_k x[m, k] * w[n, k] + bias[n]), x [M, K], w [N, K] (Linear layout), f32 accumulation;
// gemmResidual: y[m, n] += gate[m / tokens, n] * (the same), y f32, in the same kernels' epilogues.
// Cost: 2*M*N*K FLOP; bytes ~ (M*K*ceil(N/BN) * xsize + N*K*ceil(M/BM) * wsize) + M*N*ysize.
//
// Kernels:
//   gemm_mma_kernel<BM, BN, TX, TY>  bf16 w, x bf16 or f32 (the model's bf16 mode: f32 activations against bf16
//                      weights), K a multiple of 8, 16-byte aligned x and w; any M, N (rows past M/N are zero-filled
//                      on load and not stored). Block tile BM x BN, K step 32, warps of 64 x 64 = 4 x 8
//                      mma.m16n8k16 accumulators (8 ldmatrix.x4 per 32 MMAs) laid out (BM / 64) x (BN / 64):
//                        128 x 128: 4 warps, smem 4 * (128 + 128) * 32 * 2 B = 64 KiB, 211-250 registers
//                                   (sm_80 / sm_90, no spills): 2 blocks (8 warps) per SM.
//                        128 x 256: 8 warps, smem 4 * (128 + 256) * 32 * 2 B = 96 KiB (128 KiB for f32 y, whose
//                                   staged output tile is larger), 210-232 registers (no spills): 1 block per SM.
//                      L2 traffic per FLOP ~ xsize / BN + wsize / BM (every block re-reads its A and B panels):
//                      128 x 256 moves 3/4 of 128 x 128's sectors with bf16 x, 2/3 with f32 x (the emulator's
//                      counters: 0.366 vs 0.488, 0.488 vs 0.732 load sectors per kFLOP). The launcher takes it when
//                      its grid has at least one block per SM (ceil(M/128) * ceil(N/256) >= SMs), else 128 x 128,
//                      whose twice as many blocks leave fewer SMs idle (Infinity-2B's block GEMMs, M = 8192 tokens,
//                      N >= 2048: 512+ wide blocks on 132 SMs).
//                      A 4-stage pipeline: while tile t is multiplied, tiles t+1..t+3 are in flight. w tiles
//                      ([BN][32] bf16, K-contiguous: w rows are the "col" B operand as is) and bf16 x tiles arrive by
//                      cp.async 16 B. f32 x is rounded to bf16 on the way into shared memory: each thread loads
//                      BM * 8 / threads (8 or 4) float4 pieces of tile t+3 into registers before tile t's MMAs
//                      (piece tid + threads * i: a warp's load is 512 consecutive bytes, fully coalesced), and after
//                      them rounds them (round to nearest even, as __float2bfloat16_rn and autocast) and stores them
//                      8 B at a time into the same swizzled layout, so the global latency hides behind the MMAs and
//                      the products are exactly those of the rounded x. Pieces past K are zero (K % 8 == 0: a piece
//                      is wholly inside or outside).
//                      Fragments come from ldmatrix.x4 on rows XOR-swizzled in 16-byte chunks
//                      (chunk ^ ((row >> 1) & 3)): a row is 64 B, so the 8 rows of an ldmatrix phase cover 8
//                      distinct 16-byte bank groups. Past the default 48 KiB of smem, each instantiation is opted in
//                      once per device (opt_in_smem, device_common.cuh).
//                      Epilogue: bias and the activation in registers, then the BM x BN output tile (TY) is staged
//                      in the pipeline's shared memory with 16-byte chunks XOR-swizzled by (row & 7) for bf16 and
//                      2 (row & 3) for f32 (see staged(): each phase of the bf16x2 / 8-byte f32-pair fragment
//                      stores hits all 32 banks once; (row & 7) gave f32 2-way conflicts) and written out
//                      row-contiguously in 16-byte stores (per element where y is unaligned or N * ysize % 16 != 0).
//                      Residual (gemmResidual, f32 y): the write-out reads y and the gate 16 bytes at a time and
//                      stores y + gate * value, so the block's Linears end in the residual stream without their
//                      output ever reaching memory (gemm + gatedResidual wrote it as f32 and read it back, 8 more
//                      bytes an element, in a second launch).
//   gemm_simt_kernel   every other case: f32 x and w (the exact conformance mode), and, reported as a slow path
//                      (note_slow_path), bf16 operands with K % 8 != 0 or a base not 16-byte aligned: 64 x 64 tile,
//                      K step 16, 256 threads with 4 x 4 outputs each (rows ty + 16i, cols tx + 16j: B reads are
//                      consecutive across the half-warp, A reads broadcast). Tiles are converted to f32 in smem,
//                      [k][m] and [k][n] (+1 pad); f32 x against bf16 w is rounded to bf16 on load. Stores per
//                      element with bounds checks.
// Race freedom (both mma tiles; the block's threads cooperate on every load and store, whatever their number).
// mma: iteration t waits for its own cp.async group, then one __syncthreads publishes tile t (copies and the
// register stores of iteration t-3) and ends every warp's reads of stage (t-1) % 4, the only stage iteration t
// then refills (by cp.async and by its register stores); nothing else writes a stage while it is read. The
// epilogue reuses the pipeline smem (or more, for f32 y on 128 x 256: the allocation is the larger of the two)
// only after cp_async_wait<0> and a __syncthreads (all reads of every stage done), and reads the staged tile only
// after another. simt: a smem tile is refilled only after the __syncthreads that ends its last read.
#include <algorithm>
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
  // gemmResidual (f32 y): y += gate[row / tokens] * value instead of y = value.
  bool residual;
  int tokens;
  const float* gate;
  int64_t gate_stride;
};

__device__ __forceinline__ float bias_at(const GemmParams& p, int col) {
  return p.bias && col < p.n ? tx::load_f32(p.bias, p.bias_dtype, col) : 0.0f;
}

// The gate of output (row, col) of a residual GEMM (1 without a gate).
__device__ __forceinline__ float gate_at(const GemmParams& p, int row, int col) {
  return p.gate ? p.gate[(row / p.tokens) * p.gate_stride + col] : 1.0f;
}

// ---------------------------------------------------------------------------------------------------------
// bf16 tensor cores

constexpr int kBK = 32, kStages = 4;
constexpr int kWM = 64, kWN = 64;            // warp tile
constexpr int kMT = kWM / 16, kNT = kWN / 8;  // m16 row blocks and n8 column blocks per warp
constexpr int kChunks = kBK / 8;              // 16-byte chunks per tile row

// The block tile: BM x BN outputs, (BM / 64) x (BN / 64) warps of 64 x 64.
template <int BM, int BN>
struct Tile {
  static constexpr int kWarpsN = BN / kWN, kThreads = 32 * (BM / kWM) * kWarpsN;
  static constexpr size_t kStageElems = static_cast<size_t>(BM + BN) * kBK;  // A [BM][BK], then B [BN][BK]
  static constexpr int kXPieces = BM * kBK / 4 / kThreads;                    // f32 x float4 pieces per thread
  // The pipeline, or the staged output tile where that is larger (f32 y on 128 x 256).
  template <typename TY>
  static constexpr size_t smem() {
    return std::max(sizeof(bf16) * kStages * kStageElems, sizeof(TY) * BM * BN);
  }
  static_assert(BM % kWM == 0 && BN % kWN == 0, "whole warp tiles");
  static_assert(BM * kChunks % kThreads == 0 && BN * kChunks % kThreads == 0, "whole chunks per thread");
  static_assert(kXPieces * kThreads * 4 == BM * kBK, "whole f32 x pieces per thread");
};

__device__ __forceinline__ int swz(int row, int chunk) { return row * kBK + ((chunk ^ ((row >> 1) & 3)) << 3); }

// Rows [row0, row0 + ROWS) x K columns [k0, k0 + 32) of a [rows, K] bf16 matrix into a swizzled tile.
template <int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(const bf16* g, int rows, int k, int row0, int k0, bf16* s) {
  for (int e = threadIdx.x; e < ROWS * kChunks; e += THREADS) {
    const int row = e / kChunks, chunk = e % kChunks;
    const int gr = row0 + row, gk = k0 + chunk * 8;
    const bool inside = gr < rows && gk < k;  // K % 8 == 0: a chunk is wholly inside or outside
    skv::cp_async_16(s + swz(row, chunk), inside ? g + static_cast<size_t>(gr) * k + gk : g, inside ? 16 : 0);
  }
}

// f32 x: an x tile is BM rows x 8 float4 pieces; this thread's are pieces threadIdx.x + THREADS i (a warp's load
// is 4 whole rows, 512 consecutive bytes), staged in registers between the global loads and the rounding stores.
template <int N>
struct XChunks {
  float4 v[N];
};

template <int THREADS, int N>
__device__ __forceinline__ void load_x_chunks(const float* x, int m, int k, int row0, int k0, XChunks<N>& r) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int e = threadIdx.x + i * THREADS, gr = row0 + e / (kBK / 4), gk = k0 + (e % (kBK / 4)) * 4;
    r.v[i] = gr < m && gk < k ? *reinterpret_cast<const float4*>(x + static_cast<size_t>(gr) * k + gk)
                              : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// Piece q of a row is the low (q even) or high half of 16-byte chunk q / 2.
template <int THREADS, int N>
__device__ __forceinline__ void store_x_chunks(const XChunks<N>& r, bf16* s) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const int e = threadIdx.x + i * THREADS, q = e % (kBK / 4);
    const float4 a = r.v[i];
    // One 8-byte store on the GPU; g++ splits it in two, so the emulator's counters see 2-way bank conflicts
    // here that the GPU does not have (a 64-bit integer store would fix the count but costs ptxas 5 registers).
    *reinterpret_cast<uint2*>(s + swz(e / (kBK / 4), q / 2) + (q % 2) * 4) =
        make_uint2(skv::pack_bf16x2(a.x, a.y), skv::pack_bf16x2(a.z, a.w));
  }
}

// Two adjacent outputs as one 8-byte (f32) or 4-byte (bf16) shared-memory store. f32: a 64-bit integer store, not
// a float2 one, which g++ would split into two 4-byte stores that the emulator's bank counters see as conflicting.
__device__ __forceinline__ void store_pair(float* d, float a, float b) {
  *reinterpret_cast<unsigned long long*>(d) = static_cast<unsigned long long>(__float_as_uint(b)) << 32 | __float_as_uint(a);
}
__device__ __forceinline__ void store_pair(bf16* d, float a, float b) { *reinterpret_cast<uint32_t*>(d) = skv::pack_bf16x2(a, b); }

// The staged output tile [BM][BN] of TY: 16-byte chunk c of row r sits at chunk c ^ ((r % kPer) * (8 / kPer)),
// kPer = 16 / sizeof(TY) (bf16: r & 7; f32: 2 (r & 3)). One phase of the fragment stores (128 bytes: 8 rows of
// 4-byte bf16 pairs, or 4 rows of 8-byte f32 pairs, each row one n8 block = 1 or 2 chunks) then covers 8 distinct
// chunks mod 8, all 32 banks; the row-contiguous 16-byte reads (8 aligned chunks of one row) stay a permutation.
template <typename TY, int BN>
__device__ __forceinline__ int staged(int row, int col) {
  constexpr int kPer = 16 / sizeof(TY);
  return row * BN + (((col / kPer) ^ ((row % kPer) * (8 / kPer))) * kPer) + col % kPer;
}

template <int BM, int BN, typename TX, typename TY>
__global__ void __launch_bounds__(Tile<BM, BN>::kThreads) gemm_mma_kernel(const GemmParams p) {
  using T = Tile<BM, BN>;
  constexpr int kThreads = T::kThreads;
  constexpr bool kRoundX = std::is_same<TX, float>::value;
  SKV_DYNAMIC_SMEM(smem_raw);
  bf16* const stages = reinterpret_cast<bf16*>(smem_raw);  // [kStages][A: BM][BK], [B: BN][BK]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / T::kWarpsN, wn = warp % T::kWarpsN;  // the warp's tile starts at row wm*64, column wn*64
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const TX* x = static_cast<const TX*>(p.x);
  const bf16* w = static_cast<const bf16*>(p.w);
  // g = row within an 8-row group, t = column pair; mi = which ldmatrix matrix this lane addresses, lr = its row.
  const int g = lane >> 2, t = lane & 3, mi = lane >> 3, lr = lane & 7;

  // Starts tile kt's loads into its stage: cp.async for w (and bf16 x); f32 x into `xr` (stored by the caller).
  XChunks<T::kXPieces> xr;
  const auto issue = [&](int kt) {
    bf16* a_s = stages + (kt % kStages) * T::kStageElems;
    if constexpr (kRoundX) load_x_chunks<kThreads>(x, p.m, p.k, m0, kt * kBK, xr);
    else load_tile<BM, kThreads>(x, p.m, p.k, m0, kt * kBK, a_s);
    load_tile<BN, kThreads>(w, p.n, p.k, n0, kt * kBK, a_s + BM * kBK);
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
      if constexpr (kRoundX) store_x_chunks<kThreads>(xr, stages + s * T::kStageElems);
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

    const bf16* a_s = stages + (kt % kStages) * T::kStageElems;
    const bf16* b_s = a_s + BM * kBK;
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
      if (next < n_tiles) store_x_chunks<kThreads>(xr, stages + (next % kStages) * T::kStageElems);
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
        store_pair(out_s + staged<TY, BN>(row, col), tx::apply_epilogue(p.epilogue, acc[mt][nt][2 * h] + b0),
                   tx::apply_epilogue(p.epilogue, acc[mt][nt][2 * h + 1] + b1));
      }
    }
  }
  __syncthreads();
  constexpr int kPer = 16 / sizeof(TY), kRowChunks = BN / kPer;
  TY* const y = static_cast<TY*>(p.y);
  const bool vec = reinterpret_cast<uintptr_t>(p.y) % 16 == 0 && p.n % kPer == 0 &&
                   (!p.gate || (reinterpret_cast<uintptr_t>(p.gate) % 16 == 0 && p.gate_stride % 4 == 0));
  // Residual: a thread's columns repeat from row to row (kThreads is a multiple of kRowChunks) and a tile's rows
  // rarely span two images, so its gate quad is loaded again only when either changes.
  float4 gate4 = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
  int64_t gate4_at = -1;
  for (int e = threadIdx.x; e < BM * kRowChunks; e += kThreads) {
    const int row = e / kRowChunks, col = (e % kRowChunks) * kPer, gr = m0 + row, gc = n0 + col;
    if (gr >= p.m || gc >= p.n) continue;
    const TY* src = out_s + staged<TY, BN>(row, col);
    TY* dst = y + static_cast<size_t>(gr) * p.n + gc;
    if constexpr (std::is_same_v<TY, float>) {
      if (p.residual) {  // y += gate * value, read and written 16 bytes at a time like the plain store
        if (vec) {
          const float4 v = *reinterpret_cast<const float4*>(src);
          const int64_t gate_at = (gr / p.tokens) * p.gate_stride + gc;
          if (p.gate && gate_at != gate4_at) {
            gate4 = *reinterpret_cast<const float4*>(p.gate + gate_at);
            gate4_at = gate_at;
          }
          // y moves as uint4, as the plain store does: one 16-byte access each way (g++, in the emulator, splits
          // a float4 copy into pieces it no longer counts as one request).
          const uint4 old = *reinterpret_cast<const uint4*>(dst);
          *reinterpret_cast<uint4*>(dst) = make_uint4(__float_as_uint(__uint_as_float(old.x) + gate4.x * v.x),
                                                      __float_as_uint(__uint_as_float(old.y) + gate4.y * v.y),
                                                      __float_as_uint(__uint_as_float(old.z) + gate4.z * v.z),
                                                      __float_as_uint(__uint_as_float(old.w) + gate4.w * v.w));
        } else {
          for (int j = 0; j < kPer && gc + j < p.n; ++j) dst[j] += gate_at(p, gr, gc + j) * src[j];
        }
        continue;
      }
    }
    if (vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int j = 0; j < kPer && gc + j < p.n; ++j) dst[j] = src[j];
    }
  }
}

template <int BM, int BN, typename TX, typename TY>
void launch_mma_tile(const GemmParams& p, cudaStream_t stream) {
  using T = Tile<BM, BN>;
  constexpr size_t smem = T::template smem<TY>();
  static_assert(smem <= 160 * 1024, "within sm_80's opt-in ceiling (163 KiB), which the emulator enforces");
  const auto kernel = gemm_mma_kernel<BM, BN, TX, TY>;  // a template-id with a comma cannot be a macro argument
  static SmemOptIn opted_in;
  opt_in_smem(kernel, smem, opted_in, "gemm");
  const dim3 grid((p.n + BN - 1) / BN, (p.m + BM - 1) / BM);
  SKV_LAUNCH(kernel, grid, dim3(T::kThreads), smem, stream, p);
}

// The tile: 128 x 256 (L2 traffic per FLOP ~ 1/BM + 1/BN: 3/256 against 4/256) when its grid has at least one
// block per SM (it runs one block of 8 warps per SM, as 128 x 128 runs two of 4); else 128 x 128, whose twice as
// many blocks leave fewer SMs idle.
template <typename TX, typename TY>
void launch_mma(const GemmParams& p, cudaStream_t stream) {
  const int64_t wide_blocks = static_cast<int64_t>((p.m + 127) / 128) * ((p.n + 255) / 256);
  if (wide_blocks >= sm_count("gemm")) launch_mma_tile<128, 256, TX, TY>(p, stream);
  else launch_mma_tile<128, 128, TX, TY>(p, stream);
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
  const int64_t at = static_cast<int64_t>(row) * p.n + col;
  const float v = tx::apply_epilogue(p.epilogue, acc + bias_at(p, col));
  if (p.residual) static_cast<float*>(p.y)[at] += gate_at(p, row, col) * v;
  else tx::store_f32(p.y, p.y_dtype, at, v);
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
  if (a.residual && (a.y_dtype != DType::f32 || a.tokens <= 0))
    throw BackendError(StatusCode::internal, "gemmResidual: needs an f32 y and tokens > 0");
  const GemmParams p{a.x, a.w, a.bias, a.y, a.m, a.n, a.k, a.bias_dtype, a.y_dtype, a.epilogue,
                     a.residual, a.tokens, a.gate, a.gate_stride};
  const bool x_bf16 = a.x_dtype == DType::bf16, y_bf16 = a.y_dtype == DType::bf16;
  if (a.w_dtype != DType::bf16 || a.k == 0) {
    // f32 x and w: the exact path, not a slow one; K = 0: nothing to multiply (y = epilogue(bias)).
    if (a.w_dtype != DType::bf16) launch_simt<float, float>(p, stream);
    else if (x_bf16) launch_simt<bf16, bf16>(p, stream);
    else launch_simt<float, bf16>(p, stream);
  } else if (const char* blocker = mma_blocker(a)) {
    note_slow_path(a.residual ? "gemmResidual" : "gemm", blocker);
    if (x_bf16) launch_simt<bf16, bf16>(p, stream);
    else launch_simt<float, bf16>(p, stream);
  } else if (x_bf16) {
    if (y_bf16) launch_mma<bf16, bf16>(p, stream);
    else launch_mma<bf16, float>(p, stream);
  } else {
    if (y_bf16) launch_mma<float, bf16>(p, stream);
    else launch_mma<float, float>(p, stream);
  }
  tx::check_launch(a.residual ? "gemmResidual" : "gemm");
}

}  // namespace scalekv::cuda_ops
