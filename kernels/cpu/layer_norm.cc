// LayerNorm over the channel dim on the CPU, with the AdaLN modulation or an affine weight/bias. One row per
// iteration: load as f32, mean, then the variance of the centred values (two passes, in f32 as
// F.layer_norm's f32 kernel is exact enough for), then normalise, modulate and store.
// Cost: ~8*rows*C FLOP, reads rows*C elements once, writes them once.
#include <cmath>
#include <vector>

#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {

void layer_norm(ThreadPool& pool, const LayerNormArgs& a) {
  const int C = a.channels;
  const int64_t rows = int64_t(a.batch) * a.tokens;
  pool.parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(C);
    for (int64_t r = begin; r < end; ++r) {
      load_row_f32(a.x, a.x_dtype, r, C, v.data());
      float sum = 0.0f;
      for (int c = 0; c < C; ++c) sum += v[c];
      const float mean = sum / float(C);
      float sq = 0.0f;
      for (int c = 0; c < C; ++c) {
        const float d = v[c] - mean;
        sq += d * d;
      }
      const float rstd = 1.0f / std::sqrt(sq / float(C) + a.eps);
      for (int c = 0; c < C; ++c) v[c] = (v[c] - mean) * rstd;
      if (a.mode == NormMode::modulate) {
        const int64_t b = r / a.tokens;
        const float* scale = a.scale + b * a.scale_stride;
        const float* shift = a.shift + b * a.shift_stride;
        for (int c = 0; c < C; ++c) v[c] = v[c] * (1.0f + scale[c]) + shift[c];
      } else if (a.mode == NormMode::affine) {
        for (int c = 0; c < C; ++c) v[c] = v[c] * a.weight[c] + a.bias[c];
      }
      store_row_f32(a.y, a.y_dtype, r, C, v.data());
    }
  });
}

}  // namespace scalekv::cpu
