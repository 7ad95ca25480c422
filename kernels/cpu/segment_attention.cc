// Varlen self-attention on the CPU (T5's encoder attention): per (segment, head, block of queries), the flash body
// of flash_attention.h over the segment's keys, with the relative-position bias added to each score, at the CPU's
// instruction-set level (isa.h). Cost: 4*H*c*sum(n_s^2) FLOP.
#include <algorithm>
#include <string>
#include <vector>

#include "flash_attention.h"
#include "isa.h"
#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {
namespace {

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

// Queries i0.. of segment [first, first + n), head h; q, k, v of token t are rows (t * 3 + {0, 1, 2}) * H + h of
// head_dim values.
struct SegmentRows {
  const SegmentAttentionArgs& a;
  int first, n, h, i0;
  int head_dim() const { return a.head_dim; }
  float scale() const { return a.scale; }
  int keys() const { return n; }
  int64_t row(int token, int part) const { return (int64_t(token) * 3 + part) * a.heads + h; }
  void load_query(int i, float* dst) const { load_row_f32(a.qkv, a.dtype, row(first + i0 + i, 0), a.head_dim, dst); }
  void load_key(int j, float* k, float* v) const {
    load_row_f32(a.qkv, a.dtype, row(first + j, 1), a.head_dim, k);
    load_row_f32(a.qkv, a.dtype, row(first + j, 2), a.head_dim, v);
  }
  void prefetch_key(int) const {}
  float bias(int i, int j) const {
    if (!a.relative_bias) return 0.0f;
    const int R = (a.span - 1) / 2;
    return a.relative_bias[int64_t(h) * a.span + std::clamp(j - (i0 + i), -R, R) + R];
  }
  void store(int i, const float* o) const {
    store_row_f32(a.out, a.dtype, (int64_t(first) + i0 + i) * a.heads + h, a.head_dim, o);
  }
};

SKV_TARGET_AVX512 void block_avx512(const SegmentRows& rows, int nq, Scratch& w) { flash_attend_rows<16>(rows, nq, w); }
SKV_TARGET_AVX2 void block_avx2(const SegmentRows& rows, int nq, Scratch& w) { flash_attend_rows<8>(rows, nq, w); }
void block_generic(const SegmentRows& rows, int nq, Scratch& w) { flash_attend_rows<4>(rows, nq, w); }

}  // namespace

void segment_attention(ThreadPool& pool, const SegmentAttentionArgs& a) {
  validate_segments(a);
  const int H = a.heads;
  std::vector<int64_t> task_start(size_t(a.segments) + 1, 0);  // tasks of segment s: [start[s], start[s+1])
  for (int s = 0; s < a.segments; ++s) {
    const int n = a.cu_seqlens[s + 1] - a.cu_seqlens[s];
    task_start[s + 1] = task_start[s] + int64_t(H) * ((n + kQueryBlock - 1) / kQueryBlock);
  }
  const auto block = for_isa(block_avx512, block_avx2, block_generic);
  pool.parallel_for(task_start[a.segments], 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(a.head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int seg = int(std::upper_bound(task_start.begin(), task_start.end(), task) - task_start.begin()) - 1;
      const int first = a.cu_seqlens[seg], n = a.cu_seqlens[seg + 1] - first;
      const int blocks = (n + kQueryBlock - 1) / kQueryBlock;
      const int h = int((task - task_start[seg]) / blocks);
      const int i0 = int((task - task_start[seg]) % blocks) * kQueryBlock;
      block(SegmentRows{a, first, n, h, i0}, std::min(kQueryBlock, n - i0), scratch);
    }
  });
}

}  // namespace scalekv::cpu
