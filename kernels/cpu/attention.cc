// Flash-style attention on the CPU: for each (row, head) and block of kQueryBlock queries, stream the keys of
// [history (optionally gathered) ‖ current] in tiles of kKeyTile, keeping a running max and sum per query (online
// softmax), so K/V are read once per query block and nothing of size Lq x n_keys is materialised.
//
// Per key tile the K rows are staged transposed ([Dp][kKeyTile] f32) and V as rows ([kKeyTile][Dp]), Dp = head_dim
// rounded up to kLanes with zeros. Both products are register-blocked: scores as 4 queries x 32 keys and P V as 4
// queries x 32 channels, 8 vector accumulators over a fixed-size inner loop that the compiler keeps in registers.
// exp is a branch-free polynomial (Cephes' expf, within 2 ulp), so the softmax vectorises as well. The block runs
// at the CPU's widest level (isa.h). The observation-window logits keep the scalar dot product in key order: the
// ScaleKV selection ranks them, and its reference ties must be reproduced exactly.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "isa.h"
#include "vector_math.h"
#include "ops.h"
#include "tensor_view.h"

namespace scalekv::cpu {
namespace {

constexpr int kQueryBlock = 128;  // queries per task (a multiple of kQueryTile): K/V tiles staged once serve them all
constexpr int kKeyBlock = 64;    // keys per tile (window scores)
constexpr int kKeyTile = 64;     // keys per tile (output), a multiple of kLanes
constexpr int kQueryTile = 4;    // register tile: queries
constexpr int kLanes = 32;       // register tile: keys (scores) or channels (P V)

struct KeySource {
  const AttentionArgs& a;
  int64_t rh;  // row * heads + head
  int n_hist;

  // Loads key (and, when v is given, value) rows [j0, j0 + n) of the virtual sequence as [n][D] f32.
  void load(int j0, int n, float* k, float* v) const {
    const int D = a.head_dim;
    for (int t = 0; t < n; ++t) load_key(j0 + t, k + int64_t(t) * D, v ? v + int64_t(t) * D : nullptr);
  }

  // Key j of the virtual sequence (and its value when v is given) as f32.
  void load_key(int j, float* k, float* v) const {
    const int D = a.head_dim;
    if (j < n_hist) {
      const int64_t src = a.gather ? a.gather[rh * a.n_gather + j] : j;
      const int64_t row = rh * a.hist_cap + src;
      load_row_f32(a.hist_k, a.dtype, row, D, k);
      if (v) load_row_f32(a.hist_v, a.dtype, row, D, v);
    } else {
      const int64_t row = rh * a.lc + (j - n_hist);
      load_row_f32(a.cur_k, a.dtype, row, D, k);
      if (v) load_row_f32(a.cur_v, a.dtype, row, D, v);
    }
  }
};

// Scratch of one task, sized for head_dim rounded up to kLanes.
struct Scratch {
  int dp;
  std::vector<float> q, kt, v, s, o, key;
  explicit Scratch(int d)
      : dp((d + kLanes - 1) / kLanes * kLanes), q(size_t(kQueryBlock) * dp), kt(size_t(dp) * kKeyTile),
        v(size_t(kKeyTile) * dp), s(size_t(kQueryBlock) * kKeyTile), o(size_t(kQueryBlock) * dp), key(size_t(2) * d) {}
};

SKV_ALWAYS_INLINE void attend_block_impl(const AttentionArgs& a, const KeySource& src, int64_t rh, int q0, int nq, Scratch& w) {
  const int D = a.head_dim, Dp = w.dp;
  const int n_keys = a.n_keys();
  const int nq4 = (nq + kQueryTile - 1) / kQueryTile * kQueryTile;
  float m[kQueryBlock], l[kQueryBlock];
  std::fill(w.q.begin(), w.q.end(), 0.0f);
  for (int i = 0; i < nq; ++i) {
    // The softmax scale is folded into q once.
    float* qi = w.q.data() + size_t(i) * Dp;
    load_row_f32(a.q, a.dtype, rh * a.lq + q0 + i, D, qi);
    for (int d = 0; d < D; ++d) qi[d] *= a.scale;
  }
  for (int i = 0; i < nq4; ++i) {
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.0f;
  }
  std::fill(w.o.begin(), w.o.end(), 0.0f);
  std::fill(w.kt.begin(), w.kt.end(), 0.0f);
  std::fill(w.v.begin(), w.v.end(), 0.0f);
  float* kt = w.kt.data();
  float* vt = w.v.data();
  for (int j0 = 0; j0 < n_keys; j0 += kKeyTile) {
    const int nk = std::min(kKeyTile, n_keys - j0);
    for (int t = 0; t < nk; ++t) {
      src.load_key(j0 + t, w.key.data(), vt + size_t(t) * Dp);
      for (int d = 0; d < D; ++d) kt[size_t(d) * kKeyTile + t] = w.key[d];
    }
    if (nk < kKeyTile) {  // the last tile: stale keys past nk are zeroed (their scores are masked below)
      for (int d = 0; d < D; ++d) std::fill(kt + size_t(d) * kKeyTile + nk, kt + size_t(d + 1) * kKeyTile, 0.0f);
      std::fill(vt + size_t(nk) * Dp, vt + size_t(kKeyTile) * Dp, 0.0f);
    }
    // Scores: 4 queries x 32 keys per register tile, over the channels.
    for (int i0 = 0; i0 < nq4; i0 += kQueryTile) {
      for (int t0 = 0; t0 < kKeyTile; t0 += kLanes) {
        float acc[kQueryTile][kLanes] = {};
        for (int d = 0; d < Dp; ++d) {
          const float* kr = kt + size_t(d) * kKeyTile + t0;
          for (int ii = 0; ii < kQueryTile; ++ii) {
            const float qv = w.q[size_t(i0 + ii) * Dp + d];
            for (int tt = 0; tt < kLanes; ++tt) acc[ii][tt] += qv * kr[tt];
          }
        }
        for (int ii = 0; ii < kQueryTile; ++ii)
          for (int tt = 0; tt < kLanes; ++tt)
            w.s[size_t(i0 + ii) * kKeyTile + t0 + tt] = t0 + tt < nk ? acc[ii][tt] : -std::numeric_limits<float>::infinity();
      }
    }
    // Online softmax: rescale what was accumulated, turn scores into weights.
    for (int i = 0; i < nq4; ++i) {
      float* si = w.s.data() + size_t(i) * kKeyTile;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < kKeyTile; ++t) block_max = std::max(block_max, si[t]);
      const float m_new = std::max(m[i], block_max);
      const float correction = exp_poly(m[i] - m_new);  // 0 on the first tile
      float sum = 0.0f;
      for (int t = 0; t < kKeyTile; ++t) {
        si[t] = exp_poly(si[t] - m_new);
        sum += si[t];
      }
      float* oi = w.o.data() + size_t(i) * Dp;
      for (int d = 0; d < Dp; ++d) oi[d] *= correction;
      l[i] = l[i] * correction + sum;
      m[i] = m_new;
    }
    // P V: 4 queries x 32 channels per register tile, over the keys.
    for (int i0 = 0; i0 < nq4; i0 += kQueryTile) {
      for (int d0 = 0; d0 < Dp; d0 += kLanes) {
        float acc[kQueryTile][kLanes];
        for (int ii = 0; ii < kQueryTile; ++ii)
          for (int dd = 0; dd < kLanes; ++dd) acc[ii][dd] = w.o[size_t(i0 + ii) * Dp + d0 + dd];
        for (int t = 0; t < kKeyTile; ++t) {
          const float* vr = vt + size_t(t) * Dp + d0;
          for (int ii = 0; ii < kQueryTile; ++ii) {
            const float p = w.s[size_t(i0 + ii) * kKeyTile + t];
            for (int dd = 0; dd < kLanes; ++dd) acc[ii][dd] += p * vr[dd];
          }
        }
        for (int ii = 0; ii < kQueryTile; ++ii)
          for (int dd = 0; dd < kLanes; ++dd) w.o[size_t(i0 + ii) * Dp + d0 + dd] = acc[ii][dd];
      }
    }
  }
  for (int i = 0; i < nq; ++i) {
    float* oi = w.o.data() + size_t(i) * Dp;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    for (int d = 0; d < D; ++d) oi[d] *= inv;
    store_row_f32(a.out, a.dtype, rh * a.lq + q0 + i, D, oi);
  }
}

SKV_TARGET_AVX512 void attend_block_avx512(const AttentionArgs& a, const KeySource& src, int64_t rh, int q0, int nq, Scratch& w) {
  attend_block_impl(a, src, rh, q0, nq, w);
}
SKV_TARGET_AVX2 void attend_block_avx2(const AttentionArgs& a, const KeySource& src, int64_t rh, int q0, int nq, Scratch& w) {
  attend_block_impl(a, src, rh, q0, nq, w);
}
void attend_block_generic(const AttentionArgs& a, const KeySource& src, int64_t rh, int q0, int nq, Scratch& w) {
  attend_block_impl(a, src, rh, q0, nq, w);
}

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
    const IsaLevel level = isa_level();
    const auto block = level == IsaLevel::avx512 ? attend_block_avx512 : level == IsaLevel::avx2 ? attend_block_avx2 : attend_block_generic;
    pool.parallel_for(pairs * q_blocks, 1, [&](int64_t begin, int64_t end) {
      Scratch scratch(D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rh = task / q_blocks;
        const int q0 = int(task % q_blocks) * kQueryBlock;
        block(a, KeySource{a, rh, n_hist}, rh, q0, std::min(kQueryBlock, a.lq - q0), scratch);
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
