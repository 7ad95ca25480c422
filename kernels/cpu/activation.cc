// SiLU / GELU(tanh) elementwise on the CPU, in chunks of 1024 converted to f32 and back.
#include <algorithm>

#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {

void activation(ThreadPool& pool, const ActivationArgs& a) {
  constexpr int kChunk = 1024;
  const int64_t chunks = (a.count + kChunk - 1) / kChunk;
  pool.parallel_for(chunks, 16, [&](int64_t begin, int64_t end) {
    float v[kChunk];
    for (int64_t ch = begin; ch < end; ++ch) {
      // Chunk `ch` is row `ch` of a [chunks, kChunk] view; the last one may be short.
      const int n = int(std::min<int64_t>(kChunk, a.count - ch * kChunk));
      const int64_t off = ch * kChunk;
      if (a.x_dtype == DType::f32) {
        for (int i = 0; i < n; ++i) v[i] = static_cast<const float*>(a.x)[off + i];
      } else {
        for (int i = 0; i < n; ++i) v[i] = bf16_to_f32(static_cast<const uint16_t*>(a.x)[off + i]);
      }
      for (int i = 0; i < n; ++i) v[i] = apply_epilogue(a.fn, v[i]);
      if (a.y_dtype == DType::f32) {
        for (int i = 0; i < n; ++i) static_cast<float*>(a.y)[off + i] = v[i];
      } else {
        for (int i = 0; i < n; ++i) static_cast<uint16_t*>(a.y)[off + i] = f32_to_bf16(v[i]);
      }
    }
  });
}

}  // namespace scalekv::cpu
