// x += gate ⊙ y on the CPU, row by row (the gate is per batch row, broadcast over tokens). f32 math, one
// rounding to x's dtype. Cost: 2*B*L*C FLOP; reads x and y, writes x.
#include <vector>

#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {

void gated_residual(ThreadPool& pool, const GatedResidualArgs& a) {
  const int C = a.channels;
  const int64_t rows = int64_t(a.batch) * a.tokens;
  pool.parallel_for(rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x(C), y(C);
    for (int64_t r = begin; r < end; ++r) {
      load_row_f32(a.x, a.x_dtype, r, C, x.data());
      load_row_f32(a.y, a.y_dtype, r, C, y.data());
      if (a.gate) {
        const float* g = a.gate + (r / a.tokens) * a.gate_stride;
        for (int c = 0; c < C; ++c) x[c] += g[c] * y[c];
      } else {
        for (int c = 0; c < C; ++c) x[c] += y[c];
      }
      store_row_f32(a.x, a.x_dtype, r, C, x.data());
    }
  });
}

}  // namespace scalekv::cpu
