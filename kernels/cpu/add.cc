// add on the CPU: out = a + b elementwise, in f32, rounded to the storage dtype. In place (out == a or b) is
// safe: each element is read before it is written. Bytes: 3 * count * dsize.
#include "element.h"
#include "ops.h"

namespace scalekv::cpu {

void add(ThreadPool& pool, const AddArgs& a) {
  pool.parallel_for(a.count, 1 << 14, [&](int64_t begin, int64_t end) {
    if (a.dtype == DType::f32) {
      const float* x = static_cast<const float*>(a.a);
      const float* y = static_cast<const float*>(a.b);
      float* out = static_cast<float*>(a.out);
      for (int64_t i = begin; i < end; ++i) out[i] = x[i] + y[i];
    } else {
      for (int64_t i = begin; i < end; ++i) store_f32(a.out, a.dtype, i, load_f32(a.a, a.dtype, i) + load_f32(a.b, a.dtype, i));
    }
  });
}

}  // namespace scalekv::cpu
