// cfg_tau: out = cfg * (z_cond / tau) + (1 - cfg) * (z_uncond / tau) over [B, row] (z_uncond = rows B..2B-1),
// or out = z / tau; the reference's order of operations, grid-stride. Cost: 5 FLOP per output element.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) cfg_tau_kernel(const CfgTauArgs a) {
  const int64_t total = static_cast<int64_t>(a.batch) * a.row_size;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float cond = a.z[i] / a.tau;
    // nvcc may fuse one product into the add (an ulp from torch's separate roundings); cfg = 1 stays exact.
    a.out[i] = a.mixed ? a.cfg * cond + a.uncond_weight * (a.z[i + total] / a.tau) : cond;
  }
}

}  // namespace

void cfg_tau(const CfgTauArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  const int64_t total = static_cast<int64_t>(a.batch) * a.row_size;
  if (total == 0) return;
  SKV_LAUNCH(cfg_tau_kernel, dim3(tx::elementwise_blocks(total, kThreads)), dim3(kThreads), 0, stream, a);
  tx::check_launch("cfgTau");
}

}  // namespace scalekv::cuda_ops
