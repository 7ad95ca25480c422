// Top-k / top-p masking of logit rows on the CPU, as sample_with_top_k_top_p_also_inplace_modifying_logits_:
// top-k keeps every value >= the k-th largest (ties at the boundary survive); top-p then sorts ascending
// (stable: ties in index order), takes softmax and its running sum in f32, and removes entries whose running
// sum is <= 1 - p (compared in f32, as torch compares an f32 tensor with a Python float), never the largest.
// Cost: O(V log V) per row.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "transformer_ops.h"

namespace scalekv::cpu {

void mask_top_k_top_p(float* x, int V, int top_k, double top_p, int* order) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::iota(order, order + V, 0);
  if (top_k > 0) {
    const int k = std::min(top_k, V);
    std::nth_element(order, order + (k - 1), order + V, [&](int i, int j) { return x[i] > x[j]; });
    const float kth = x[order[k - 1]];
    for (int i = 0; i < V; ++i)
      if (x[i] < kth) x[i] = neg_inf;
    std::iota(order, order + V, 0);
  }
  if (top_p > 0.0) {
    std::stable_sort(order, order + V, [&](int i, int j) { return x[i] < x[j]; });
    const float mx = x[order[V - 1]];
    float sum = 0.0f;
    for (int r = 0; r < V; ++r) sum += std::exp(x[order[r]] - mx);
    const float limit = static_cast<float>(1.0 - top_p);
    float cum = 0.0f;
    for (int r = 0; r < V - 1; ++r) {
      cum += std::exp(x[order[r]] - mx) / sum;
      if (cum <= limit) x[order[r]] = neg_inf;
    }
  }
}

void topk_topp_mask(ThreadPool& pool, const TopkToppMaskArgs& a) {
  const int V = a.vocab;
  pool.parallel_for(a.rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(V);
    std::vector<int> order(V);
    for (int64_t r = begin; r < end; ++r) {
      std::copy_n(a.logits + r * V, V, row.data());
      mask_top_k_top_p(row.data(), V, a.top_k, a.top_p, order.data());
      std::copy_n(row.data(), V, a.out + r * V);
    }
  });
}

}  // namespace scalekv::cpu
