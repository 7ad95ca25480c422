// Varlen cross-attention on the CPU: for each (image b, head h) the text segment cu[b]..cu[b+1] of K/V is
// converted to f32 once, then every query row of a block of kQueryBlock tokens takes an exact softmax over
// it (text segments are short, <= 512 tokens, so the logits fit in a row buffer; no online rescaling).
// Cost: 4*B*L*H*n*c FLOP for n text tokens per image.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {
namespace {

constexpr int kQueryBlock = 64;

void load_head_rows(const void* base, DType dtype, int64_t stride, int64_t first, int n, int64_t head_off, int c,
                    float* dst) {
  for (int j = 0; j < n; ++j) {
    const int64_t elem = (first + j) * stride + head_off;
    if (dtype == DType::f32) {
      std::copy_n(static_cast<const float*>(base) + elem, c, dst + int64_t(j) * c);
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(base) + elem;
      for (int d = 0; d < c; ++d) dst[int64_t(j) * c + d] = bf16_to_f32(src[d]);
    }
  }
}

}  // namespace

void cross_attention(ThreadPool& pool, const CrossAttentionArgs& a) {
  for (int b = 0; b < a.batch; ++b) {
    if (a.cu_seqlens[b] < 0 || a.cu_seqlens[b] > a.cu_seqlens[b + 1] || a.cu_seqlens[b + 1] > a.n_text)
      throw BackendError(StatusCode::index_out_of_range,
                         "crossAttention: cuSeqlens must be non-decreasing within [0, " + std::to_string(a.n_text) +
                             "]; entries " + std::to_string(b) + ", " + std::to_string(b + 1) + " are " +
                             std::to_string(a.cu_seqlens[b]) + ", " + std::to_string(a.cu_seqlens[b + 1]));
  }
  const int H = a.heads, c = a.head_dim, L = a.tokens;
  const int q_blocks = (L + kQueryBlock - 1) / kQueryBlock;
  pool.parallel_for(int64_t(a.batch) * H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> k, v, s, q(c), o(c);
    for (int64_t task = begin; task < end; ++task) {
      const int b = int(task / (int64_t(H) * q_blocks));
      const int h = int(task / q_blocks % H);
      const int l0 = int(task % q_blocks) * kQueryBlock, l1 = std::min(L, l0 + kQueryBlock);
      const int first = a.cu_seqlens[b], n = a.cu_seqlens[b + 1] - first;
      k.resize(int64_t(n) * c);
      v.resize(int64_t(n) * c);
      s.resize(n);
      load_head_rows(a.k, a.dtype, a.kv_row_stride, first, n, int64_t(h) * c, c, k.data());
      load_head_rows(a.v, a.dtype, a.kv_row_stride, first, n, int64_t(h) * c, c, v.data());
      for (int l = l0; l < l1; ++l) {
        const int64_t row = (int64_t(b) * L + l) * H + h;  // [B, L, H] row of q and out
        load_row_f32(a.q, a.dtype, row, c, q.data());
        float mx = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < n; ++j) {
          const float* kj = k.data() + int64_t(j) * c;
          float dot = 0.0f;
          for (int d = 0; d < c; ++d) dot += q[d] * kj[d];
          s[j] = dot * a.scale;
          mx = std::max(mx, s[j]);
        }
        std::fill(o.begin(), o.end(), 0.0f);
        float sum = 0.0f;
        for (int j = 0; j < n; ++j) {
          const float p = std::exp(s[j] - mx);
          sum += p;
          const float* vj = v.data() + int64_t(j) * c;
          for (int d = 0; d < c; ++d) o[d] += p * vj[d];
        }
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // no text: zeros
        for (int d = 0; d < c; ++d) o[d] *= inv;
        store_row_f32(a.out, a.dtype, row, c, o.data());
      }
    }
  });
}

}  // namespace scalekv::cpu
