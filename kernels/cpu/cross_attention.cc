// Varlen cross-attention on the CPU: each image's queries attend to its text segment cu[b]..cu[b+1] of K/V
// through the flash body of flash_attention.h (register-blocked, vectorised softmax), per (image, head, block of
// queries), at the CPU's instruction-set level (isa.h). An image without text gets zeros.
// Cost: 4*B*L*H*n*c FLOP for n text tokens per image.
#include <algorithm>
#include <string>

#include "flash_attention.h"
#include "isa.h"
#include "tensor_view.h"
#include "transformer_ops.h"

namespace scalekv::cpu {
namespace {

// Queries l0.. of image b, head h; keys are the image's text tokens, head h of each K/V row.
struct CrossRows {
  const CrossAttentionArgs& a;
  int b, h, l0, first, n;
  int head_dim() const { return a.head_dim; }
  float scale() const { return a.scale; }
  int keys() const { return n; }
  int64_t row(int i) const { return (int64_t(b) * a.tokens + l0 + i) * a.heads + h; }  // [B, L, H] row of q and out
  const void* text(const void* base, int j) const {
    const int64_t elem = (int64_t(first) + j) * a.kv_row_stride + int64_t(h) * a.head_dim;
    return static_cast<const char*>(base) + elem * int64_t(dtype_size(a.dtype));
  }
  void load_query(int i, float* dst) const { load_row_f32(a.q, a.dtype, row(i), a.head_dim, dst); }
  void load_key(int j, float* k, float* v) const {
    load_row_f32(text(a.k, j), a.dtype, 0, a.head_dim, k);
    load_row_f32(text(a.v, j), a.dtype, 0, a.head_dim, v);
  }
  void prefetch_key(int) const {}
  float bias(int, int) const { return 0.0f; }
  void store(int i, const float* o) const { store_row_f32(a.out, a.dtype, row(i), a.head_dim, o); }
};

SKV_TARGET_AVX512 void block_avx512(const CrossRows& rows, int nq, Scratch& w) { flash_attend_rows<16>(rows, nq, w); }
SKV_TARGET_AVX2 void block_avx2(const CrossRows& rows, int nq, Scratch& w) { flash_attend_rows<8>(rows, nq, w); }
void block_generic(const CrossRows& rows, int nq, Scratch& w) { flash_attend_rows<4>(rows, nq, w); }

}  // namespace

void cross_attention(ThreadPool& pool, const CrossAttentionArgs& a) {
  for (int b = 0; b < a.batch; ++b) {
    // With kvStarts the segments only give lengths: they need not fit the text, the ranges they start must.
    const bool bad_cu = a.cu_seqlens[b] < 0 || a.cu_seqlens[b] > a.cu_seqlens[b + 1] || (!a.kv_starts && a.cu_seqlens[b + 1] > a.n_text);
    if (bad_cu)
      throw BackendError(StatusCode::index_out_of_range,
                         "crossAttention: cuSeqlens must be non-decreasing within [0, " + std::to_string(a.n_text) +
                             "]; entries " + std::to_string(b) + ", " + std::to_string(b + 1) + " are " +
                             std::to_string(a.cu_seqlens[b]) + ", " + std::to_string(a.cu_seqlens[b + 1]));
    if (a.kv_starts && (a.kv_starts[b] < 0 || int64_t(a.kv_starts[b]) + a.cu_seqlens[b + 1] - a.cu_seqlens[b] > a.n_text))
      throw BackendError(StatusCode::index_out_of_range,
                         "crossAttention: kvStarts[" + std::to_string(b) + "] = " + std::to_string(a.kv_starts[b]) + " with " +
                             std::to_string(a.cu_seqlens[b + 1] - a.cu_seqlens[b]) + " tokens leaves the text's " +
                             std::to_string(a.n_text));
  }
  const int H = a.heads, L = a.tokens;
  const int q_blocks = (L + kQueryBlock - 1) / kQueryBlock;
  const auto block = for_isa(block_avx512, block_avx2, block_generic);
  pool.parallel_for(int64_t(a.batch) * H * q_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(a.head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int b = int(task / (int64_t(H) * q_blocks));
      const int h = int(task / q_blocks % H);
      const int l0 = int(task % q_blocks) * kQueryBlock;
      const int n = a.cu_seqlens[b + 1] - a.cu_seqlens[b];
      const int first = a.kv_starts ? a.kv_starts[b] : a.cu_seqlens[b];
      block(CrossRows{a, b, h, l0, first, n}, std::min(kQueryBlock, L - l0), scratch);
    }
  });
}

}  // namespace scalekv::cpu
