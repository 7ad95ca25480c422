// RMS norm (T5LayerNorm) on the CPU: one row per iteration, loaded as f32; the mean of squares in f32 (vector
// partial sums); x * rsqrt(.) rounded to a bf16 weight's dtype before the weight, as HF casts.
// Cost: ~4*rows*C FLOP, reads rows*C elements once, writes them once.
#include <cmath>
#include <vector>

#include "numeric.h"
#include "tensor_view.h"
#include "transformer_ops.h"
#include "vector_math.h"

namespace scalekv::cpu {

void rms_norm(ThreadPool& pool, const RmsNormArgs& a) {
  const int C = a.channels;
  pool.parallel_for(a.rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(C), w(C);
    load_row_f32(a.weight, a.weight_dtype, 0, C, w.data());
    for (int64_t r = begin; r < end; ++r) {
      load_row_f32(a.x, a.x_dtype, r, C, v.data());
      const float inv = 1.0f / std::sqrt(sum_sq_lanes(v.data(), C, 0.0f) / float(C) + a.eps);
      for (int c = 0; c < C; ++c) {
        float n = v[c] * inv;
        if (a.weight_dtype == DType::bf16) n = bf16_to_f32(f32_to_bf16(n));
        v[c] = w[c] * n;
      }
      store_row_f32(a.y, a.y_dtype, r, C, v.data());
    }
  });
}

}  // namespace scalekv::cpu
