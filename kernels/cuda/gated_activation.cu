// gated_activation (GEGLU / SwiGLU): y[r, i] = f(x[r, i]) * x[r, F + i], f32 math, grid-stride over y.
// Cost: ~11 FLOP + one transcendental per output; reads 2, writes 1 element.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) gated_activation_kernel(const GatedActivationArgs a) {
  const int64_t count = a.rows * a.features;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; e < count;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t r = e / a.features, i = e % a.features;
    const int64_t gate = r * 2 * a.features + i;
    const float y = tx::apply_epilogue(a.fn, tx::load_f32(a.x, a.x_dtype, gate)) * tx::load_f32(a.x, a.x_dtype, gate + a.features);
    tx::store_f32(a.y, a.y_dtype, e, y);
  }
}

}  // namespace

void gated_activation(const GatedActivationArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  const int64_t count = a.rows * a.features;
  if (count == 0) return;
  SKV_LAUNCH(gated_activation_kernel, dim3(tx::elementwise_blocks(count, kThreads)), dim3(kThreads), 0, stream, a);
  tx::check_launch("gatedActivation");
}

}  // namespace scalekv::cuda_ops
