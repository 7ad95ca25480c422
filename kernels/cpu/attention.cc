// Flash-style attention on the CPU: for each (row, head) and block of queries, stream the keys of
// [history (optionally gathered) ‖ current] in blocks, keeping a running max and sum per query (online
// softmax), so K/V are read once per query block and nothing of size Lq x n_keys is materialised.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "ops.h"
#include "tensor_view.h"

namespace scalekv::cpu {
namespace {

constexpr int kQueryBlock = 16;
constexpr int kKeyBlock = 64;

struct KeySource {
  const AttentionArgs& a;
  int64_t rh;  // row * heads + head
  int n_hist;

  // Loads key (and, when v is given, value) rows [j0, j0 + n) of the virtual sequence as [n][D] f32.
  void load(int j0, int n, float* k, float* v) const {
    const int D = a.head_dim;
    for (int t = 0; t < n; ++t) {
      const int j = j0 + t;
      if (j < n_hist) {
        const int64_t src = a.gather ? a.gather[rh * a.n_gather + j] : j;
        const int64_t row = rh * a.hist_cap + src;
        load_row_f32(a.hist_k, a.dtype, row, D, k + int64_t(t) * D);
        if (v) load_row_f32(a.hist_v, a.dtype, row, D, v + int64_t(t) * D);
      } else {
        const int64_t row = rh * a.lc + (j - n_hist);
        load_row_f32(a.cur_k, a.dtype, row, D, k + int64_t(t) * D);
        if (v) load_row_f32(a.cur_v, a.dtype, row, D, v + int64_t(t) * D);
      }
    }
  }
};

inline float dot(const float* x, const float* y, int n) {
  float acc = 0.0f;
  for (int d = 0; d < n; ++d) acc += x[d] * y[d];
  return acc;
}

void validate(const AttentionArgs& a) {
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

void attend_block(const AttentionArgs& a, const KeySource& src, int64_t rh, int q0, int nq, std::vector<float>& q,
                  std::vector<float>& k, std::vector<float>& v, std::vector<float>& acc) {
  const int D = a.head_dim;
  const int n_keys = a.n_keys();
  float m[kQueryBlock], l[kQueryBlock], s[kQueryBlock][kKeyBlock];
  for (int i = 0; i < nq; ++i) {
    load_row_f32(a.q, a.dtype, rh * a.lq + q0 + i, D, q.data() + int64_t(i) * D);
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.0f;
  }
  std::fill(acc.begin(), acc.begin() + int64_t(nq) * D, 0.0f);
  for (int j0 = 0; j0 < n_keys; j0 += kKeyBlock) {
    const int nk = std::min(kKeyBlock, n_keys - j0);
    src.load(j0, nk, k.data(), v.data());
    for (int i = 0; i < nq; ++i) {
      const float* qi = q.data() + int64_t(i) * D;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < nk; ++t) {
        s[i][t] = a.scale * dot(qi, k.data() + int64_t(t) * D, D);
        block_max = std::max(block_max, s[i][t]);
      }
      const float m_new = std::max(m[i], block_max);
      const float correction = std::exp(m[i] - m_new);  // exp(-inf) = 0 on the first block
      float* o = acc.data() + int64_t(i) * D;
      for (int d = 0; d < D; ++d) o[d] *= correction;
      float sum = 0.0f;
      for (int t = 0; t < nk; ++t) {
        const float p = std::exp(s[i][t] - m_new);
        sum += p;
        const float* vt = v.data() + int64_t(t) * D;
        for (int d = 0; d < D; ++d) o[d] += p * vt[d];
      }
      l[i] = l[i] * correction + sum;
      m[i] = m_new;
    }
  }
  for (int i = 0; i < nq; ++i) {
    float* o = acc.data() + int64_t(i) * D;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    for (int d = 0; d < D; ++d) o[d] *= inv;
    store_row_f32(a.out, a.dtype, rh * a.lq + q0 + i, D, o);
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
    const int q_blocks = (a.lq + kQueryBlock - 1) / kQueryBlock;
    pool.parallel_for(pairs * q_blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> q(int64_t(kQueryBlock) * D), k(int64_t(kKeyBlock) * D), v(int64_t(kKeyBlock) * D),
          acc(int64_t(kQueryBlock) * D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rh = task / q_blocks;
        const int q0 = int(task % q_blocks) * kQueryBlock;
        attend_block(a, KeySource{a, rh, n_hist}, rh, q0, std::min(kQueryBlock, a.lq - q0), q, k, v, acc);
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
