// The CPU's flash attention body (attention.cc, segment_attention.cc): for a block of at most kQueryBlock query
// rows, stream the keys in tiles of kKeyTile with a running max and sum per query (online softmax), so nothing of
// size queries x keys is materialised.
//
// Per key tile the K rows are staged transposed ([Dp][kKeyTile] f32) and V as rows ([kKeyTile][Dp]), Dp = head_dim
// rounded up to kLanes with zeros. Both products are register-blocked: scores as 4 queries x 32 keys and P V as 4
// queries x 32 channels, 8 vector accumulators over a fixed-size inner loop that the compiler keeps in registers.
// exp is vector_math.h's branch-free polynomial, so the softmax vectorises as well. Callers compile the body once
// per instruction-set level (isa.h).
//
// `Rows` says where the rows are: head_dim(), scale(), keys() (how many), load_query(i, dst), load_key(j, k, v)
// (f32, head_dim values each), bias(i, j) (added to the scaled score; a constant 0 folds away) and store(i, o).
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "isa.h"
#include "vector_math.h"

namespace scalekv::cpu {

constexpr int kQueryBlock = 128;  // query rows per call (a multiple of kQueryTile): K/V tiles staged once serve them all
constexpr int kKeyTile = 64;      // keys per tile, a multiple of kLanes
constexpr int kQueryTile = 4;     // register tile: queries
constexpr int kLanes = 32;        // register tile: keys (scores) or channels (P V)

// Scratch of one task, sized for head_dim rounded up to kLanes. `key` stages one K row before it is transposed
// (V rows load straight into `v`).
struct Scratch {
  int dp;
  std::vector<float> q, kt, v, s, o, key;
  explicit Scratch(int d)
      : dp((d + kLanes - 1) / kLanes * kLanes), q(size_t(kQueryBlock) * dp), kt(size_t(dp) * kKeyTile),
        v(size_t(kKeyTile) * dp), s(size_t(kQueryBlock) * kKeyTile), o(size_t(kQueryBlock) * dp), key(size_t(d)) {}
};

template <class Rows>
SKV_ALWAYS_INLINE void flash_attend_rows(const Rows& src, int nq, Scratch& w) {
  const int D = src.head_dim(), Dp = w.dp;
  const int n_keys = src.keys();
  const int nq4 = (nq + kQueryTile - 1) / kQueryTile * kQueryTile;
  float m[kQueryBlock], l[kQueryBlock];
  std::fill(w.q.begin(), w.q.end(), 0.0f);
  for (int i = 0; i < nq; ++i) {
    // The softmax scale is folded into q once.
    float* qi = w.q.data() + size_t(i) * Dp;
    src.load_query(i, qi);
    for (int d = 0; d < D; ++d) qi[d] *= src.scale();
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
            w.s[size_t(i0 + ii) * kKeyTile + t0 + tt] =
                t0 + tt < nk ? acc[ii][tt] + src.bias(i0 + ii, j0 + t0 + tt) : -std::numeric_limits<float>::infinity();
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
    src.store(i, oi);
  }
}

}  // namespace scalekv::cpu
