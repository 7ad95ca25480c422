// The message for a status word set by a kernel (see ops.cuh), shared by the CUDA and emulator backends so
// errors read the same on both. The word says what went wrong and at which flat entry, not which op, so the
// message names the queued ops that could have reported it (only the first bad op reports).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "../backend.h"

namespace scalekv {

inline std::string kernel_status_message(int32_t code, int32_t detail, const std::vector<std::string>& pending) {
  const auto has = [&](const char* op) { return std::find(pending.begin(), pending.end(), op) != pending.end(); };
  const std::string at = " (flat entry " + std::to_string(detail) + ")";
  switch (static_cast<StatusCode>(code)) {
    case StatusCode::index_not_sorted:
      return "evictCompact: keep indices must be strictly increasing per (row, head)" + at;
    case StatusCode::budget_invalid:
      return "selection: budget " + std::to_string(detail) + " must lie in [number of window keys, number of keys]";
    case StatusCode::index_out_of_range: {
      std::string msg;
      if (has("attention"))
        msg += "attention: gather indices must lie in [0, hist_len), window rows in [0, lq) and pageTable entries "
               "in [0, pages); ";
      if (has("evictCompact"))
        msg += "evictCompact: keep indices must lie in [0, hist_len + lc), n_keep <= hist_cap and pageTable entries "
               "in [0, pages); ";
      if (has("qkNormRope")) msg += "qkNormRope: pageTable entries must lie in [0, pages); ";
      if (has("selection")) msg += "selection: window keys must lie in [0, n_keys); ";
      if (has("crossAttention"))
        msg += "crossAttention: cuSeqlens must be non-decreasing within [0, nText] (flat entry = image); ";
      if (msg.empty()) msg = "index out of range; ";
      return msg + "an index was out of range" + at;
    }
    default:
      return "kernel reported status " + std::to_string(code) + at;
  }
}

}  // namespace scalekv
