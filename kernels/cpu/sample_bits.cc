// Bit sampling on the CPU: per (image, pair) the V = 2 top-k / top-p mask, then bit = u < p1 with
// p1 = softmax(z)[1] in f64 and u the counter-based Philox uniform of (seed, image, scale, pair), so the
// draw does not depend on threads or backend.
#include <cmath>
#include <limits>

#include "../philox.h"
#include "transformer_ops.h"

namespace scalekv::cpu {

void sample_bits(ThreadPool& pool, const SampleBitsArgs& a) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  pool.parallel_for(int64_t(a.batch) * a.pairs, 1 << 12, [&](int64_t begin, int64_t end) {
    int order[2];
    for (int64_t i = begin; i < end; ++i) {
      float z[2] = {a.logits[2 * i], a.logits[2 * i + 1]};
      mask_top_k_top_p(z, 2, a.top_k, a.top_p, order);
      const double p1 = z[1] == neg_inf ? 0.0 : z[0] == neg_inf ? 1.0
                                                               : 1.0 / (1.0 + std::exp(double(z[0]) - double(z[1])));
      const uint32_t b = uint32_t(i / a.pairs);
      const bool bit = philox_uniform(a.seed, b, a.scale_index, uint64_t(i % a.pairs)) < p1;
      if (a.out_dtype == DType::u8) static_cast<uint8_t*>(a.out)[i] = bit;
      else static_cast<int32_t*>(a.out)[i] = bit;
    }
  });
}

}  // namespace scalekv::cpu
