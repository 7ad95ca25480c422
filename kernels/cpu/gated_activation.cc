// GEGLU / SwiGLU on the CPU: per row, the gate half through the activation times the linear half, f32 math.
#include <algorithm>
#include <vector>

#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {

void gated_activation(ThreadPool& pool, const GatedActivationArgs& a) {
  const int F = a.features;
  pool.parallel_for(a.rows, std::max<int64_t>(1, 4096 / std::max(F, 1)), [&](int64_t begin, int64_t end) {
    std::vector<float> x(2 * size_t(F)), y(F);
    for (int64_t r = begin; r < end; ++r) {
      load_row_f32(a.x, a.x_dtype, r, 2 * F, x.data());
      for (int i = 0; i < F; ++i) y[i] = apply_epilogue(a.fn, x[i]) * x[F + i];
      store_row_f32(a.y, a.y_dtype, r, F, y.data());
    }
  });
}

}  // namespace scalekv::cpu
