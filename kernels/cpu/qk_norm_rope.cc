// Self-attention operand preparation on the CPU: per (b, l, h), split q/k/v out of the fused projection, add
// the biases, L2-normalise q and k (F.normalize) and scale q by exp(min(scale_mul, ln 100)), rotate q and k
// by the 2-D RoPE of the token's (y, x) grid position, and write q to [B,H,L,c] and k/v into the cache
// [B,H,cap,c] at kv_offset. The rotation follows apply_rotary_emb: angle tables in f32 (inv_freq as torch
// computes it), x0' = x0 cos - x1 sin, x1' = x1 cos + x0 sin. Cost: ~12*B*L*H*c FLOP; sin/cos once per distinct
// row or column position of the scale.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "tensor_view.h"
#include "transformer_ops.h"
#include "vector_math.h"

namespace scalekv::cpu {
namespace {

void normalize(float* x, int c, float mul) {
  const float denom = std::max(std::sqrt(sum_sq_lanes(x, c, 0.0f)), 1e-12f);
  for (int d = 0; d < c; ++d) x[d] = x[d] / denom * mul;
}

// Pairs [0, quarter) rotate by the angles of cos_t[0] / sin_t[0] (the row), pairs [quarter, 2 quarter) by those
// of cos_t[1] / sin_t[1] (the column).
void rotate(float* x, const float* const cos_t[2], const float* const sin_t[2], int quarter) {
  for (int half = 0; half < 2; ++half)
    for (int i = 0; i < quarter; ++i) {
      const int p = half * quarter + i;
      const float x0 = x[2 * p], x1 = x[2 * p + 1];
      x[2 * p] = x0 * cos_t[half][i] - x1 * sin_t[half][i];
      x[2 * p + 1] = x1 * cos_t[half][i] + x0 * sin_t[half][i];
    }
}

// cos and sin of value * inv_freq[i] for every distinct value one coordinate (y or x) takes: a scale has at most
// a few dozen rows and columns, so this replaces two libm calls per pair and token with a lookup (same bits).
struct AngleTable {
  std::vector<int32_t> values;  // sorted, distinct
  std::vector<float> cos_t, sin_t;  // [values][quarter]
  AngleTable(const int32_t* positions, int tokens, int coord, const std::vector<float>& inv_freq) {
    const int quarter = int(inv_freq.size());
    for (int l = 0; l < tokens; ++l) values.push_back(positions[2 * l + coord]);
    std::sort(values.begin(), values.end());
    values.erase(std::unique(values.begin(), values.end()), values.end());
    cos_t.resize(values.size() * quarter);
    sin_t.resize(values.size() * quarter);
    for (size_t v = 0; v < values.size(); ++v)
      for (int i = 0; i < quarter; ++i) {
        const float theta = float(values[v]) * inv_freq[i];
        cos_t[v * quarter + i] = std::cos(theta);
        sin_t[v * quarter + i] = std::sin(theta);
      }
  }
  size_t row(int32_t value) const { return size_t(std::lower_bound(values.begin(), values.end(), value) - values.begin()); }
};

}  // namespace

void qk_norm_rope(ThreadPool& pool, const QkNormRopeArgs& a) {
  const int H = a.heads, c = a.head_dim, L = a.tokens, pairs = c / 2, quarter = c / 4;
  if (a.k) check_kv_pages(a.kv_pages, a.batch, a.kv_offset, a.kv_offset + L, "qkNormRope");
  std::vector<float> inv_freq(quarter);
  for (int i = 0; i < quarter; ++i)
    inv_freq[i] = 1.0f / std::pow(10000.0f, float(2 * i) / float(pairs));
  std::vector<float> q_mul(H, 1.0f);
  if (a.scale_mul) {
    for (int h = 0; h < H; ++h) q_mul[h] = std::exp(std::min(a.scale_mul[h], std::log(100.0f)));
  }
  std::vector<AngleTable> angles;  // y, x
  if (a.positions)
    for (int coord = 0; coord < 2; ++coord) angles.emplace_back(a.positions, L, coord, inv_freq);
  pool.parallel_for(int64_t(a.batch) * L, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> q(c), k(c), v(c);
    const float* cos_t[2] = {};
    const float* sin_t[2] = {};
    for (int64_t bl = begin; bl < end; ++bl) {
      const int64_t b = bl / L;
      const int l = int(bl % L);
      if (a.positions) {
        for (int coord = 0; coord < 2; ++coord) {  // y, then x
          const AngleTable& t = angles[coord];
          const size_t at = t.row(a.positions[2 * l + coord]) * quarter;
          cos_t[coord] = t.cos_t.data() + at;
          sin_t[coord] = t.sin_t.data() + at;
        }
      }
      for (int h = 0; h < H; ++h) {
        const int64_t src = (bl * 3) * H + h;  // row index of q in [B*L*3*H, c]
        load_row_f32(a.qkv, a.qkv_dtype, src, c, q.data());
        if (a.q_bias) for (int d = 0; d < c; ++d) q[d] += a.q_bias[h * c + d];
        if (a.normalize) normalize(q.data(), c, q_mul[h]);
        if (a.positions) rotate(q.data(), cos_t, sin_t, quarter);
        const int64_t bh = b * H + h;
        store_row_f32(a.q, a.q_dtype, bh * L + l, c, q.data());
        if (!a.k) continue;
        load_row_f32(a.qkv, a.qkv_dtype, src + H, c, k.data());
        load_row_f32(a.qkv, a.qkv_dtype, src + 2 * H, c, v.data());
        if (a.v_bias) for (int d = 0; d < c; ++d) v[d] += a.v_bias[h * c + d];
        if (a.normalize) normalize(k.data(), c, 1.0f);
        if (a.positions) rotate(k.data(), cos_t, sin_t, quarter);
        const int64_t kv_row = kv_page_row(a.kv_pages, H, int(b), h, a.kv_offset + l);
        if (a.kv_format == KvFormat::plain) {
          store_row_f32(a.k, a.kv_dtype, kv_row, c, k.data());
          store_row_f32(a.v, a.kv_dtype, kv_row, c, v.data());
        } else {
          store_quant_token(a.k, a.v, a.scales, a.kv_format, kv_row, c, k.data(), v.data());
        }
      }
    }
  });
}

}  // namespace scalekv::cpu
