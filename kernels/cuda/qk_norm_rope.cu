// qk_norm_rope: per (b, l, h) one warp splits q/k/v [c] out of qkv [B, L, 3, H, c], adds the biases,
// L2-normalises q and k (x / max(|x|, 1e-12), the norm by a warp sum) and scales q by
// exp(min(scale_mul[h], ln 100)), rotates adjacent pairs (2p, 2p+1) by theta = pos * inv_freq[p mod c/4]
// (pos = y for the first c/4 pairs, x after; inv_freq in f32 as torch builds it, accurate sinf/cosf), and
// stores q [B,H,L,c] and k/v at token kv_offset + l of the pool [P,H,T,c], row kv_page_row(kv_pages, H, b, h,
// kv_offset + l) (backend.h; without a page table P = B and T = cap). Lane j owns pairs j, j+32, .. (c <= 256).
// An 8-bit pool (kv_format int8/fp8, kv_quant.h) gets each token quantised by its warp: the K and V rows' largest
// magnitudes by warp maxes, the codes by each lane for its own elements, the token's scale byte by lane 0.
// Cost: ~12*B*L*H*c FLOP + B*L*H*c/2 sin/cos pairs; reads 3 and writes 3 c-vectors per (b, l, h).
// With a page table, kv_pages_validate_kernel first checks the entries covering [kv_offset, kv_offset + L) of
// every batch row against [0, P); a bad one is reported as index_out_of_range (detail: its flat index in the
// table) and the main kernel then writes nothing at all, q included, as after any earlier op's data error.
#include <algorithm>

#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kWarps = 4, kMaxPairsPerLane = 4;  // c / 2 <= 128 pairs

__device__ __forceinline__ float magnitude(float x) { return x != x ? INFINITY : fabsf(x); }  // NaN: infinite

// Loads and transforms q or k (at `src` of qkv) of the warp's (b, l, h): this lane's pairs in x0 / x1.
__device__ void norm_rope(const QkNormRopeArgs& a, int64_t src, const float* bias, float mul, float pos_y,
                          float pos_x, float (&x0)[kMaxPairsPerLane], float (&x1)[kMaxPairsPerLane]) {
  const int lane = threadIdx.x % 32, pairs = a.head_dim / 2, quarter = a.head_dim / 4;
  float sq = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxPairsPerLane; ++j) {
    const int p = lane + 32 * j;
    x0[j] = x1[j] = 0.0f;
    if (p < pairs) {
      x0[j] = tx::load_f32(a.qkv, a.qkv_dtype, src + 2 * p);
      x1[j] = tx::load_f32(a.qkv, a.qkv_dtype, src + 2 * p + 1);
      if (bias) {
        x0[j] += bias[2 * p];
        x1[j] += bias[2 * p + 1];
      }
      sq += x0[j] * x0[j] + x1[j] * x1[j];
    }
  }
  if (a.normalize) {
    const float denom = fmaxf(sqrtf(warp_sum(sq)), 1e-12f);
#pragma unroll
    for (int j = 0; j < kMaxPairsPerLane; ++j) {
      x0[j] = x0[j] / denom * mul;
      x1[j] = x1[j] / denom * mul;
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxPairsPerLane; ++j) {
    const int p = lane + 32 * j;
    if (p >= pairs || !a.positions) continue;
    const int i = p % quarter;
    const float inv_freq = 1.0f / powf(10000.0f, static_cast<float>(2 * i) / static_cast<float>(pairs));
    const float theta = (p < quarter ? pos_y : pos_x) * inv_freq;
    const float cs = cosf(theta), sn = sinf(theta);
    const float y0 = x0[j] * cs - x1[j] * sn;
    x1[j] = x1[j] * cs + x0[j] * sn;
    x0[j] = y0;
  }
}

__device__ void store_pairs(void* out, DType dtype, int64_t dst, int pairs, const float (&x0)[kMaxPairsPerLane],
                            const float (&x1)[kMaxPairsPerLane]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kMaxPairsPerLane; ++j) {
    const int p = lane + 32 * j;
    if (p >= pairs) continue;
    tx::store_f32(out, dtype, dst + 2 * p, x0[j]);
    tx::store_f32(out, dtype, dst + 2 * p + 1, x1[j]);
  }
}

// Entries [first_page, first_page + n_pages) of every batch row.
__global__ void kv_pages_validate_kernel(KvPages pages, int batch, int first_page, int n_pages, int32_t* status) {
  const int64_t total = static_cast<int64_t>(batch) * n_pages;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t entry = i / n_pages * pages.table_pages + first_page + i % n_pages;
    const int v = pages.table[entry];
    if (v < 0 || v >= pages.pages) report_status(status, StatusCode::index_out_of_range, static_cast<int32_t>(entry));
  }
}

// status: null without a page table (nothing to check, nothing to wait for).
__global__ void __launch_bounds__(32 * kWarps) qk_norm_rope_kernel(const QkNormRopeArgs a, float ln100,
                                                                   const int32_t* status) {
  if (status && status[0] != 0) return;  // a bad page table (or an earlier op's error): write nothing
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;  // (b, l, h), h fastest
  if (item >= static_cast<int64_t>(a.batch) * a.tokens * a.heads) return;  // whole warps: shuffles stay full
  const int H = a.heads, c = a.head_dim, L = a.tokens, lane = threadIdx.x % 32;
  const int h = static_cast<int>(item % H);
  const int64_t bl = item / H;
  const int l = static_cast<int>(bl % L);
  const int64_t b = bl / L;
  const float pos_y = a.positions ? static_cast<float>(a.positions[2 * l]) : 0.0f;
  const float pos_x = a.positions ? static_cast<float>(a.positions[2 * l + 1]) : 0.0f;
  const int64_t src = (bl * 3 * H + h) * c;  // q; k is H*c later, v 2*H*c later
  const int64_t q_dst = ((b * H + h) * L + l) * c;
  const int64_t kv_dst = a.k ? kv_page_row(a.kv_pages, H, static_cast<int>(b), h, a.kv_offset + l) * c : 0;
  const float mul = a.scale_mul ? expf(fminf(a.scale_mul[h], ln100)) : 1.0f;
  const int pairs = c / 2;
  float x0[kMaxPairsPerLane], x1[kMaxPairsPerLane];
  norm_rope(a, src, a.q_bias ? a.q_bias + h * c : nullptr, mul, pos_y, pos_x, x0, x1);
  store_pairs(a.q, a.q_dtype, q_dst, pairs, x0, x1);
  if (!a.k) return;  // q only (uniform over the launch, so the warp stays whole)
  norm_rope(a, src + static_cast<int64_t>(H) * c, nullptr, 1.0f, pos_y, pos_x, x0, x1);
  constexpr int kMaxPerLane = 2 * kMaxPairsPerLane;
  float v[kMaxPerLane];
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int d = lane + 32 * j;
    v[j] = 0.0f;
    if (d >= c) continue;
    v[j] = tx::load_f32(a.qkv, a.qkv_dtype, src + 2 * static_cast<int64_t>(H) * c + d);
    if (a.v_bias) v[j] += a.v_bias[h * c + d];
  }
  if (a.kv_format == KvFormat::plain) {
    store_pairs(a.k, a.kv_dtype, kv_dst, pairs, x0, x1);
#pragma unroll
    for (int j = 0; j < kMaxPerLane; ++j)
      if (lane + 32 * j < c) tx::store_f32(a.v, a.kv_dtype, kv_dst + lane + 32 * j, v[j]);
    return;
  }
  // 8-bit: the token's scale byte from the warp's largest K and V magnitudes (padding lanes hold zeros).
  float k_amax = 0.0f, v_amax = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxPairsPerLane; ++j) k_amax = fmaxf(k_amax, fmaxf(magnitude(x0[j]), magnitude(x1[j])));
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) v_amax = fmaxf(v_amax, magnitude(v[j]));
  const uint8_t scale = kv_scale_byte(warp_max(k_amax), warp_max(v_amax));
  if (lane == 0) a.scales[kv_dst / c] = scale;
  const float k_inv = kv_key_inv_scale(a.kv_format, scale), v_inv = kv_value_inv_scale(a.kv_format, scale);
  uint8_t* k_codes = static_cast<uint8_t*>(a.k);
  uint8_t* v_codes = static_cast<uint8_t*>(a.v);
#pragma unroll
  for (int j = 0; j < kMaxPairsPerLane; ++j) {
    const int p = lane + 32 * j;
    if (p >= pairs) continue;
    k_codes[kv_dst + 2 * p] = kv_encode(a.kv_format, x0[j], k_inv);
    k_codes[kv_dst + 2 * p + 1] = kv_encode(a.kv_format, x1[j], k_inv);
  }
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j)
    if (lane + 32 * j < c) v_codes[kv_dst + lane + 32 * j] = kv_encode(a.kv_format, v[j], v_inv);
}

}  // namespace

void qk_norm_rope(const QkNormRopeArgs& a, cudaStream_t stream, int32_t* status) {
  const int64_t items = static_cast<int64_t>(a.batch) * a.tokens * a.heads;
  if (items == 0) return;
  if (a.head_dim > 2 * 32 * kMaxPairsPerLane)
    throw BackendError(StatusCode::internal, "qkNormRope: headDim " + std::to_string(a.head_dim) + " exceeds 256");
  const int64_t blocks = (items + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) throw BackendError(StatusCode::internal, "qkNormRope: too many tokens");
  const bool paged = a.k && a.kv_pages.table;
  if (paged) {
    const int first_page = a.kv_offset / a.kv_pages.page_tokens;
    const int n_pages = (a.kv_offset + a.tokens - 1) / a.kv_pages.page_tokens - first_page + 1;
    const int64_t checks = static_cast<int64_t>(a.batch) * n_pages;
    SKV_LAUNCH(kv_pages_validate_kernel, dim3(static_cast<unsigned>(std::min<int64_t>(checks / 256 + 1, 1024))),
               dim3(256), 0, stream, a.kv_pages, a.batch, first_page, n_pages, status);
    tx::check_launch("qkNormRope page-table check");
  }
  SKV_LAUNCH(qk_norm_rope_kernel, dim3(static_cast<unsigned>(blocks)), dim3(32 * kWarps), 0, stream, a,
             logf(100.0f), paged ? static_cast<const int32_t*>(status) : nullptr);
  tx::check_launch("qkNormRope");
}

}  // namespace scalekv::cuda_ops
