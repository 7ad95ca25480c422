// Classifier-free guidance on logits and the temperature, on the CPU: out = cfg*(zc/tau) + (1-cfg)*(zu/tau),
// in the reference's order (divide each half by tau first, then mix). Cost: 5 FLOP per output element.
#include "transformer_ops.h"

namespace scalekv::cpu {

void cfg_tau(ThreadPool& pool, const CfgTauArgs& a) {
  const int64_t total = int64_t(a.batch) * a.row_size;
  const int64_t uncond = int64_t(a.batch) * a.row_size;  // z[B + b] starts B rows later
  pool.parallel_for(total, 1 << 14, [&](int64_t begin, int64_t end) {
    if (a.mixed) {
      for (int64_t i = begin; i < end; ++i)
        a.out[i] = a.cfg * (a.z[i] / a.tau) + a.uncond_weight * (a.z[i + uncond] / a.tau);
    } else {
      for (int64_t i = begin; i < end; ++i) a.out[i] = a.z[i] / a.tau;
    }
  });
}

}  // namespace scalekv::cpu
