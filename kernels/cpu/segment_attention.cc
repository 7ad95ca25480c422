// Varlen self-attention on the CPU (T5's encoder attention). Per (segment, head, block of kQueryBlock
// queries): the segment's K is staged transposed ([c][n], f32) and V as rows ([n][c]), so both inner loops
// (logits over keys, output over channels) run along contiguous memory and vectorise without reassociating
// a sum. Segments are at most a few hundred tokens, so a query's logits fit in one row: an exact softmax.
// Cost: 4*H*c*sum(n_s^2) FLOP.
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

void validate_segments(const SegmentAttentionArgs& a) {
  const int32_t* cu = a.cu_seqlens;
  bool ok = cu[0] == 0 && cu[a.segments] == a.tokens;
  for (int s = 0; ok && s < a.segments; ++s) ok = cu[s] <= cu[s + 1] && cu[s + 1] - cu[s] <= a.max_seqlen;
  if (!ok)
    throw BackendError(StatusCode::index_out_of_range,
                       "segmentAttention: cuSeqlens must run from 0 to tokens (" + std::to_string(a.tokens) +
                           "), non-decreasing, each segment at most maxSeqlen (" + std::to_string(a.max_seqlen) +
                           ") long");
}

float load(const void* base, DType dtype, int64_t at) {
  return dtype == DType::f32 ? static_cast<const float*>(base)[at] : bf16_to_f32(static_cast<const uint16_t*>(base)[at]);
}

}  // namespace

void segment_attention(ThreadPool& pool, const SegmentAttentionArgs& a) {
  validate_segments(a);
  const int H = a.heads, c = a.head_dim, R = (a.span - 1) / 2;
  const int64_t token_stride = 3 * int64_t(H) * c;
  std::vector<int64_t> task_start(size_t(a.segments) + 1, 0);  // tasks of segment s: [start[s], start[s+1])
  for (int s = 0; s < a.segments; ++s) {
    const int n = a.cu_seqlens[s + 1] - a.cu_seqlens[s];
    task_start[s + 1] = task_start[s] + int64_t(H) * ((n + kQueryBlock - 1) / kQueryBlock);
  }
  pool.parallel_for(task_start[a.segments], 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt, v, s, q(c), o(c);
    int staged_segment = -1, staged_head = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int seg = int(std::upper_bound(task_start.begin(), task_start.end(), task) - task_start.begin()) - 1;
      const int first = a.cu_seqlens[seg], n = a.cu_seqlens[seg + 1] - first;
      const int blocks = (n + kQueryBlock - 1) / kQueryBlock;
      const int h = int((task - task_start[seg]) / blocks);
      const int i0 = int((task - task_start[seg]) % blocks) * kQueryBlock, i1 = std::min(n, i0 + kQueryBlock);
      if (seg != staged_segment || h != staged_head) {
        kt.resize(size_t(c) * n);
        v.resize(size_t(n) * c);
        s.resize(n);
        for (int j = 0; j < n; ++j) {
          const int64_t row = (first + j) * token_stride + int64_t(h) * c;
          for (int d = 0; d < c; ++d) {
            kt[size_t(d) * n + j] = load(a.qkv, a.dtype, row + int64_t(H) * c + d);
            v[size_t(j) * c + d] = load(a.qkv, a.dtype, row + 2 * int64_t(H) * c + d);
          }
        }
        staged_segment = seg;
        staged_head = h;
      }
      const float* bias = a.relative_bias ? a.relative_bias + int64_t(h) * a.span : nullptr;
      for (int i = i0; i < i1; ++i) {
        const int64_t row = (first + i) * token_stride + int64_t(h) * c;
        for (int d = 0; d < c; ++d) q[d] = load(a.qkv, a.dtype, row + d) * a.scale;
        std::fill(s.begin(), s.end(), 0.0f);
        for (int d = 0; d < c; ++d) {
          const float qd = q[d];
          const float* kd = kt.data() + size_t(d) * n;
          for (int j = 0; j < n; ++j) s[j] += qd * kd[j];
        }
        if (bias)
          for (int j = 0; j < n; ++j) s[j] += bias[std::clamp(j - i, -R, R) + R];
        float mx = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < n; ++j) mx = std::max(mx, s[j]);
        std::fill(o.begin(), o.end(), 0.0f);
        float sum = 0.0f;
        for (int j = 0; j < n; ++j) {
          const float p = std::exp(s[j] - mx);
          sum += p;
          const float* vj = v.data() + size_t(j) * c;
          for (int d = 0; d < c; ++d) o[d] += p * vj[d];
        }
        const float inv = 1.0f / sum;
        for (int d = 0; d < c; ++d) o[d] *= inv;
        store_row_f32(a.out, a.dtype, (first + i) * int64_t(H) + h, c, o.data());
      }
    }
  });
}

}  // namespace scalekv::cpu
