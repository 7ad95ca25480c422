// conv2d on the CPU: direct convolution, no im2col. NCHW x [B,I,H,W], weight [O,I,k,k], k = 1 or 3, stride 1,
// zero padding (k-1)/2. FLOPs: 2*B*O*I*k*k*H*W; bytes: x + weight + out (+ staging, below).
//
// One task = (batch b, a block of kTaskChannels output channels, output row y). The task stages the k input
// rows it needs, for every input channel, as f32 with a zero halo (no bounds checks in the inner loop, and
// bf16 is converted once). It then computes register tiles of kOutTile channels x kXTile columns, summing over
// (i, ky, kx) with weights repacked as [O/kOutTile][I][k][k][kOutTile] so each step reads kOutTile adjacent
// weights and kXTile adjacent inputs: the fixed-size inner loops vectorise. The staged rows of one column
// tile across all input channels (I*k*(kXTile+k-1) floats) stay in cache while the channel tiles sweep them.
#include <algorithm>
#include <vector>

#include "element.h"
#include "ops.h"

namespace scalekv::cpu {
namespace {

constexpr int kOutTile = 4;        // output channels per register tile
constexpr int kXTile = 8;          // output columns per register tile
constexpr int kTaskChannels = 16;  // output channels per task (a multiple of kOutTile)

template <int K>
void conv_row(const Conv2dArgs& a, const float* wpack, const float* bias, int b, int o_begin, int o_end, int y,
              std::vector<float>& rows) {
  constexpr int P = (K - 1) / 2;
  const int I = a.in_channels, H = a.height, W = a.width;
  const int row_len = (W + kXTile - 1) / kXTile * kXTile + K - 1;
  rows.assign(size_t(I) * K * row_len, 0.0f);
  for (int i = 0; i < I; ++i) {
    for (int ky = 0; ky < K; ++ky) {
      const int yy = y + ky - P;
      if (yy < 0 || yy >= H) continue;
      float* dst = rows.data() + (size_t(i) * K + ky) * row_len + P;
      const int64_t src = ((int64_t(b) * I + i) * H + yy) * W;
      for (int x = 0; x < W; ++x) dst[x] = load_f32(a.x, a.dtype, src + x);
    }
  }
  for (int o0 = o_begin; o0 < o_end; o0 += kOutTile) {
    const float* wtile = wpack + size_t(o0 / kOutTile) * I * K * K * kOutTile;
    for (int x0 = 0; x0 < W; x0 += kXTile) {
      float acc[kOutTile][kXTile];
      for (int o = 0; o < kOutTile; ++o)
        for (int xx = 0; xx < kXTile; ++xx) acc[o][xx] = bias[o0 + o];
      const float* w = wtile;
      for (int i = 0; i < I; ++i) {
        for (int ky = 0; ky < K; ++ky) {
          const float* in = rows.data() + (size_t(i) * K + ky) * row_len + x0;
          for (int kx = 0; kx < K; ++kx, w += kOutTile) {
            float v[kXTile];
            for (int xx = 0; xx < kXTile; ++xx) v[xx] = in[kx + xx];
            for (int o = 0; o < kOutTile; ++o)
              for (int xx = 0; xx < kXTile; ++xx) acc[o][xx] += w[o] * v[xx];
          }
        }
      }
      const int n_o = std::min(kOutTile, a.out_channels - o0), n_x = std::min(kXTile, W - x0);
      for (int o = 0; o < n_o; ++o) {
        const int64_t dst = ((int64_t(b) * a.out_channels + o0 + o) * H + y) * W + x0;
        for (int xx = 0; xx < n_x; ++xx) store_f32(a.out, a.dtype, dst + xx, acc[o][xx]);
      }
    }
  }
}

}  // namespace

void conv2d(ThreadPool& pool, const Conv2dArgs& a) {
  const int O = a.out_channels, I = a.in_channels, KK = a.kernel * a.kernel;
  const int o_tiles = (O + kOutTile - 1) / kOutTile;
  // Weights repacked per output tile, padded with zero channels to a whole tile.
  std::vector<float> wpack(size_t(o_tiles) * I * KK * kOutTile, 0.0f);
  for (int o = 0; o < O; ++o)
    for (int i = 0; i < I; ++i)
      for (int k = 0; k < KK; ++k)
        wpack[((size_t(o / kOutTile) * I + i) * KK + k) * kOutTile + o % kOutTile] =
            load_f32(a.weight, a.weight_dtype, (int64_t(o) * I + i) * KK + k);
  std::vector<float> bias(size_t(o_tiles) * kOutTile, 0.0f);
  if (a.bias)
    for (int o = 0; o < O; ++o) bias[o] = load_f32(a.bias, a.weight_dtype, o);

  const int channel_blocks = (O + kTaskChannels - 1) / kTaskChannels;
  const int64_t tasks = int64_t(a.batch) * channel_blocks * a.height;
  pool.parallel_for(tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows;
    for (int64_t t = begin; t < end; ++t) {
      const int y = static_cast<int>(t % a.height);
      const int blk = static_cast<int>((t / a.height) % channel_blocks);
      const int b = static_cast<int>(t / (int64_t(a.height) * channel_blocks));
      const int o_begin = blk * kTaskChannels, o_end = std::min(O, o_begin + kTaskChannels);
      if (a.kernel == 3) conv_row<3>(a, wpack.data(), bias.data(), b, o_begin, o_end, y, rows);
      else conv_row<1>(a, wpack.data(), bias.data(), b, o_begin, o_end, y, rows);
    }
  });
}

}  // namespace scalekv::cpu
