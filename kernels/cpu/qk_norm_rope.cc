// Self-attention operand preparation on the CPU: per (b, l, h), split q/k/v out of the fused projection, add
// the biases, L2-normalise q and k (F.normalize) and scale q by exp(min(scale_mul, ln 100)), rotate q and k
// by the 2-D RoPE of the token's (y, x) grid position, and write q to [B,H,L,c] and k/v into the cache
// [B,H,cap,c] at kv_offset. The rotation follows apply_rotary_emb: angle tables in f32 (inv_freq as torch
// computes it), x0' = x0 cos - x1 sin, x1' = x1 cos + x0 sin. Cost: ~12*B*L*H*c FLOP + B*L*c/2 sin/cos.
#include <algorithm>
#include <cmath>
#include <vector>

#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {
namespace {

void normalize(float* x, int c, float mul) {
  float sq = 0.0f;
  for (int d = 0; d < c; ++d) sq += x[d] * x[d];
  const float denom = std::max(std::sqrt(sq), 1e-12f);
  for (int d = 0; d < c; ++d) x[d] = x[d] / denom * mul;
}

void rotate(float* x, const float* cos_t, const float* sin_t, int pairs) {
  for (int p = 0; p < pairs; ++p) {
    const float x0 = x[2 * p], x1 = x[2 * p + 1];
    x[2 * p] = x0 * cos_t[p] - x1 * sin_t[p];
    x[2 * p + 1] = x1 * cos_t[p] + x0 * sin_t[p];
  }
}

}  // namespace

void qk_norm_rope(ThreadPool& pool, const QkNormRopeArgs& a) {
  const int H = a.heads, c = a.head_dim, L = a.tokens, pairs = c / 2, quarter = c / 4;
  std::vector<float> inv_freq(quarter);
  for (int i = 0; i < quarter; ++i)
    inv_freq[i] = 1.0f / std::pow(10000.0f, float(2 * i) / float(pairs));
  std::vector<float> q_mul(H, 1.0f);
  if (a.scale_mul) {
    for (int h = 0; h < H; ++h) q_mul[h] = std::exp(std::min(a.scale_mul[h], std::log(100.0f)));
  }
  pool.parallel_for(int64_t(a.batch) * L, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> q(c), k(c), v(c), cos_t(pairs), sin_t(pairs);
    for (int64_t bl = begin; bl < end; ++bl) {
      const int64_t b = bl / L;
      const int l = int(bl % L);
      if (a.positions) {
        const float y = float(a.positions[2 * l]), x = float(a.positions[2 * l + 1]);
        for (int p = 0; p < pairs; ++p) {
          const float theta = (p < quarter ? y : x) * inv_freq[p % quarter];
          cos_t[p] = std::cos(theta);
          sin_t[p] = std::sin(theta);
        }
      }
      for (int h = 0; h < H; ++h) {
        const int64_t src = (bl * 3) * H + h;  // row index of q in [B*L*3*H, c]
        load_row_f32(a.qkv, a.qkv_dtype, src, c, q.data());
        if (a.q_bias) for (int d = 0; d < c; ++d) q[d] += a.q_bias[h * c + d];
        if (a.normalize) normalize(q.data(), c, q_mul[h]);
        if (a.positions) rotate(q.data(), cos_t.data(), sin_t.data(), pairs);
        const int64_t bh = b * H + h;
        store_row_f32(a.q, a.q_dtype, bh * L + l, c, q.data());
        if (!a.k) continue;
        load_row_f32(a.qkv, a.qkv_dtype, src + H, c, k.data());
        load_row_f32(a.qkv, a.qkv_dtype, src + 2 * H, c, v.data());
        if (a.v_bias) for (int d = 0; d < c; ++d) v[d] += a.v_bias[h * c + d];
        if (a.normalize) normalize(k.data(), c, 1.0f);
        if (a.positions) rotate(k.data(), cos_t.data(), sin_t.data(), pairs);
        store_row_f32(a.k, a.kv_dtype, bh * a.kv_cap + a.kv_offset + l, c, k.data());
        store_row_f32(a.v, a.kv_dtype, bh * a.kv_cap + a.kv_offset + l, c, v.data());
      }
    }
  });
}

}  // namespace scalekv::cpu
