// sample_bits: one thread per (image, pair): the V = 2 case of the top-k / top-p mask (the same decisions as
// the CPU's general row mask: top-k 1 keeps the larger value, ties both; top-p compares the smaller entry's
// f32 softmax with 1 - p, ties ordered by index), then bit = u < p1 with p1 = softmax(z)[1] in f64 and u the
// Philox uniform of (seed, image, scale, pair) from ../philox.h, shared with the CPU kernel.
// Cost: one Philox4x32-10 (10 rounds of 2 32x32 multiplies) and one exp per pair.
#include "../philox.h"
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) sample_bits_kernel(const SampleBitsArgs a, float limit) {
  const int64_t total = static_cast<int64_t>(a.batch) * a.pairs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float z0 = a.logits[2 * i], z1 = a.logits[2 * i + 1];
    if (a.top_k == 1) {
      const float kth = fmaxf(z0, z1);
      if (z0 < kth) z0 = -INFINITY;
      if (z1 < kth) z1 = -INFINITY;
    }
    if (a.top_p > 0.0) {
      // Ascending, ties by index: z1 comes first only when strictly smaller.
      const bool one_first = z1 < z0;
      const float lo = one_first ? z1 : z0, hi = one_first ? z0 : z1;
      const float e_lo = expf(lo - hi);
      const float sum = e_lo + expf(hi - hi);
      if (e_lo / sum <= limit) {
        if (one_first) z1 = -INFINITY;
        else z0 = -INFINITY;
      }
    }
    const double p1 = z1 == -INFINITY ? 0.0 : z0 == -INFINITY ? 1.0 : 1.0 / (1.0 + exp(static_cast<double>(z0) - z1));
    const bool bit = philox_uniform(a.seed, static_cast<uint32_t>(i / a.pairs), a.scale_index,
                                    static_cast<uint64_t>(i % a.pairs)) < p1;
    if (a.out_dtype == DType::u8) static_cast<uint8_t*>(a.out)[i] = bit;
    else static_cast<int32_t*>(a.out)[i] = bit;
  }
}

}  // namespace

void sample_bits(const SampleBitsArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  const int64_t total = static_cast<int64_t>(a.batch) * a.pairs;
  if (total == 0) return;
  SKV_LAUNCH(sample_bits_kernel, dim3(tx::elementwise_blocks(total, kThreads)), dim3(kThreads), 0, stream, a,
             static_cast<float>(1.0 - a.top_p));
  tx::check_launch("sampleBits");
}

}  // namespace scalekv::cuda_ops
