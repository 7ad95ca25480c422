// cast on the CPU: f32 <-> bf16 elementwise through element.h's load/store (bf16 stores round to nearest even, as
// every op's bf16 output does). Bytes: count * (in dsize + out dsize).
#include <cstring>

#include "element.h"
#include "ops.h"

namespace scalekv::cpu {

void cast(ThreadPool& pool, const CastArgs& a) {
  if (a.count == 0) return;
  if (a.in_dtype == a.out_dtype) {
    std::memcpy(a.out, a.in, size_t(a.count) * dtype_size(a.in_dtype));
    return;
  }
  pool.parallel_for(a.count, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) store_f32(a.out, a.out_dtype, i, load_f32(a.in, a.in_dtype, i));
  });
}

}  // namespace scalekv::cpu
