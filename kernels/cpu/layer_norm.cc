// LayerNorm over the channel dim on the CPU, with the AdaLN modulation or an affine weight/bias. One row per
// iteration: load as f32, mean, then the variance of the centred values (two passes, in f32 as
// F.layer_norm's f32 kernel is exact enough for; vector partial sums), then normalise, modulate and store.
// The row loop is compiled per instruction-set level (isa.h).
// Cost: ~8*rows*C FLOP, reads rows*C elements once, writes them once.
#include <cmath>
#include <vector>

#include "isa.h"
#include "tensor_view.h"
#include "transformer_ops.h"
#include "vector_math.h"

namespace scalekv::cpu {
namespace {

SKV_ALWAYS_INLINE void rows_impl(const LayerNormArgs& a, int64_t begin, int64_t end, float* v) {
  const int C = a.channels;
  for (int64_t r = begin; r < end; ++r) {
    load_row_f32(a.x, a.x_dtype, r, C, v);
    const float mean = sum_lanes(v, C) / float(C);
    const float rstd = 1.0f / std::sqrt(sum_sq_lanes(v, C, mean) / float(C) + a.eps);
    for (int c = 0; c < C; ++c) v[c] = (v[c] - mean) * rstd;
    if (a.mode == NormMode::modulate) {
      const int64_t b = r / a.tokens;
      const float* scale = a.scale + b * a.scale_stride;
      const float* shift = a.shift + b * a.shift_stride;
      for (int c = 0; c < C; ++c) v[c] = v[c] * (1.0f + scale[c]) + shift[c];
    } else if (a.mode == NormMode::affine) {
      for (int c = 0; c < C; ++c) v[c] = v[c] * a.weight[c] + a.bias[c];
    }
    store_row_f32(a.y, a.y_dtype, r, C, v);
  }
}

SKV_TARGET_AVX512 void rows_avx512(const LayerNormArgs& a, int64_t begin, int64_t end, float* v) { rows_impl(a, begin, end, v); }
SKV_TARGET_AVX2 void rows_avx2(const LayerNormArgs& a, int64_t begin, int64_t end, float* v) { rows_impl(a, begin, end, v); }
void rows_generic(const LayerNormArgs& a, int64_t begin, int64_t end, float* v) { rows_impl(a, begin, end, v); }

}  // namespace

void layer_norm(ThreadPool& pool, const LayerNormArgs& a) {
  const int64_t rows = int64_t(a.batch) * a.tokens;
  const auto run = for_isa(rows_avx512, rows_avx2, rows_generic);
  pool.parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(a.channels);
    run(a, begin, end, v.data());
  });
}

}  // namespace scalekv::cpu
