// In-place eviction on the CPU. Every keep list is checked before any row moves, so a bad list changes
// nothing. Moving rows front-to-back is safe because a strictly increasing list has keep[i] >= i: the
// destination of row i never holds a source that a later i still has to read. A list with repeats breaks
// that (keep[i] < i after a repeat), so those lists are gathered through a copy of the kept rows.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "ops.h"

namespace scalekv::cpu {

void evict_compact(ThreadPool& pool, const EvictCompactArgs& a) {
  const int64_t pairs = int64_t(a.rows) * a.heads;
  const int total = a.hist_len + a.lc;
  if (a.n_keep > a.hist_cap)
    throw BackendError(StatusCode::index_out_of_range, "evictCompact: " + std::to_string(a.n_keep) +
                                                           " kept rows exceed the history capacity " +
                                                           std::to_string(a.hist_cap));
  check_kv_pages(a.hist_pages, a.rows, 0, std::max(a.hist_len, a.n_keep), "evictCompact");
  for (int64_t rh = 0; rh < pairs; ++rh) {
    const int32_t* keep = a.keep + rh * a.n_keep;
    for (int i = 0; i < a.n_keep; ++i) {
      if (keep[i] < 0 || keep[i] >= total)
        throw BackendError(StatusCode::index_out_of_range,
                           "evictCompact: keep index " + std::to_string(keep[i]) + " of (row, head) " +
                               std::to_string(rh / a.heads) + "," + std::to_string(rh % a.heads) +
                               " is outside [0, " + std::to_string(total) + ")");
      if (i > 0 && (keep[i] < keep[i - 1] || (keep[i] == keep[i - 1] && !a.repeats)))
        throw BackendError(StatusCode::index_not_sorted,
                           "evictCompact: keep indices of (row, head) " + std::to_string(rh / a.heads) + "," +
                               std::to_string(rh % a.heads) + " must be " +
                               (a.repeats ? "non-decreasing" : "strictly increasing") + " (position " +
                               std::to_string(i) + ": " + std::to_string(keep[i - 1]) + " then " +
                               std::to_string(keep[i]) + ")");
    }
  }
  const bool quantised = a.kv_format != KvFormat::plain;
  const size_t row_bytes = size_t(a.head_dim) * dtype_size(a.dtype);
  pool.parallel_for(pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> gathered;
    std::vector<uint8_t> gathered_scales;
    for (int64_t rh = begin; rh < end; ++rh) {
      const int32_t* keep = a.keep + rh * a.n_keep;
      const int r = int(rh / a.heads);
      const int h = int(rh % a.heads);
      const int64_t cur_row0 = rh * a.lc;
      auto history_row = [&](int t) { return kv_page_row(a.hist_pages, a.heads, r, h, t); };
      // Kept entry src of [history ‖ current] into the K and V rows at dk and dv, and its scale byte into
      // *dst_scale when 8-bit.
      auto put = [&](char* dk, char* dv, uint8_t* dst_scale, int src) {
        const bool hist = src < a.hist_len;
        const int64_t from = hist ? history_row(src) : cur_row0 + src - a.hist_len;
        const int64_t at = from * int64_t(row_bytes);
        std::memmove(dk, static_cast<const char*>(hist ? a.hist_k : a.cur_k) + at, row_bytes);
        std::memmove(dv, static_cast<const char*>(hist ? a.hist_v : a.cur_v) + at, row_bytes);
        if (quantised) *dst_scale = (hist ? a.hist_scales : a.cur_scales)[from];
      };
      bool repeated = false;
      for (int i = 1; a.repeats && i < a.n_keep && !repeated; ++i) repeated = keep[i] == keep[i - 1];
      if (repeated) {
        gathered.resize(2 * size_t(a.n_keep) * row_bytes);
        gathered_scales.resize(size_t(a.n_keep));
      }
      char* hk = static_cast<char*>(a.hist_k);
      char* hv = static_cast<char*>(a.hist_v);
      for (int i = 0; i < a.n_keep; ++i) {
        const int src = keep[i];
        if (!repeated && src == i && src < a.hist_len) continue;  // already in place
        const int64_t at = repeated ? i : history_row(i);
        char* dk = repeated ? gathered.data() : hk;
        char* dv = repeated ? gathered.data() + size_t(a.n_keep) * row_bytes : hv;
        uint8_t* scales = repeated ? gathered_scales.data() : a.hist_scales;
        put(dk + at * int64_t(row_bytes), dv + at * int64_t(row_bytes), quantised ? scales + at : nullptr, src);
      }
      for (int i = 0; repeated && i < a.n_keep; ++i) {
        const int64_t to = history_row(i);
        std::memcpy(hk + to * int64_t(row_bytes), gathered.data() + i * row_bytes, row_bytes);
        std::memcpy(hv + to * int64_t(row_bytes), gathered.data() + (a.n_keep + i) * row_bytes, row_bytes);
        if (quantised) a.hist_scales[to] = gathered_scales[i];
      }
    }
  });
}

}  // namespace scalekv::cpu
