// Attention on the CPU: for each (row, head) and block of queries, the flash body of flash_attention.h over the
// keys of [history (optionally gathered) ‖ current], at the CPU's instruction-set level (isa.h). The
// observation-window logits keep the scalar dot product in key order: the ScaleKV selection ranks them, and its
// reference ties must be reproduced exactly.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "flash_attention.h"
#include "isa.h"
#include "ops.h"
#include "tensor_view.h"

namespace scalekv::cpu {
namespace {

constexpr int kKeyBlock = 64;    // keys per tile (window scores)

struct KeySource {
  const AttentionArgs& a;
  int64_t rh;  // row * heads + head
  int n_hist;
  // The history of this (row, head): its row of the page table (null: one contiguous page), and the page size as
  // a shift when it is a power of two (the arena's pages are), so a key's address costs no division.
  const int32_t* table_row;
  int64_t head_rows;  // rows before this head's slot in a page (h * page_tokens), or this (row, head)'s first row
  int page_shift;
  KvRows hist_k, hist_v, cur_k, cur_v;

  KeySource(const AttentionArgs& args, int64_t pair, int hist)
      : a(args), rh(pair), n_hist(hist), hist_k{a.hist_k, a.hist_scales, a.dtype, a.kv_format, false},
        hist_v{a.hist_v, a.hist_scales, a.dtype, a.kv_format, true}, cur_k{a.cur_k, a.cur_scales, a.dtype, a.kv_format, false},
        cur_v{a.cur_v, a.cur_scales, a.dtype, a.kv_format, true} {
    const KvPages& p = a.hist_pages;
    const int r = int(rh / a.heads);
    table_row = p.table ? p.table + int64_t(r) * p.table_pages : nullptr;
    head_rows = p.table ? int64_t(rh % a.heads) * p.page_tokens : rh * int64_t(p.page_tokens);
    page_shift = p.page_tokens > 0 && (p.page_tokens & (p.page_tokens - 1)) == 0 ? __builtin_ctz(unsigned(p.page_tokens)) : -1;
  }

  // Loads key (and, when v is given, value) rows [j0, j0 + n) of the virtual sequence as [n][D] f32.
  void load(int j0, int n, float* k, float* v) const {
    const int D = a.head_dim;
    for (int t = 0; t < n; ++t) load_key(j0 + t, k + int64_t(t) * D, v ? v + int64_t(t) * D : nullptr);
  }

  // The cache lines of history row j (K and V) when its address depends on a gather list or a page table, so the
  // hardware prefetcher cannot see it coming.
  void prefetch_key(int j) const {
    if ((!a.gather && !table_row) || j >= n_hist) return;
    const int64_t row = history_row(a.gather ? a.gather[rh * a.n_gather + j] : j);
    const size_t bytes = hist_k.row_bytes(a.head_dim);
    const char* k = static_cast<const char*>(a.hist_k) + row * int64_t(bytes);
    const char* v = static_cast<const char*>(a.hist_v) + row * int64_t(bytes);
    for (size_t line = 0; line < bytes; line += 64) {
      __builtin_prefetch(k + line);
      __builtin_prefetch(v + line);
    }
  }

  // kv_page_row (backend.h) for this (row, head).
  int64_t history_row(int t) const {
    if (!table_row) return head_rows + t;
    const int P = a.hist_pages.page_tokens;
    const int page = page_shift >= 0 ? t >> page_shift : t / P;
    const int slot = page_shift >= 0 ? t & (P - 1) : t % P;
    return int64_t(table_row[page]) * a.heads * P + head_rows + slot;
  }

  // Key j of the virtual sequence (and its value when v is given) as f32.
  void load_key(int j, float* k, float* v) const {
    const int D = a.head_dim;
    if (j < n_hist) {
      const int64_t row = history_row(a.gather ? a.gather[rh * a.n_gather + j] : j);
      hist_k.load(row, D, k);
      if (v) hist_v.load(row, D, v);
    } else {
      const int64_t row = rh * a.lc + (j - n_hist);
      cur_k.load(row, D, k);
      if (v) cur_v.load(row, D, v);
    }
  }
};

// The output rows of one (row, head) for the flash body: queries q0.. of the block, keys [history ‖ current].
struct AttentionRows {
  const AttentionArgs& a;
  const KeySource& src;
  int64_t rh;
  int q0;
  int head_dim() const { return a.head_dim; }
  float scale() const { return a.scale; }
  int keys() const { return a.n_keys(); }
  void load_query(int i, float* dst) const { load_row_f32(a.q, a.dtype, rh * a.lq + q0 + i, a.head_dim, dst); }
  void load_key(int j, float* k, float* v) const { src.load_key(j, k, v); }
  void prefetch_key(int j) const { src.prefetch_key(j); }
  float bias(int, int) const { return 0.0f; }
  void store(int i, const float* o) const { store_row_f32(a.out, a.dtype, rh * a.lq + q0 + i, a.head_dim, o); }
};

SKV_TARGET_AVX512 void attend_block_avx512(const AttentionArgs& a, const KeySource& src, int64_t rh, int q0, int nq, Scratch& w) {
  flash_attend_rows<16>(AttentionRows{a, src, rh, q0}, nq, w);
}
SKV_TARGET_AVX2 void attend_block_avx2(const AttentionArgs& a, const KeySource& src, int64_t rh, int q0, int nq, Scratch& w) {
  flash_attend_rows<8>(AttentionRows{a, src, rh, q0}, nq, w);
}
void attend_block_generic(const AttentionArgs& a, const KeySource& src, int64_t rh, int q0, int nq, Scratch& w) {
  flash_attend_rows<4>(AttentionRows{a, src, rh, q0}, nq, w);
}

inline float dot(const float* x, const float* y, int n) {
  float acc = 0.0f;
  for (int d = 0; d < n; ++d) acc += x[d] * y[d];
  return acc;
}

void validate(const AttentionArgs& a) {
  if (a.hist_k) check_kv_pages(a.hist_pages, a.rows, 0, a.hist_len, "attention");
  if (a.gather) {
    const int64_t total = int64_t(a.rows) * a.heads * a.n_gather;
    for (int64_t i = 0; i < total; ++i) {
      if (a.gather[i] < 0 || a.gather[i] >= a.hist_len)
        throw BackendError(StatusCode::index_out_of_range,
                           "attention: gather index " + std::to_string(a.gather[i]) + " at position " +
                               std::to_string(i) + " is outside the history [0, " + std::to_string(a.hist_len) + ")");
    }
  }
  for (int w = 0; w < a.n_window; ++w) {
    if (a.window_rows[w] < 0 || a.window_rows[w] >= a.lq)
      throw BackendError(StatusCode::index_out_of_range,
                         "attention: window row " + std::to_string(a.window_rows[w]) + " is outside [0, " +
                             std::to_string(a.lq) + ")");
  }
}

void window_scores(const AttentionArgs& a, const KeySource& src, int64_t rh, int w, std::vector<float>& q,
                   std::vector<float>& k) {
  const int D = a.head_dim;
  const int n_keys = a.n_keys();
  load_row_f32(a.q, a.dtype, rh * a.lq + a.window_rows[w], D, q.data());
  float* logits = a.window_logits + (rh * a.n_window + w) * int64_t(n_keys);
  float mx = -std::numeric_limits<float>::infinity();
  for (int j0 = 0; j0 < n_keys; j0 += kKeyBlock) {
    const int nk = std::min(kKeyBlock, n_keys - j0);
    src.load(j0, nk, k.data(), nullptr);
    for (int t = 0; t < nk; ++t) {
      logits[j0 + t] = a.scale * dot(q.data(), k.data() + int64_t(t) * D, D);
      mx = std::max(mx, logits[j0 + t]);
    }
  }
  if (a.window_lse) {
    double sum = 0.0;
    for (int j = 0; j < n_keys; ++j) sum += std::exp(double(logits[j]) - mx);
    a.window_lse[rh * a.n_window + w] = n_keys ? float(double(mx) + std::log(sum)) : -INFINITY;
  }
}

}  // namespace

void attention(ThreadPool& pool, const AttentionArgs& a) {
  validate(a);
  const int D = a.head_dim;
  const int64_t pairs = int64_t(a.rows) * a.heads;
  const int n_hist = a.gather ? a.n_gather : a.hist_len;
  if (a.out) {
    // Queries per task: kQueryBlock, halved down to 32 while there are fewer than four tasks per thread (mid scales:
    // few rows x heads and Lq under a block would leave threads idle).
    int q_block = kQueryBlock;
    while (q_block > 32 && pairs * ((a.lq + q_block - 1) / q_block) < 4 * int64_t(pool.size())) q_block /= 2;
    const int q_blocks = (a.lq + q_block - 1) / q_block;
    const auto block = for_isa(attend_block_avx512, attend_block_avx2, attend_block_generic);
    pool.parallel_for(pairs * q_blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rh = task / q_blocks;
        const int q0 = int(task % q_blocks) * q_block;
        block(a, KeySource{a, rh, n_hist}, rh, q0, std::min(q_block, a.lq - q0), scratch);
      }
    });
  }
  if (a.n_window > 0 && a.window_logits) {
    pool.parallel_for(pairs * a.n_window, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> q(D), k(int64_t(kKeyBlock) * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rh = task / a.n_window;
        window_scores(a, KeySource{a, rh, n_hist}, rh, int(task % a.n_window), q, k);
      }
    });
  }
}

}  // namespace scalekv::cpu
