// conv2d: out[b,o,y,x] = bias[o] + sum_{i,ky,kx} w[o,i,ky,kx] * x[b,i,y+ky-p,x+kx-p], NCHW, k = 1 or 3, stride 1,
// zero padding p = (k-1)/2, f32 accumulation. FLOPs: 2*B*O*I*k*k*H*W; bytes: x*(O/BM) + w*(B*H*W/BN) + out.
//
// An implicit GEMM: M = O output channels, N = B*H*W pixels, K = I*k*k, A = weight [O][K] (row-major as
// stored), B = the im2col matrix [K][N], never materialised: each tile of it is gathered from x with zero
// padding as it is loaded.
//
// Versions:
//   conv2d_simt_kernel<KS,TX,TW> (v1, the default) f32 FMA on 64x64 output tiles, K step 16, 256 threads each
//       computing a 4x4 block (4 channels x 4 pixels). Tiles of A and B are converted to f32 into shared memory
//       (A transposed to [16][64+4], padded against bank conflicts on the store), so every dtype pair shares
//       one path. Single buffered.
//   A bf16 mma.sync version is the next step for the VAE at 1024^2 (~10 TFLOP); not written yet.
#include "element.cuh"
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
void launch(const ConvParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.pixels + BN - 1) / BN), static_cast<unsigned>((p.out_channels + BM - 1) / BM));
  const size_t smem = (BK * (BM + kAPad) + BK * BN) * sizeof(float);
  SKV_LAUNCH((conv2d_simt_kernel<KS, TX, TW>), grid, dim3(kConvThreads), smem, stream, p);
}

}  // namespace

void conv2d(const Conv2dArgs& a, cudaStream_t stream) {
  ConvParams p{a.x, a.weight, a.bias, a.out, a.in_channels, a.out_channels, a.height, a.width,
               int64_t(a.batch) * a.height * a.width};
  if (p.pixels == 0 || a.out_channels == 0) return;
  if (a.kernel != 1 && a.kernel != 3)
    throw BackendError(StatusCode::internal, "conv2d: kernel size " + std::to_string(a.kernel) + " (1 or 3 only)");
  elem::dispatch_float(a.dtype, "conv2d", [&](auto xtag) {
    using TX = decltype(xtag);
    elem::dispatch_float(a.weight_dtype, "conv2d", [&](auto wtag) {
      using TW = decltype(wtag);
      if (a.kernel == 3) launch<3, TX, TW>(p, stream);
      else launch<1, TX, TW>(p, stream);
    });
  });
  elem::check_launch("conv2d");
}

}  // namespace scalekv::cuda_ops
