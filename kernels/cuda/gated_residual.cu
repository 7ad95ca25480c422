// gated_residual: x[b, l, c] += gate[b, c] * y[b, l, c] in place (gate absent: 1), f32 math, one rounding to
// x's dtype. A grid-stride loop, one element per thread step. Cost: 2 FLOP, 2 reads and 1 write per element.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) gated_residual_kernel(const GatedResidualArgs a) {
  const int64_t total = static_cast<int64_t>(a.batch) * a.tokens * a.channels;
  const int64_t per_image = static_cast<int64_t>(a.tokens) * a.channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float y = tx::load_f32(a.y, a.y_dtype, i);
    const float g = a.gate ? a.gate[(i / per_image) * a.gate_stride + i % a.channels] : 1.0f;
    tx::store_f32(a.x, a.x_dtype, i, tx::load_f32(a.x, a.x_dtype, i) + g * y);
  }
}

}  // namespace

void gated_residual(const GatedResidualArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  const int64_t total = static_cast<int64_t>(a.batch) * a.tokens * a.channels;
  if (total == 0) return;
  SKV_LAUNCH(gated_residual_kernel, dim3(tx::elementwise_blocks(total, kThreads)), dim3(kThreads), 0, stream, a);
  tx::check_launch("gatedResidual");
}

}  // namespace scalekv::cuda_ops
