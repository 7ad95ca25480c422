// conv2d: out[b,o,y,x] = bias[o] + sum_{i,ky,kx} w[o,i,ky,kx] * x[b,i,y+ky-p,x+kx-p], NCHW, k = 1 or 3, stride 1,
// zero padding p = (k-1)/2, f32 accumulation. FLOPs: 2*B*O*I*k*k*H*W; bytes: x*(O/BM) + w*(B*H*W/BN) + out.
//
// An implicit GEMM: M = O output channels, N = B*H*W pixels, K = I*k*k (in weight order: i, ky, kx), A = weight
// [O][K] (row-major as stored), B = the im2col matrix [K][N], never materialised: each tile of it is gathered
// from x with zero padding as it is loaded.
//
// Versions:
//   conv2d_simt_kernel<KS,TX,TW> (v1) f32 FMA on 64x64 output tiles, K step 16, 256 threads each computing a 4x4
//       block (4 channels x 4 pixels). Tiles of A and B are converted to f32 into shared memory (A transposed to
//       [16][64+4], padded against bank conflicts on the store). Single buffered. Now only for f32 x (exact,
//       also against bf16 weights: the contract) and bf16 x against f32 weights (noted by note_slow_path).
//   conv2d_mma_kernel<KS> (v2, bf16 x and bf16 weights, any shape) mma.m16n8k16 bf16 -> f32. Block tile 128
//       channels x 128 pixels, K step 32, 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 4 accumulators (the
//       warp step of mma_tile.cuh). The 1-D grid runs the O tiles of one pixel tile next to each other (x is read once
//       from DRAM, then from L2). 3 stages of A [128 o][32 k] and B [32 k][128 n] bf16: smem 3 * 2 * 8 KiB =
//       48 KiB (no opt-in), 128 registers for 3x3 (2 blocks / SM), ~165 for 1x1 (1 block), no spills.
//       A: cp.async 16 B when K % 8 == 0 and the weights are 16-byte aligned (zero-fill past O and K), else each
//       16-byte chunk is assembled from scalar loads (the 3-channel stem); rows XOR-swizzled in 16-byte chunks
//       by (row >> 1) & 3, read by ldmatrix.x4. B: thread t owns pixel column t % 128 (decoded once, with a
//       bitmask of which of the k*k taps fall inside the image) and rows t / 128 + 2j: a warp reads 32
//       consecutive pixels of one (channel, tap) row, coalesced, any alignment, zero at the borders and past K/N.
//       Its 16 values are loaded into registers one tile ahead (in flight during the products of the tile
//       before) and stored to the [k][n] tile, 256-byte rows swizzled by chunk ^ (k & 7) so that the 8 k rows of
//       each ldmatrix.x4.trans phase hit 8 distinct bank groups; .trans turns [k][n] into the "col" B fragment.
//       Epilogue: bias, bf16 rounding, pixel pairs of one plane at a 4-byte boundary stored as one word.
//       Next steps: a row-halo B tile (the 9 taps of a channel from one smem load; the gather is the limit),
//       smem-staged 16-byte output stores.
//   Race freedom of v2: iteration kt waits for its own A group (one group committed per tile, empty past the
//   end: wait_group 1 leaves only tile kt + 1's in flight), then __syncthreads publishes tile kt (A copies,
//   B stores of iteration kt - 1) and ends every warp's reads of tile kt - 1. After it, A of tile kt + 2 goes to
//   stage (kt + 2) % 3 = (kt - 1) % 3, and after the products B of tile kt + 1 goes to stage (kt + 1) % 3 =
//   (kt - 2) % 3: both last read before that barrier, and neither is the stage kt being read.
#include <type_traits>

#include "element.cuh"
#include "mma_tile.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, kConvThreads = 256, kAPad = 4;

struct ConvParams {
  const void* x;
  const void* weight;
  const void* bias;
  void* out;
  int in_channels, out_channels, height, width;
  int64_t pixels;  // B*H*W
};

template <int KS, typename TX, typename TW>
__global__ void __launch_bounds__(kConvThreads) conv2d_simt_kernel(const ConvParams p) {
  constexpr int P = (KS - 1) / 2;
  SKV_DYNAMIC_SMEM(smem_raw);
  float* sA = reinterpret_cast<float*>(smem_raw);  // [BK][BM + kAPad]: weights, k-major
  float* sB = sA + BK * (BM + kAPad);               // [BK][BN]: im2col tile
  const TX* x = static_cast<const TX*>(p.x);
  const TW* w = static_cast<const TW*>(p.weight);
  const int K = p.in_channels * KS * KS;
  const int64_t hw = int64_t(p.height) * p.width;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int o0 = blockIdx.y * BM;
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;

  // Thread tid loads the B elements e = tid + j*256: rows kk = e / BN, always column tid % BN. That column's
  // pixel is the same at every K step, so it is decoded once.
  const int load_col = tid % BN;
  const int64_t n = n0 + load_col;
  const bool n_ok = n < p.pixels;
  const int64_t nb = n_ok ? n / hw : 0, yx = n_ok ? n % hw : 0;
  const int py = static_cast<int>(yx / p.width), px = static_cast<int>(yx % p.width);
  const TX* xb = x + nb * p.in_channels * hw;

  float acc[4][4] = {};
  for (int k0 = 0; k0 < K; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kConvThreads) {
      const int mm = e / BK, kk = e % BK;
      const int o = o0 + mm, k = k0 + kk;
      sA[kk * (BM + kAPad) + mm] = (o < p.out_channels && k < K) ? to_f32(w[static_cast<int64_t>(o) * K + k]) : 0.0f;
    }
    for (int e = tid; e < BK * BN; e += kConvThreads) {
      const int kk = e / BN, k = k0 + kk;
      float v = 0.0f;
      if (n_ok && k < K) {
        const int i = k / (KS * KS), r = k % (KS * KS);
        const int yy = py + r / KS - P, xx = px + r % KS - P;
        if (yy >= 0 && yy < p.height && xx >= 0 && xx < p.width) v = to_f32(xb[i * hw + int64_t(yy) * p.width + xx]);
      }
      sB[kk * BN + load_col] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sA[kk * (BM + kAPad) + ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = sB[kk * BN + tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();  // the tiles are overwritten by the next K step
  }

  const TW* bias = static_cast<const TW*>(p.bias);
  TX* out = static_cast<TX*>(p.out);
  for (int i = 0; i < 4; ++i) {
    const int o = o0 + ty * 4 + i;
    if (o >= p.out_channels) break;
    const float bo = bias ? to_f32(bias[o]) : 0.0f;
    for (int j = 0; j < 4; ++j) {
      const int64_t nj = n0 + tx * 4 + j;
      if (nj >= p.pixels) break;
      const int64_t b = nj / hw, pix = nj % hw;
      out[(b * p.out_channels + o) * hw + pix] = from_f32<TX>(acc[i][j] + bo);
    }
  }
}

template <int KS, typename TX, typename TW>
void launch_simt(const ConvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.pixels + BN - 1) / BN), static_cast<unsigned>((p.out_channels + BM - 1) / BM));
  const size_t smem = (BK * (BM + kAPad) + BK * BN) * sizeof(float);
  skv::declare_simt_flops(2.0 * p.pixels * p.out_channels * p.in_channels * KS * KS);
  SKV_LAUNCH((conv2d_simt_kernel<KS, TX, TW>), grid, dim3(kConvThreads), smem, stream, p);
}

// ---------------------------------------------------------------------------------------------------------
// bf16 tensor cores

constexpr int kMM = 128, kMN = 128, kMK = 32, kStages = 3, kMmaThreads = 256;
constexpr int kTileElems = kMM * kMK;  // A and B tiles are both 128 x 32 bf16 (8 KiB)
static_assert(kMM * kMK == kMK * kMN, "one stage stride serves both tiles");

// A tile [128 rows = out channels][32 k]: mma_tile's swizzled layout.
using mma_tile::swz;
static_assert(kMK == mma_tile::kK, "tiles of the shared warp step");
// B tile [32 k][128 pixels], 256-byte rows, chunks XOR-swizzled by row & 7.
__device__ __forceinline__ int swz_b(int k, int chunk) { return k * kMN + ((chunk ^ (k & 7)) << 3); }

// Weights [O][K] rows o0.. x columns k0..k0+31 into stage `s`. With K % 8 == 0 and 16-byte aligned weights
// every chunk is a cp.async (zero-filled past O or K); otherwise each chunk is gathered element by element.
__device__ __forceinline__ void load_a(const ConvParams& p, int K, bool a_async, int o0, int k0, uint16_t* s) {
  const uint16_t* w = static_cast<const uint16_t*>(p.weight);
  for (int e = threadIdx.x; e < kMM * (kMK / 8); e += kMmaThreads) {
    const int row = e >> 2, chunk = e & 3;
    const int o = o0 + row, k = k0 + chunk * 8;
    const uint16_t* src = w + static_cast<int64_t>(o) * K + k;
    if (a_async) {
      const bool inside = o < p.out_channels && k < K;
      skv::cp_async_16(s + swz(row, chunk), inside ? src : w, inside ? 16 : 0);
    } else {
      uint32_t v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t lo = o < p.out_channels && k + 2 * j < K ? src[2 * j] : 0;
        const uint32_t hi = o < p.out_channels && k + 2 * j + 1 < K ? src[2 * j + 1] : 0;
        v[j] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(s + swz(row, chunk)) = make_uint4(v[0], v[1], v[2], v[3]);
    }
  }
}

// The B (im2col) elements of one thread: its pixel column is fixed, its rows are k0 + krow + 2j.
template <int KS>
struct Gather {
  static constexpr int kRows = kMK * kMN / kMmaThreads;  // 16
  const uint16_t* center;  // x[b, 0, py, px]
  unsigned valid;          // bit ky*KS + kx: tap (ky, kx) lies inside the image (0 for a pixel past the end)
  int krow, col;

  __device__ __forceinline__ void init(const ConvParams& p, int64_t n0) {
    constexpr int P = (KS - 1) / 2;
    col = threadIdx.x % kMN;
    krow = threadIdx.x / kMN;
    const int64_t hw = int64_t(p.height) * p.width, n = n0 + col;
    const bool n_ok = n < p.pixels;
    const int64_t b = n_ok ? n / hw : 0, yx = n_ok ? n % hw : 0;
    const int py = static_cast<int>(yx / p.width), px = static_cast<int>(yx % p.width);
    center = static_cast<const uint16_t*>(p.x) + (b * p.in_channels * hw + yx);
    valid = 0;
    for (int ky = 0; ky < KS; ++ky)
      for (int kx = 0; kx < KS; ++kx) {
        const int yy = py + ky - P, xx = px + kx - P;
        if (n_ok && yy >= 0 && yy < p.height && xx >= 0 && xx < p.width) valid |= 1u << (ky * KS + kx);
      }
  }
  // Issues the global loads of tile k0 (consumed by store(), one tile later), two rows to a register.
  __device__ __forceinline__ void load(const ConvParams& p, int K, int k0, uint32_t (&v)[kRows / 2]) const {
    constexpr int P = (KS - 1) / 2;
    const int64_t hw = int64_t(p.height) * p.width;
    const int kfirst = k0 + krow;
    const uint16_t* plane = center + kfirst / (KS * KS) * hw;  // channel of row kfirst
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int k = kfirst + 2 * j;
      const int i = k / (KS * KS) - kfirst / (KS * KS), r = k % (KS * KS);
      const int off = (r / KS - P) * p.width + (r % KS - P);
      const uint32_t e = k < K && (valid >> r & 1u) ? plane[i * hw + off] : uint16_t(0);
      if (j % 2 == 0) v[j / 2] = e;
      else v[j / 2] |= e << 16;
    }
  }
  __device__ __forceinline__ void store(const uint32_t (&v)[kRows / 2], uint16_t* s) const {
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int k = krow + 2 * j;
      s[swz_b(k, col >> 3) + (col & 7)] = static_cast<uint16_t>(v[j / 2] >> (16 * (j % 2)));
    }
  }
};

template <int KS>
__global__ void __launch_bounds__(kMmaThreads, KS == 3 ? 2 : 1) conv2d_mma_kernel(const ConvParams p, const bool a_async, const int o_tiles) {
  SKV_DYNAMIC_SMEM(smem_raw);
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem_raw);  // [kStages][128][32]
  uint16_t* sB = sA + kStages * kTileElems;               // [kStages][32][128]
  const int K = p.in_channels * KS * KS;
  const int o0 = static_cast<int>(blockIdx.x % o_tiles) * kMM;  // the O tiles of one pixel tile are neighbours
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / o_tiles) * kMN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // the warp's tile: out channels wm*64.., pixels wn*32..
  const int g = lane >> 2, t = lane & 3, mi = lane >> 3, lr = lane & 7;

  Gather<KS> gather;
  gather.init(p, n0);
  uint32_t bv[Gather<KS>::kRows / 2];

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

  // Prologue: tile 0 complete in stage 0 (A in flight), A of tile 1 in flight, B of tile 1 in registers.
  const int n_tiles = (K + kMK - 1) / kMK;
  load_a(p, K, a_async, o0, 0, sA);
  gather.load(p, K, 0, bv);
  gather.store(bv, sB);
  skv::cp_async_commit();
  if (n_tiles > 1) {
    load_a(p, K, a_async, o0, kMK, sA + kTileElems);
    gather.load(p, K, kMK, bv);
  }
  skv::cp_async_commit();

  for (int kt = 0; kt < n_tiles; ++kt) {
    // One group is committed per tile (empty past the end), so all but the newest means A of tile kt.
    skv::cp_async_wait<1>();
    __syncthreads();  // publishes tile kt (A copies, B stores); every warp is done with tile kt - 1
    if (kt + 2 < n_tiles) load_a(p, K, a_async, o0, (kt + 2) * kMK, sA + (kt + 2) % kStages * kTileElems);
    skv::cp_async_commit();

    const uint16_t* a_s = sA + kt % kStages * kTileElems;
    const uint16_t* b_s = sB + kt % kStages * kTileElems;
    // B [k][n] through .trans: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) are
    // b[0], b[1] of n-block 2*nb2 and b[0], b[1] of n-block 2*nb2 + 1.
    mma_tile::tile_products(acc, a_s, wm * 64, [&](uint32_t bfr[4], int kk, int nb2) {
      skv::ldmatrix_x4_trans(bfr, b_s + swz_b(kk * 16 + (mi & 1) * 8 + lr, wn * 4 + nb2 * 2 + (mi >> 1)));
    });

    // B of tile kt + 1 into its stage, last read in iteration kt - 2 (before this iteration's barrier), then the
    // loads of tile kt + 2, in flight during the next iteration's products.
    if (kt + 1 < n_tiles) gather.store(bv, sB + (kt + 1) % kStages * kTileElems);
    if (kt + 2 < n_tiles) gather.load(p, K, (kt + 2) * kMK, bv);
  }

  // Accumulator (mt, nt): [0..1] = (channel g, pixels 2t, 2t+1), [2..3] = (channel g + 8, same pixels). Pixel
  // n + 1 is the next element of n's channel plane, or the first of the next image's (n is even, so never both
  // of a pair past the end); a pair in one plane at a 4-byte boundary is one store.
  const int64_t hw = int64_t(p.height) * p.width;
  const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
  bf16* out = static_cast<bf16*>(p.out);
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int64_t n = n0 + wn * 32 + nt * 8 + 2 * t;
    if (n >= p.pixels) continue;
    const int64_t b = n / hw, pix = n - b * hw;
    const bool pair = pix + 1 < hw, second = n + 1 < p.pixels;
    bf16* dst0 = out + b * p.out_channels * hw + pix;                        // channel 0 of pixel n
    bf16* dst1 = pair ? dst0 + 1 : out + (b + 1) * p.out_channels * hw;  // channel 0 of pixel n + 1
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int o = o0 + wm * 64 + mt * 16 + g + 8 * h;
        if (o >= p.out_channels) continue;
        const float bo = bias ? __uint_as_float(uint32_t(bias[o]) << 16) : 0.0f;
        const float v0 = acc[mt][nt][2 * h] + bo, v1 = acc[mt][nt][2 * h + 1] + bo;
        bf16* d0 = dst0 + o * hw;
        if (pair && reinterpret_cast<uintptr_t>(d0) % 4 == 0) {
          *reinterpret_cast<uint32_t*>(d0) = skv::pack_bf16x2(v0, v1);
        } else {
          *d0 = __float2bfloat16_rn(v0);
          if (second) dst1[o * hw] = __float2bfloat16_rn(v1);
        }
      }
  }
}

template <int KS>
void launch_mma(const ConvParams& p, cudaStream_t stream) {
  const int K = p.in_channels * KS * KS;
  const bool a_async = K % 8 == 0 && reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
  const int64_t o_tiles = (p.out_channels + kMM - 1) / kMM, blocks = o_tiles * ((p.pixels + kMN - 1) / kMN);
  if (blocks > INT32_MAX)
    throw BackendError(StatusCode::internal, "conv2d: " + std::to_string(p.pixels) + " pixels exceed the grid limit");
  const size_t smem = 2 * kStages * kTileElems * sizeof(uint16_t);  // 48 KiB: no opt-in needed
  SKV_LAUNCH(conv2d_mma_kernel<KS>, dim3(static_cast<unsigned>(blocks)), dim3(kMmaThreads), smem, stream, p, a_async,
             static_cast<int>(o_tiles));
}

}  // namespace

void conv2d(const Conv2dArgs& a, cudaStream_t stream) {
  ConvParams p{a.x, a.weight, a.bias, a.out, a.in_channels, a.out_channels, a.height, a.width,
               int64_t(a.batch) * a.height * a.width};
  if (p.pixels == 0 || a.out_channels == 0) return;
  if (a.kernel != 1 && a.kernel != 3)
    throw BackendError(StatusCode::internal, "conv2d: kernel size " + std::to_string(a.kernel) + " (1 or 3 only)");
  if (a.dtype == DType::bf16 && a.weight_dtype == DType::bf16) {
    if (a.kernel == 3) launch_mma<3>(p, stream);
    else launch_mma<1>(p, stream);
  } else {
    // f32 x stays exact against bf16 weights (the contract), so only bf16 x with bf16 weights has tensor cores.
    if (a.dtype != a.weight_dtype)
      note_slow_path("conv2d", a.dtype == DType::bf16 ? "bf16 activations with f32 weights: SIMT f32"
                                                      : "f32 activations with bf16 weights: SIMT f32 (exact x)");
    elem::dispatch_float(a.dtype, "conv2d", [&](auto xtag) {
      using TX = decltype(xtag);
      elem::dispatch_float(a.weight_dtype, "conv2d", [&](auto wtag) {
        using TW = decltype(wtag);
        if constexpr (!(std::is_same_v<TX, bf16> && std::is_same_v<TW, bf16>)) {  // bf16 pairs took the mma path
          if (a.kernel == 3) launch_simt<3, TX, TW>(p, stream);
          else launch_simt<1, TX, TW>(p, stream);
        }
      });
    });
  }
  elem::check_launch("conv2d");
}

}  // namespace scalekv::cuda_ops
