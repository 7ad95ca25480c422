// activation: y[i] = silu(x[i]) or gelu_tanh(x[i]), f32 math, grid-stride. Each thread reads then writes
// the same element, so y may be x. Cost: ~10 FLOP + one transcendental per element.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) activation_kernel(const ActivationArgs a) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < a.count;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    tx::store_f32(a.y, a.y_dtype, i, tx::apply_epilogue(a.fn, tx::load_f32(a.x, a.x_dtype, i)));
}

}  // namespace

void activation(const ActivationArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  if (a.count == 0) return;
  SKV_LAUNCH(activation_kernel, dim3(tx::elementwise_blocks(a.count, kThreads)), dim3(kThreads), 0, stream, a);
  tx::check_launch("activation");
}

}  // namespace scalekv::cuda_ops
