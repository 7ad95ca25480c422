// Observation-window selection on the CPU, per (row, head): score, mask, pool, top-k with ties to the
// lowest index, union with the window, sort. Summation and pooling orders follow the reference (window
// queries summed in order, pooling windows summed left to right) so scores agree to the last bits.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "ops.h"

namespace scalekv::cpu {

void selection(ThreadPool& pool, const SelectionArgs& a) {
  const int n = a.n_keys;
  if (a.budget < a.n_window || a.budget > n)
    throw BackendError(StatusCode::budget_invalid, "selection: budget " + std::to_string(a.budget) +
                                                       " must lie in [window " + std::to_string(a.n_window) +
                                                       ", keys " + std::to_string(n) + "]");
  for (int w = 0; w < a.n_window; ++w) {
    if (a.window_keys[w] < 0 || a.window_keys[w] >= n)
      throw BackendError(StatusCode::index_out_of_range, "selection: window key " +
                                                             std::to_string(a.window_keys[w]) +
                                                             " is outside [0, " + std::to_string(n) + ")");
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int half = a.kernel / 2;
  const int k_top = a.budget - a.n_window;
  std::vector<int32_t> window(a.window_keys, a.window_keys + a.n_window);
  std::sort(window.begin(), window.end());

  pool.parallel_for(int64_t(a.rows) * a.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(n), pooled(n);
    std::vector<int32_t> order(n), picked;
    for (int64_t rh = begin; rh < end; ++rh) {
      std::fill(score.begin(), score.end(), 0.0f);
      for (int w = 0; w < a.n_window; ++w) {
        const float* row = a.logits + (rh * a.n_window + w) * int64_t(n);
        if (a.mode == ScoreMode::logits) {
          for (int j = 0; j < n; ++j) score[j] += row[j];
        } else {
          const float lse = a.lse[rh * a.n_window + w];
          for (int j = 0; j < n; ++j) score[j] += std::exp(row[j] - lse);
        }
      }
      for (int w = 0; w < a.n_window; ++w) score[a.window_keys[w]] = neg_inf;

      if (a.pooling == Pooling::none || a.kernel <= 1) {
        pooled = score;
      } else if (a.pooling == Pooling::max) {
        for (int j = 0; j < n; ++j) {
          float m = neg_inf;
          for (int t = std::max(0, j - half); t <= std::min(n - 1, j + half); ++t) m = std::max(m, score[t]);
          pooled[j] = m;
        }
      } else {
        for (int j = 0; j < n; ++j) {
          float sum = 0.0f;
          for (int t = std::max(0, j - half); t <= std::min(n - 1, j + half); ++t) sum += score[t];
          pooled[j] = sum / float(a.kernel);
        }
      }
      if (a.pooled_scores) std::copy(pooled.begin(), pooled.end(), a.pooled_scores + rh * int64_t(n));
      for (int w = 0; w < a.n_window; ++w) pooled[a.window_keys[w]] = neg_inf;

      // A strict total order (score descending, then index ascending) makes the cut deterministic.
      std::iota(order.begin(), order.end(), 0);
      auto before = [&](int32_t x, int32_t y) { return pooled[x] > pooled[y] || (pooled[x] == pooled[y] && x < y); };
      if (k_top < n) std::nth_element(order.begin(), order.begin() + k_top, order.end(), before);
      picked.assign(order.begin(), order.begin() + k_top);
      std::sort(picked.begin(), picked.end());
      int32_t* out = a.out + rh * int64_t(a.budget);
      std::merge(picked.begin(), picked.end(), window.begin(), window.end(), out);
    }
  });
}

}  // namespace scalekv::cpu
