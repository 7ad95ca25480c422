// transpose12 on the CPU: [A, B, C, D] (read from in_offset on) -> [A, C, B, D] (written from out_offset on), elements moved as raw
// words; one (a, c) output slab of B*D elements per iteration. Bytes: 2 * count * dsize.
#include <algorithm>
#include <cstring>

#include "ops.h"

namespace scalekv::cpu {

void transpose12(ThreadPool& pool, const Transpose12Args& a) {
  const int64_t slabs = a.a * a.c;
  if (slabs == 0 || a.b == 0 || a.d == 0) return;
  const size_t es = dtype_size(a.dtype);
  const size_t row = size_t(a.d) * es;
  const uint8_t* in = static_cast<const uint8_t*>(a.in) + size_t(a.in_offset) * es;
  uint8_t* out = static_cast<uint8_t*>(a.out) + size_t(a.out_offset) * es;
  pool.parallel_for(slabs, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, a.b * a.d)), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t ia = s / a.c, ic = s % a.c;
      uint8_t* dst = out + size_t(s) * size_t(a.b) * row;
      for (int64_t ib = 0; ib < a.b; ++ib)
        std::memcpy(dst + size_t(ib) * row, in + size_t((ia * a.b + ib) * a.c + ic) * row, row);
    }
  });
}

}  // namespace scalekv::cpu
