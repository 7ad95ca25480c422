// The CPU's flash attention body (attention.cc, segment_attention.cc, cross_attention.cc): for a block of at most kQueryBlock query
// rows, stream the keys in tiles of kKeyTile with a running max and sum per query (online softmax), so nothing of
// size queries x keys is materialised.
//
// The scores are computed transposed, S^T = K Q^T, with Q^T staged once per block ([Dp][kQueryBlock], scaled):
// K and V tiles are then plain rows ([kKeyTile][Dp] f32, converted from the cache's dtype), nothing is transposed
// per key tile, and the online softmax runs across queries in vector lanes (a column max, exp and sum per key row).
// Both products are register-blocked (keys x queries for S^T, queries x channels for P V) with tile widths in
// vectors of the instruction-set level the caller is compiled for (isa.h), so the accumulators stay in registers.
// exp is vector_math.h's branch-free polynomial.
//
// `Rows` says where the rows are: head_dim(), scale(), keys() (how many), load_query(i, dst), load_key(j, k, v)
// (f32, head_dim values each), prefetch_key(j) (a hint a tile ahead, for rows the hardware cannot predict:
// gathered history), bias(i, j) (added to the scaled score; a constant 0 folds away) and store(i, o).
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "isa.h"
#include "vector_math.h"

namespace scalekv::cpu {

constexpr int kQueryBlock = 128;  // query rows per call: K/V tiles staged once serve them all
constexpr int kKeyTile = 64;      // keys per tile
constexpr int kChannelAlign = 16; // head_dim is padded with zeros to a multiple of this (one AVX-512 vector)

// Register tiles in floats, per vector width (16 lanes: AVX-512's 32 registers; 8: AVX2's 16; 4: baseline SSE).
template <int kVec>
struct FlashTiles {
  static constexpr int score_keys = kVec >= 16 ? 8 : 4;         // S^T rows per register tile
  static constexpr int score_queries = 2 * kVec;                // S^T columns
  static constexpr int pv_queries = 4;                          // O rows per register tile
  static constexpr int pv_channels = kVec >= 16 ? 4 * kVec : 2 * kVec;  // O columns (a narrower tail covers the rest)
  static_assert(kQueryBlock % score_queries == 0 && kQueryBlock % pv_queries == 0, "query block vs tiles");
};

// Scratch of one task, sized for head_dim padded to kChannelAlign.
struct Scratch {
  int dp;
  std::vector<float> qt, k, v, s, o, row;
  explicit Scratch(int d)
      : dp((d + kChannelAlign - 1) / kChannelAlign * kChannelAlign), qt(size_t(dp) * kQueryBlock),
        k(size_t(kKeyTile) * dp), v(size_t(kKeyTile) * dp), s(size_t(kKeyTile) * kQueryBlock),
        o(size_t(kQueryBlock) * dp), row(size_t(dp)) {}
};

// O[q0 .. q0 + kQ) x [d0, d0 + kC) += P^T[:, q] V[:, d], after scaling the accumulated O by the softmax correction.
template <int kQ, int kC>
SKV_ALWAYS_INLINE void flash_pv_tile(const float* st, const float* v, float* o, const float* correction, int q0, int d0,
                                     int Dp, int nk) {
  float acc[kQ][kC];
  for (int qq = 0; qq < kQ; ++qq)
    for (int c = 0; c < kC; ++c) acc[qq][c] = o[size_t(q0 + qq) * Dp + d0 + c] * correction[q0 + qq];
  for (int t = 0; t < nk; ++t) {
    const float* vr = v + size_t(t) * Dp + d0;
    for (int qq = 0; qq < kQ; ++qq) {
      const float p = st[size_t(t) * kQueryBlock + q0 + qq];
      for (int c = 0; c < kC; ++c) acc[qq][c] += p * vr[c];
    }
  }
  for (int qq = 0; qq < kQ; ++qq)
    for (int c = 0; c < kC; ++c) o[size_t(q0 + qq) * Dp + d0 + c] = acc[qq][c];
}

template <int kVec, class Rows>
SKV_ALWAYS_INLINE void flash_attend_rows(const Rows& src, int nq, Scratch& w) {
  using Tiles = FlashTiles<kVec>;
  constexpr int SK = Tiles::score_keys, SQ = Tiles::score_queries;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int D = src.head_dim(), Dp = w.dp;
  const int n_keys = src.keys();
  const int nqs = (nq + SQ - 1) / SQ * SQ;  // query columns of S^T computed (the padding ones are zero queries)
  const int nqp = (nq + Tiles::pv_queries - 1) / Tiles::pv_queries * Tiles::pv_queries;  // rows of O computed
  float m[kQueryBlock], l[kQueryBlock], correction[kQueryBlock];
  float* qt = w.qt.data();
  float* kb = w.k.data();
  float* vb = w.v.data();
  float* st = w.s.data();
  float* o = w.o.data();
  // Q^T, the softmax scale folded in once.
  std::fill(w.qt.begin(), w.qt.end(), 0.0f);
  for (int i = 0; i < nq; ++i) {
    src.load_query(i, w.row.data());
    for (int d = 0; d < D; ++d) qt[size_t(d) * kQueryBlock + i] = w.row[d] * src.scale();
  }
  for (int i = 0; i < nqs; ++i) {
    m[i] = kNegInf;
    l[i] = 0.0f;
  }
  std::fill(w.o.begin(), w.o.end(), 0.0f);
  std::fill(w.k.begin(), w.k.end(), 0.0f);  // the padding channels stay zero
  std::fill(w.v.begin(), w.v.end(), 0.0f);
  for (int j0 = 0; j0 < n_keys; j0 += kKeyTile) {
    const int nk = std::min(kKeyTile, n_keys - j0);
    // The next tile's rows are hinted one per row loaded here, not in a burst: a burst of hundreds of prefetches
    // fills the core's miss buffers and stalls it.
    for (int t = 0; t < nk; ++t) {
      if (j0 + kKeyTile + t < n_keys) src.prefetch_key(j0 + kKeyTile + t);
      src.load_key(j0 + t, kb + size_t(t) * Dp, vb + size_t(t) * Dp);
    }
    if (nk < kKeyTile) {  // the last tile: rows past nk are zeroed (their scores are masked below)
      std::fill(kb + size_t(nk) * Dp, kb + size_t(kKeyTile) * Dp, 0.0f);
      std::fill(vb + size_t(nk) * Dp, vb + size_t(kKeyTile) * Dp, 0.0f);
    }
    // S^T: SK keys x SQ queries per register tile, over the channels (key rows past nk up to SK are zero, masked).
    const int nks = (nk + SK - 1) / SK * SK;
    for (int c0 = 0; c0 < nqs; c0 += SQ) {
      for (int t0 = 0; t0 < nks; t0 += SK) {
        float acc[SK][SQ] = {};
        for (int d = 0; d < Dp; ++d) {
          const float* qr = qt + size_t(d) * kQueryBlock + c0;
          for (int kk = 0; kk < SK; ++kk) {
            const float kv = kb[size_t(t0 + kk) * Dp + d];
            for (int c = 0; c < SQ; ++c) acc[kk][c] += kv * qr[c];
          }
        }
        for (int kk = 0; kk < SK; ++kk) {
          float* sr = st + size_t(t0 + kk) * kQueryBlock + c0;
          if (t0 + kk < nk) {
            for (int c = 0; c < SQ; ++c) sr[c] = acc[kk][c] + src.bias(c0 + c, j0 + t0 + kk);
          } else {
            for (int c = 0; c < SQ; ++c) sr[c] = kNegInf;
          }
        }
      }
    }
    // Online softmax across the query lanes: each key row updates every query's max, then becomes weights.
    // (In chunks of one vector, so that the loops over lanes are fixed-size and vectorise.)
    for (int c0 = 0; c0 < nqs; c0 += kVec) {
      float mx[kVec], sum[kVec];
      for (int c = 0; c < kVec; ++c) mx[c] = m[c0 + c];
      for (int t = 0; t < nk; ++t) {
        const float* sr = st + size_t(t) * kQueryBlock + c0;
        for (int c = 0; c < kVec; ++c) mx[c] = std::max(mx[c], sr[c]);
      }
      for (int c = 0; c < kVec; ++c) {
        // A query whose scores so far are all -inf (a bias may mask keys) keeps a finite reference: no inf - inf.
        const float ref = mx[c] == kNegInf ? 0.0f : mx[c];
        correction[c0 + c] = exp_poly(m[c0 + c] - ref);  // 0 on the first tile
        m[c0 + c] = mx[c];
        mx[c] = ref;
        sum[c] = 0.0f;
      }
      for (int t = 0; t < nk; ++t) {
        float* sr = st + size_t(t) * kQueryBlock + c0;
        for (int c = 0; c < kVec; ++c) {
          sr[c] = exp_poly(sr[c] - mx[c]);
          sum[c] += sr[c];
        }
      }
      for (int c = 0; c < kVec; ++c) l[c0 + c] = l[c0 + c] * correction[c0 + c] + sum[c];
    }
    // P V: pv_queries x pv_channels per register tile (a kVec-wide tail when Dp is not a multiple), over the keys.
    for (int q0 = 0; q0 < nqp; q0 += Tiles::pv_queries) {
      int d0 = 0;
      for (; d0 + Tiles::pv_channels <= Dp; d0 += Tiles::pv_channels)
        flash_pv_tile<Tiles::pv_queries, Tiles::pv_channels>(st, vb, o, correction, q0, d0, Dp, nk);
      for (; d0 < Dp; d0 += kChannelAlign) flash_pv_tile<Tiles::pv_queries, kChannelAlign>(st, vb, o, correction, q0, d0, Dp, nk);
    }
  }
  for (int i = 0; i < nq; ++i) {
    float* oi = o + size_t(i) * Dp;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
    for (int d = 0; d < D; ++d) oi[d] *= inv;
    src.store(i, oi);
  }
}

}  // namespace scalekv::cpu
