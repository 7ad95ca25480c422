// attention: out[r,h,i,:] = softmax_j(scale * q[r,h,i,:] . key_j) . value_j over the keys
// [history (optionally gathered through gather[r,h,:]) ‖ current], plus the optional window logits/lse.
// Shapes (named dims): q/out [R,H,Lq,D], hist [R,H,Hcap,D], gather [R,H,G], cur [R,H,Lc,D],
// window_logits [R,H,W,N], window_lse [R,H,W], with N = n_hist + Lc keys and n_hist = G or hist_len.
// Cost: 4*R*H*Lq*N*D FLOP; bytes ~ (2*Lq + 2*N*ceil(Lq/BQ))*R*H*D*dsize.
//
// Kernels, in launch order:
//   attention_validate_kernel  gather values in [0, hist_len), window rows in [0, Lq); else status
//                              index_out_of_range (atomicCAS from 0) and every later kernel returns early.
//   attention_mma_kernel<D,NW> bf16, D = 64 or 128. Grid (ceil(Lq/BQ), H, R), NW warps, BQ = 16*NW query
//                              rows (NW = 4 -> 64, NW = 8 -> 128 when Lq >= 1024), key tile BK = 64.
//                              Smem: Q [BQ][D] + K [2][BK][D] + V [2][BK][D] bf16 = (BQ + 256)*D*2 bytes
//                              (D=128: 80 KiB / 96 KiB; D=64: 40 / 48 KiB). Each warp owns 16 query rows:
//                              S = Q K^T with mma.m16n8k16 (Q fragments from ldmatrix, K fragments from
//                              ldmatrix: K rows [key][d] are exactly the "col" B operand), online softmax in f32
//                              on the accumulators (exp2 with log2(e) folded into the scale), then O += P V
//                              with P re-packed from the accumulators as the A operand (same lanes, no
//                              shuffle) and V fragments from ldmatrix.trans. K/V tiles arrive by cp.async 16 B,
//                              double buffered: tile t+1 is in flight while tile t is multiplied. The gather
//                              happens per K/V row in the cp.async source address. Keys past N and query rows
//                              past Lq are zero-filled (src_bytes 0); logits of keys past N are -inf.
//                              Smem rows are XOR-swizzled in 16-byte chunks (chunk ^ (row & 7)) so the 8 row
//                              addresses of every ldmatrix phase hit 8 distinct bank groups.
//   attention_simt_kernel<T,DV> f32 (exact path), and bf16 when D is not 64/128 or a tensor is not 16-byte
//                              aligned (cp.async needs it; allocations are 256-aligned), any D <= 256. Grid
//                              (ceil(Lq/16), H, R), 4 warps x 4 query rows, key tile 32 (one key per lane for
//                              the logits, then p_j broadcast by shuffle for P V with lane = d). Smem f32:
//                              Q [16][D] + K [32][D+1] (padded: lane j reads row j conflict-free) + V [32][D].
//   window_logits_kernel<T>    grid (ceil(N/32), ceil(W/16), R*H), 8 warps: 16 window queries x 32 keys per
//                              block, f32 FMA. Smem Q [16][D] + K [32][D+1] f32.
//   window_lse_kernel          one block per (r,h,w): max, then sum of exp, in f32.
//
// Race freedom: every block writes only its own output rows; smem buffers are reused only after a
// __syncthreads that follows their last read (the end of each key-tile iteration), and cp.async writes
// into a buffer are waited for (wait_group) and published (__syncthreads) before any ldmatrix reads it.
#include "device_common.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

struct AttnParams {
  const void* q;
  const void* hist_k;
  const void* hist_v;
  const int32_t* gather;  // null: history rows are read in order
  const void* cur_k;
  const void* cur_v;
  void* out;
  const int32_t* window_rows;
  float* window_logits;
  float* window_lse;
  const int32_t* status;
  int heads, lq, head_dim, hist_cap, n_hist, lc, n_keys, n_gather, n_window;
  float scale;
};




// Pointer to key/value row j of the virtual sequence [history (gathered) ‖ current] of one (r, h); null
// past the end. `hist`/`cur` already point at this (r, h)'s slice.
template <typename T>
__device__ __forceinline__ const T* key_row(const AttnParams& p, const int32_t* gather_bh, const T* hist,
                                            const T* cur, int j) {
  if (j < p.n_hist) {
    const int hr = gather_bh ? __ldg(gather_bh + j) : j;
    return hist + static_cast<size_t>(hr) * p.head_dim;
  }
  if (j < p.n_keys) return cur + static_cast<size_t>(j - p.n_hist) * p.head_dim;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------------
// validation

__global__ void attention_validate_kernel(const int32_t* gather, int64_t n_gather_total, int hist_len,
                                          const int32_t* window_rows, int n_window, int lq, int32_t* status) {
  const int64_t total = n_gather_total + n_window;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < n_gather_total) {
      const int v = gather[i];
      if (v < 0 || v >= hist_len) report_status(status, StatusCode::index_out_of_range, static_cast<int32_t>(i));
    } else {
      const int v = window_rows[i - n_gather_total];
      if (v < 0 || v >= lq)
        report_status(status, StatusCode::index_out_of_range, static_cast<int32_t>(i - n_gather_total));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// bf16 tensor-core flash attention

// Element offset of 16-byte chunk `chunk` of smem row `row` in a [rows][D] bf16 tile, XOR-swizzled.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

template <int D, int NW>
__device__ __forceinline__ void load_kv_tile(const AttnParams& p, const int32_t* gather_bh, const bf16* hk,
                                             const bf16* hv, const bf16* ck, const bf16* cv, int tile, bf16* sk,
                                             bf16* sv) {
  constexpr int BK = 64, CH = D / 8, NT = 32 * NW;
  const bf16* dummy = static_cast<const bf16*>(p.q);  // any valid address for zero-fill copies
  for (int e = threadIdx.x; e < BK * CH; e += NT) {
    const int row = e / CH, c = e % CH;
    const int j = tile * BK + row;
    const bf16* kr = key_row<bf16>(p, gather_bh, hk, ck, j);
    const bf16* vr = key_row<bf16>(p, gather_bh, hv, cv, j);
    const int bytes = kr ? 16 : 0;
    skv::cp_async_16(sk + swz<D>(row, c), kr ? kr + c * 8 : dummy, bytes);
    skv::cp_async_16(sv + swz<D>(row, c), vr ? vr + c * 8 : dummy, bytes);
  }
}

template <int D, int NW>
__global__ void attention_mma_kernel(const AttnParams p) {
  constexpr int BQ = 16 * NW, BK = 64, CH = D / 8, NT = 32 * NW;
  if (p.status[0] != 0) return;  // a bad index list: write nothing
  SKV_DYNAMIC_SMEM(smem_raw);
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // [BQ][D]
  bf16* sK = sQ + BQ * D;                         // [2][BK][D]
  bf16* sV = sK + 2 * BK * D;                     // [2][BK][D]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int q0 = blockIdx.x * BQ;
  const size_t bh = static_cast<size_t>(blockIdx.z) * p.heads + blockIdx.y;
  const bf16* q = static_cast<const bf16*>(p.q) + bh * p.lq * D;
  bf16* out = static_cast<bf16*>(p.out) + bh * p.lq * D;
  const bf16* hk = static_cast<const bf16*>(p.hist_k) + bh * p.hist_cap * D;
  const bf16* hv = static_cast<const bf16*>(p.hist_v) + bh * p.hist_cap * D;
  const bf16* ck = static_cast<const bf16*>(p.cur_k) + bh * p.lc * D;
  const bf16* cv = static_cast<const bf16*>(p.cur_v) + bh * p.lc * D;
  const int32_t* gather_bh = p.gather ? p.gather + bh * p.n_gather : nullptr;
  const int n_tiles = (p.n_keys + BK - 1) / BK;
  const float sl2 = p.scale * kLog2e;

  // Fragment coordinates: g = row within an 8-row group, t = column pair; mi = which of the 4 ldmatrix
  // matrices this lane addresses, lr = the row of that matrix it addresses.
  const int g = lane >> 2, t = lane & 3, mi = lane >> 3, lr = lane & 7;

  if (n_tiles > 0) {
    for (int e = tid; e < BQ * CH; e += NT) {
      const int row = e / CH, c = e % CH, qi = q0 + row;
      skv::cp_async_16(sQ + swz<D>(row, c), qi < p.lq ? q + static_cast<size_t>(qi) * D + c * 8 : q,
                       qi < p.lq ? 16 : 0);
    }
    load_kv_tile<D, NW>(p, gather_bh, hk, hv, ck, cv, 0, sK, sV);
    skv::cp_async_commit();
  }

  float m_run[2] = {-INFINITY, -INFINITY};  // running max of rows g and g+8, log2 domain
  float l_run[2] = {0.0f, 0.0f};            // this lane's partial row sums (its columns only)
  float o[D / 8][4];                        // O accumulators: 16 rows x D, D/8 n-blocks of 8
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  uint32_t qf[D / 16][4];  // Q as A fragments, loaded once

  for (int kt = 0; kt < n_tiles; ++kt) {
    const int buf = kt & 1;
    if (kt + 1 < n_tiles) {
      // The buffer buf^1 was last read in iteration kt-1, which ended with __syncthreads.
      load_kv_tile<D, NW>(p, gather_bh, hk, hv, ck, cv, kt + 1, sK + (buf ^ 1) * BK * D, sV + (buf ^ 1) * BK * D);
      skv::cp_async_commit();
      skv::cp_async_wait<1>();  // everything but the newest group (tile kt+1) has landed
    } else {
      skv::cp_async_wait<0>();
    }
    __syncthreads();  // publish every thread's cp.async writes of tile kt (and Q)

    if (kt == 0) {
      // A operand 16x16: a0 = rows 0-7 / k 0-7, a1 = rows 8-15 / k 0-7, a2 = rows 0-7 / k 8-15, a3 = rows 8-15 / k 8-15.
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        skv::ldmatrix_x4(qf[kk], sQ + swz<D>(warp * 16 + (mi & 1) * 8 + lr, 2 * kk + (mi >> 1)));
    }

    // S = Q K^T for this warp's 16 rows x 64 keys: 8 n-blocks of 8 keys.
    const bf16* ks = sK + buf * BK * D;
    float s[BK / 8][4];
#pragma unroll
    for (int i = 0; i < BK / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nb2 = 0; nb2 < BK / 16; ++nb2) {
        // B operand (k = d, n = key): b0 = keys 0-7 / d 0-7, b1 = keys 0-7 / d 8-15 for n-block 2*nb2;
        // b2, b3 the same for keys 8-15 (n-block 2*nb2+1). K rows are [key][d], so no transpose.
        uint32_t b[4];
        skv::ldmatrix_x4(b, ks + swz<D>(nb2 * 16 + (mi >> 1) * 8 + lr, 2 * kk + (mi & 1)));
        skv::mma_m16n8k16_bf16(s[2 * nb2], qf[kk], b, s[2 * nb2]);
        skv::mma_m16n8k16_bf16(s[2 * nb2 + 1], qf[kk], b + 2, s[2 * nb2 + 1]);
      }
    }

    // Scale into the log2 domain, mask keys past the end, then the online softmax update. Lane holds
    // s[nb][0..1] = (row g, keys nb*8 + 2t, +1) and s[nb][2..3] = (row g+8, same keys).
    const int key0 = kt * BK;
#pragma unroll
    for (int nb = 0; nb < BK / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nb * 8 + 2 * t + (e & 1);
        s[nb][e] = key < p.n_keys ? s[nb][e] * sl2 : -INFINITY;
      }
    }
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < BK / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * hr], s[nb][2 * hr + 1]));
      // The 4 lanes of a quad (same g) hold the 64 columns of the row between them.
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[hr], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // never -inf - -inf
      const float alpha = exp2f(m_run[hr] - m_use);             // 0 on the first tile
      float sum = 0.0f;
#pragma unroll
      for (int nb = 0; nb < BK / 8; ++nb) {
        s[nb][2 * hr] = exp2f(s[nb][2 * hr] - m_use);
        s[nb][2 * hr + 1] = exp2f(s[nb][2 * hr + 1] - m_use);
        sum += s[nb][2 * hr] + s[nb][2 * hr + 1];
      }
      l_run[hr] = l_run[hr] * alpha + sum;
      m_run[hr] = m_new;
#pragma unroll
      for (int db = 0; db < D / 8; ++db) {
        o[db][2 * hr] *= alpha;
        o[db][2 * hr + 1] *= alpha;
      }
    }

    // O += P V. The accumulator layout of S n-blocks 2kk2 and 2kk2+1 is exactly the A layout of the
    // 16x16 P block over keys 16kk2..16kk2+15: a0 = (g, 2t..), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
    // a3 = (g+8, 2t+8..). V rows are [key][d] but B wants (k = key, n = d) per lane, hence .trans.
    const bf16* vs = sV + buf * BK * D;
#pragma unroll
    for (int kk2 = 0; kk2 < BK / 16; ++kk2) {
      uint32_t a[4];
      a[0] = skv::pack_bf16x2(s[2 * kk2][0], s[2 * kk2][1]);
      a[1] = skv::pack_bf16x2(s[2 * kk2][2], s[2 * kk2][3]);
      a[2] = skv::pack_bf16x2(s[2 * kk2 + 1][0], s[2 * kk2 + 1][1]);
      a[3] = skv::pack_bf16x2(s[2 * kk2 + 1][2], s[2 * kk2 + 1][3]);
#pragma unroll
      for (int db2 = 0; db2 < D / 16; ++db2) {
        // b0 = keys 0-7 / d-chunk 2db2, b1 = keys 8-15 / same chunk (n-block 2db2); b2, b3 for chunk 2db2+1.
        uint32_t b[4];
        skv::ldmatrix_x4_trans(b, vs + swz<D>(kk2 * 16 + (mi & 1) * 8 + lr, 2 * db2 + (mi >> 1)));
        skv::mma_m16n8k16_bf16(o[2 * db2], a, b, o[2 * db2]);
        skv::mma_m16n8k16_bf16(o[2 * db2 + 1], a, b + 2, o[2 * db2 + 1]);
      }
    }
    __syncthreads();  // every warp is done with buffer buf before iteration kt+1 refills it
  }

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = l_run[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no keys at all: zeros, as the CPU backend
    const int row = q0 + warp * 16 + g + 8 * hr;
    if (row < p.lq) {
#pragma unroll
      for (int db = 0; db < D / 8; ++db) {
        *reinterpret_cast<__nv_bfloat162*>(out + static_cast<size_t>(row) * D + db * 8 + 2 * t) =
            __floats2bfloat162_rn(o[db][2 * hr] * inv, o[db][2 * hr + 1] * inv);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// SIMT flash attention (f32 exact path; bf16 with other head dims)

constexpr int kSimtWarps = 4, kSimtRowsPerWarp = 4, kSimtQT = kSimtWarps * kSimtRowsPerWarp, kSimtKT = 32;

// Loads key/value rows [tile*32, tile*32+32) as f32 into sK [32][D+1] and sV [32][D]; zeros past the end.
template <typename T>
__device__ __forceinline__ void load_kv_f32(const AttnParams& p, const int32_t* gather_bh, const T* hk, const T* hv,
                                            const T* ck, const T* cv, int tile, float* sK, float* sV, int nt) {
  const int D = p.head_dim;
  for (int e = threadIdx.x; e < kSimtKT * D; e += nt) {
    const int row = e / D, d = e % D, j = tile * kSimtKT + row;
    const T* kr = key_row<T>(p, gather_bh, hk, ck, j);
    const T* vr = key_row<T>(p, gather_bh, hv, cv, j);
    sK[row * (D + 1) + d] = kr ? to_f32(kr[d]) : 0.0f;
    if (sV) sV[e] = vr ? to_f32(vr[d]) : 0.0f;
  }
}

template <typename T, int DV>  // DV: 32-wide slices of the head dim per lane, D <= 32 * DV
__global__ void attention_simt_kernel(const AttnParams p) {
  constexpr int RPW = kSimtRowsPerWarp, NT = 32 * kSimtWarps;
  if (p.status[0] != 0) return;
  SKV_DYNAMIC_SMEM(smem_raw);
  const int D = p.head_dim;
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [16][D]
  float* sK = sQ + kSimtQT * D;                     // [32][D+1]
  float* sV = sK + kSimtKT * (D + 1);               // [32][D]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int q0 = blockIdx.x * kSimtQT;
  const size_t bh = static_cast<size_t>(blockIdx.z) * p.heads + blockIdx.y;
  const T* q = static_cast<const T*>(p.q) + bh * p.lq * D;
  T* out = static_cast<T*>(p.out) + bh * p.lq * D;
  const T* hk = static_cast<const T*>(p.hist_k) + bh * p.hist_cap * D;
  const T* hv = static_cast<const T*>(p.hist_v) + bh * p.hist_cap * D;
  const T* ck = static_cast<const T*>(p.cur_k) + bh * p.lc * D;
  const T* cv = static_cast<const T*>(p.cur_v) + bh * p.lc * D;
  const int32_t* gather_bh = p.gather ? p.gather + bh * p.n_gather : nullptr;

  for (int e = tid; e < kSimtQT * D; e += NT) {
    const int qi = q0 + e / D;
    sQ[e] = qi < p.lq ? to_f32(q[static_cast<size_t>(qi) * D + e % D]) : 0.0f;
  }

  float m_run[RPW], l_run[RPW], o[RPW][DV];
#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    m_run[rr] = -INFINITY;
    l_run[rr] = 0.0f;  // this lane's partial sum
#pragma unroll
    for (int i = 0; i < DV; ++i) o[rr][i] = 0.0f;
  }
  const float* qw = sQ + warp * RPW * D;

  const int n_tiles = (p.n_keys + kSimtKT - 1) / kSimtKT;
  for (int kt = 0; kt < n_tiles; ++kt) {
    load_kv_f32<T>(p, gather_bh, hk, hv, ck, cv, kt, sK, sV, NT);
    __syncthreads();

    // Logits: lane = key. sQ reads are broadcasts; sK rows are padded to D+1 (D+1 odd: distinct banks).
    float s[RPW];
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) s[rr] = 0.0f;
    const float* krow = sK + lane * (D + 1);
    for (int d = 0; d < D; ++d) {
      const float kd = krow[d];
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) s[rr] += qw[rr * D + d] * kd;  // contracted to FMA
    }
    const bool valid = kt * kSimtKT + lane < p.n_keys;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
      const float x = valid ? s[rr] * p.scale : -INFINITY;
      const float m_new = fmaxf(m_run[rr], warp_max(x));
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m_run[rr] - m_use);
      s[rr] = expf(x - m_use);
      l_run[rr] = l_run[rr] * alpha + s[rr];
      m_run[rr] = m_new;
#pragma unroll
      for (int i = 0; i < DV; ++i) o[rr][i] *= alpha;
    }
    // P V: lane = d; p_j broadcast from lane j.
    for (int j = 0; j < kSimtKT; ++j) {
      float pj[RPW];
#pragma unroll
      for (int rr = 0; rr < RPW; ++rr) pj[rr] = __shfl_sync(0xffffffffu, s[rr], j);
#pragma unroll
      for (int i = 0; i < DV; ++i) {
        const int d = lane + 32 * i;
        if (d < D) {
          const float v = sV[j * D + d];
#pragma unroll
          for (int rr = 0; rr < RPW; ++rr) o[rr][i] += pj[rr] * v;
        }
      }
    }
    __syncthreads();  // all reads of sK/sV done before the next tile overwrites them
  }

#pragma unroll
  for (int rr = 0; rr < RPW; ++rr) {
    const float l = warp_sum(l_run[rr]);
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    const int row = q0 + warp * RPW + rr;
    if (row < p.lq) {
#pragma unroll
      for (int i = 0; i < DV; ++i) {
        const int d = lane + 32 * i;
        if (d < D) out[static_cast<size_t>(row) * D + d] = from_f32<T>(o[rr][i] * inv);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// window logits and their log-sum-exp

constexpr int kWinQ = 16, kWinK = 32, kWinWarps = 8;

template <typename T>
__global__ void window_logits_kernel(const AttnParams p) {
  if (p.status[0] != 0) return;
  SKV_DYNAMIC_SMEM(smem_raw);
  const int D = p.head_dim;
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [16][D]
  float* sK = sQ + kWinQ * D;                       // [32][D+1]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int j0 = blockIdx.x * kWinK, w0 = blockIdx.y * kWinQ;
  const size_t bh = blockIdx.z;
  const T* q = static_cast<const T*>(p.q) + bh * p.lq * D;
  const T* hk = static_cast<const T*>(p.hist_k) + bh * p.hist_cap * D;
  const T* ck = static_cast<const T*>(p.cur_k) + bh * p.lc * D;
  const int32_t* gather_bh = p.gather ? p.gather + bh * p.n_gather : nullptr;

  for (int e = tid; e < kWinQ * D; e += kWinWarps * 32) {
    const int w = w0 + e / D;
    sQ[e] = w < p.n_window ? to_f32(q[static_cast<size_t>(p.window_rows[w]) * D + e % D]) : 0.0f;
  }
  load_kv_f32<T>(p, gather_bh, hk, hk, ck, ck, blockIdx.x, sK, nullptr, kWinWarps * 32);
  __syncthreads();

  // Warp `warp` computes windows warp and warp+8 against key lane.
  constexpr int WPW = kWinQ / kWinWarps;
  float acc[WPW];
#pragma unroll
  for (int i = 0; i < WPW; ++i) acc[i] = 0.0f;
  const float* krow = sK + lane * (D + 1);
  for (int d = 0; d < D; ++d) {
    const float kd = krow[d];
#pragma unroll
    for (int i = 0; i < WPW; ++i) acc[i] += sQ[(warp + kWinWarps * i) * D + d] * kd;
  }
  const int j = j0 + lane;
#pragma unroll
  for (int i = 0; i < WPW; ++i) {
    const int w = w0 + warp + kWinWarps * i;
    if (w < p.n_window && j < p.n_keys)
      p.window_logits[(bh * p.n_window + w) * p.n_keys + j] = p.scale * acc[i];
  }
}

__global__ void window_lse_kernel(const AttnParams p) {
  if (p.status[0] != 0) return;
  SKV_DYNAMIC_SMEM(smem_raw);
  float* red = reinterpret_cast<float*>(smem_raw);  // [32] warp partials
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nwarps = blockDim.x / 32;
  const float* row = p.window_logits + static_cast<size_t>(blockIdx.x) * p.n_keys;

  float mx = -INFINITY;
  for (int j = tid; j < p.n_keys; j += blockDim.x) mx = fmaxf(mx, row[j]);
  mx = warp_max(mx);
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int i = 0; i < nwarps; ++i) mx = fmaxf(mx, red[i]);
  __syncthreads();  // red is reused below

  float sum = 0.0f;
  if (mx != -INFINITY)
    for (int j = tid; j < p.n_keys; j += blockDim.x) sum += expf(row[j] - mx);
  sum = warp_sum(sum);
  if (lane == 0) red[warp] = sum;
  __syncthreads();
  if (tid == 0) {
    float total = 0.0f;
    for (int i = 0; i < nwarps; ++i) total += red[i];
    p.window_lse[blockIdx.x] = mx == -INFINITY ? -INFINITY : mx + logf(total);
  }
}

// ---------------------------------------------------------------------------------------------------------
// launchers

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, std::string("attention: ") + what + ": CUDA error " + std::to_string(static_cast<int>(err)));
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
        "cudaFuncSetAttribute(max dynamic shared memory)");
}

template <int D, int NW>
void launch_mma(const AttnParams& p, int rows, cudaStream_t stream) {
  constexpr int BQ = 16 * NW;
  const size_t smem = static_cast<size_t>(BQ + 4 * 64) * D * sizeof(bf16);
  auto kernel = attention_mma_kernel<D, NW>;
  set_smem(kernel, smem);
  const dim3 grid((p.lq + BQ - 1) / BQ, p.heads, rows);
  SKV_LAUNCH(kernel, grid, dim3(32 * NW), smem, stream, p);
}

template <typename T, int DV>
void launch_simt(const AttnParams& p, int rows, cudaStream_t stream) {
  const int D = p.head_dim;
  const size_t smem = static_cast<size_t>(kSimtQT * D + kSimtKT * (D + 1) + kSimtKT * D) * sizeof(float);
  auto kernel = attention_simt_kernel<T, DV>;
  set_smem(kernel, smem);
  const dim3 grid((p.lq + kSimtQT - 1) / kSimtQT, p.heads, rows);
  SKV_LAUNCH(kernel, grid, dim3(32 * kSimtWarps), smem, stream, p);
}

template <typename T>
void launch_simt_dispatch(const AttnParams& p, int rows, cudaStream_t stream) {
  if (p.head_dim <= 64) launch_simt<T, 2>(p, rows, stream);
  else if (p.head_dim <= 128) launch_simt<T, 4>(p, rows, stream);
  else launch_simt<T, 8>(p, rows, stream);
}

template <typename T>
void launch_window(const AttnParams& p, int rows, cudaStream_t stream) {
  const int D = p.head_dim;
  const size_t smem = static_cast<size_t>(kWinQ * D + kWinK * (D + 1)) * sizeof(float);
  auto kernel = window_logits_kernel<T>;
  set_smem(kernel, smem);
  const dim3 grid((p.n_keys + kWinK - 1) / kWinK, (p.n_window + kWinQ - 1) / kWinQ, rows * p.heads);
  SKV_LAUNCH(kernel, grid, dim3(32 * kWinWarps), smem, stream, p);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace

size_t attention_workspace_bytes(const AttentionArgs&) { return 0; }

void attention(const AttentionArgs& a, cudaStream_t stream, int32_t* status, void* /*workspace*/) {
  if (a.dtype != DType::f32 && a.dtype != DType::bf16)
    throw BackendError(StatusCode::internal, std::string("attention: unsupported dtype ") + dtype_name(a.dtype));
  if (a.head_dim <= 0 || a.head_dim > 256)
    throw BackendError(StatusCode::internal,
                       "attention: head_dim " + std::to_string(a.head_dim) + " is outside [1, 256]");
  if (a.heads > 65535 || a.rows > 65535)
    throw BackendError(StatusCode::internal, "attention: rows and heads must each be at most 65535");
  const int64_t pairs = static_cast<int64_t>(a.rows) * a.heads;
  if (pairs == 0) return;

  AttnParams p{};
  p.q = a.q;
  p.hist_k = a.hist_k;
  p.hist_v = a.hist_v;
  p.gather = a.gather;
  p.cur_k = a.cur_k;
  p.cur_v = a.cur_v;
  p.out = a.out;
  p.window_rows = a.window_rows;
  p.window_logits = a.window_logits;
  p.window_lse = a.window_lse;
  p.status = status;
  p.heads = a.heads;
  p.lq = a.lq;
  p.head_dim = a.head_dim;
  p.hist_cap = a.hist_cap;
  p.n_hist = a.gather ? a.n_gather : a.hist_len;
  p.lc = a.lc;
  p.n_keys = a.n_keys();
  p.n_gather = a.n_gather;
  p.n_window = a.window_logits ? a.n_window : 0;
  p.scale = a.scale;

  // 1. Validate the index lists on the device; the kernels below return early if anything is wrong.
  const int64_t n_gather_total = a.gather ? pairs * a.n_gather : 0;
  const int n_window_rows = a.window_rows ? a.n_window : 0;
  const int64_t n_check = n_gather_total + n_window_rows;
  if (n_check > 0) {
    const int blocks = static_cast<int>(n_check / 256 + 1 < 1024 ? n_check / 256 + 1 : 1024);
    SKV_LAUNCH(attention_validate_kernel, dim3(blocks), dim3(256), 0, stream, a.gather, n_gather_total,
               a.hist_len, a.window_rows, n_window_rows, a.lq, status);
    check(cudaGetLastError(), "validate launch");
  }

  // 2. Attention output.
  if (a.out && a.lq > 0) {
    const bool tensor_cores = a.dtype == DType::bf16 && (a.head_dim == 64 || a.head_dim == 128) &&
                              aligned16(a.q) && aligned16(a.hist_k) && aligned16(a.hist_v) &&
                              aligned16(a.cur_k) && aligned16(a.cur_v) && aligned16(a.out);
    if (tensor_cores) {
      const bool big = a.lq >= 1024;  // 128-row query tiles halve K/V traffic once there are enough blocks
      if (a.head_dim == 64) big ? launch_mma<64, 8>(p, a.rows, stream) : launch_mma<64, 4>(p, a.rows, stream);
      else big ? launch_mma<128, 8>(p, a.rows, stream) : launch_mma<128, 4>(p, a.rows, stream);
    } else if (a.dtype == DType::bf16) {
      launch_simt_dispatch<bf16>(p, a.rows, stream);
    } else {
      launch_simt_dispatch<float>(p, a.rows, stream);
    }
    check(cudaGetLastError(), "attention kernel launch");
  }

  // 3. Window logits (and their log-sum-exp).
  if (p.n_window > 0 && p.n_keys > 0) {
    if ((p.n_window + kWinQ - 1) / kWinQ > 65535 || pairs > 65535)
      throw BackendError(StatusCode::internal, "attention: too many window rows or (row, head) pairs");
    if (a.dtype == DType::bf16) launch_window<bf16>(p, a.rows, stream);
    else launch_window<float>(p, a.rows, stream);
    check(cudaGetLastError(), "window logits launch");
  }
  if (p.n_window > 0 && a.window_lse) {
    // With no keys at all the lse kernel writes -inf (the max stays -inf), as the CPU backend does.
    SKV_LAUNCH(window_lse_kernel, dim3(static_cast<unsigned>(pairs * p.n_window)), dim3(256),
               32 * sizeof(float), stream, p);
    check(cudaGetLastError(), "window lse launch");
  }
}

}  // namespace scalekv::cuda_ops
