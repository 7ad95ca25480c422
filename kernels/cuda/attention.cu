// attention: out[r,h,i,:] = softmax_j(scale * q[r,h,i,:] . key_j) . value_j over the keys
// [history (optionally gathered through gather[r,h,:]) ‖ current], plus the optional window logits/lse.
// Shapes (named dims): q/out [R,H,Lq,D], hist [R,H,Hcap,D] or, paged, a pool [P,H,T,D] of P pages of T tokens
// read through the page table [R,Tp], gather [R,H,G], cur [R,H,Lc,D], window_logits [R,H,W,N], window_lse
// [R,H,W], with N = n_hist + Lc keys and n_hist = G or hist_len.
// Cost: 4*R*H*Lq*N*D FLOP; bytes ~ (2*Lq + 2*N*ceil(Lq/BQ))*R*H*D*dsize (+ 8*splits*R*H*Lq*(D+2) split-KV).
//
// Kernels, in launch order:
//   attention_validate_kernel  gather values in [0, hist_len), window rows in [0, Lq), the page-table entries
//                              of the first ceil(hist_len / T) pages of every row in [0, P); else status
//                              index_out_of_range (atomicCAS from 0) and every later kernel returns early.
//   attention_pool_rows_kernel paged history only: the pool row kv_page_row(pages, H, r, h, g(j)) of every
//                              history key j of every (r, h) (g(j): the gather's logical position, or j), int32,
//                              into the workspace [R*H, n_hist]. The kernels below read a history through a
//                              list of rows per (r, h) either way: the gather (or none) into the (r, h) slab of
//                              a contiguous history, these pool rows into the pool. Resolving pages once per
//                              key and call, rather than per key tile and block, leaves the tensor-core
//                              kernel as it was: at 223-255 registers, page math in its loop spills.
//   attention_mma_kernel<D,NW> bf16, D = 64 or 128. Grid (ceil(Lq/BQ) * splits, H, R), NW warps, BQ = 32*NW
//                              query rows (NW = 2 -> 64 for Lq <= 64, NW = 4 -> 128), key tile BK = 64 (D = 64)
//                              or 32 (D = 128). Smem: Q [BQ][D] + K [2][BK][D] + V [2][BK][D] bf16 + key codes
//                              [2][BK] int32: D=64: 40.5 / 48.5 KiB, D=128: 48.25 / 64.25 KiB (NW = 2 / 4).
//                              __launch_bounds__(32*NW, 2): 223-255 registers, no spills (sm_80, sm_90; the
//                              O and S accumulators alone are 2*(D + BK)/2 floats).
//                              FA2 warp layout: each warp owns 32 query rows as two m16 tiles, and every K
//                              and V fragment it loads (ldmatrix) feeds both. S = Q K^T with mma.m16n8k16 (Q
//                              fragments from ldmatrix per tile, K fragments from ldmatrix: K rows [key][d] are
//                              exactly the "col" B operand); online softmax in f32 on the accumulators in the
//                              log2 domain: running max = raw row max * |scale| log2(e), p = exp2 of one FMA;
//                              only the last tile of the sequence is masked (keys past N -> -inf). Then
//                              O += P V with P re-packed from the accumulators as the A operand (same lanes, no
//                              shuffle) and V fragments from ldmatrix.trans. A negative scale negates the Q
//                              tile in smem once. K/V tiles arrive by cp.async 16 B, double buffered: tile t+1
//                              is in flight while tile t is multiplied. Key rows are named by codes (history
//                              row from the row list, current row, or none = zero fill) in smem; the row list
//                              entries of tile t+2 are loaded into a register during tile t and stored at its
//                              end, so the cp.async addresses never wait on a global load. Query rows past Lq
//                              are zero-filled. Smem rows are XOR-swizzled in 16-byte chunks (chunk ^ (row &
//                              7)) so the 8 row addresses of every ldmatrix phase hit 8 distinct bank groups;
//                              ldmatrix addresses are 4 per-lane offsets plus immediates. The output is
//                              staged as bf16 in the warp's own Q rows and written with 16-byte stores.
//                              Split-KV: when the grid (query blocks x H x R) is under one block per SM (SM
//                              count queried once per device) and there are >= 4 key tiles, split s of
//                              min(ceil(SMs / blocks), tiles / 2, 16) takes a contiguous run of key tiles and
//                              writes its unnormalised O and (max, sum) per row to the workspace, f32:
//                              O [splits][R*H*Lq][D], (m, l) [splits][R*H*Lq][2].
//                              8-bit K/V (kv_format int8/fp8, <D, NW, true>): history and current rows are u8
//                              with one scale byte per token for its K and V rows. A tile's rows arrive by
//                              cp.async 16 B into a u8 staging tile, double buffered ([2][BK][D] for K and for
//                              V); each thread then decodes exactly the 16-byte units it copied (its own copies
//                              need no barrier to be read) times the row's scale (from the token's byte, loaded
//                              from global memory before the wait) into a single bf16 K and V tile, which the barrier that follows publishes to the
//                              ldmatrix reads as before. Smem as the bf16 kernel's (one bf16 tile instead of two,
//                              plus the u8 staging): D=64: 40.5 / 48.5 KiB, D=128: 48.25 / 64.25 KiB. No spills
//                              but D=128 with 2 warps on sm_80 (44 bytes; sm_90 none), whether the 2 x 4 scales a
//                              thread holds are loaded before or after the wait.
//   attention_combine_kernel<D> split-KV only: one warp per (r, h, query row), D/32 floats per lane;
//                              out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s with M = max_s m_s.
//   attention_simt_kernel<T,KV,DV> f32 (exact path), and bf16 when D is not 64/128 or a tensor is not 16-byte
//                              aligned (cp.async needs it; allocations are 256-aligned), any D <= 256; bf16
//                              here calls note_slow_path with the reason. Grid
//                              (ceil(Lq/16), H, R), 4 warps x 4 query rows, key tile 32 (one key per lane for
//                              the logits, then p_j broadcast by shuffle for P V with lane = d). Smem f32:
//                              Q [16][D] + K [32][D+1] (padded: lane j reads row j conflict-free) + V [32][D].
//   window_logits_kernel<T,KV> grid (ceil(N/32), ceil(W/16), R*H), 8 warps: 16 window queries x 32 keys per
//                              block, f32 FMA. Smem Q [16][D] + K [32][D+1] f32.
//   window_lse_kernel          one block per (r,h,w): max, then sum of exp, in f32.
//
// Every kernel needing > 48 KiB of smem is opted in once per instantiation and device (opt_in_smem,
// device_common.cuh, with the most it ever launches with), not per launch.
//
// Race freedom: every block writes only its own output rows (split-KV: its own split's partial rows; the
// combine kernel runs after, in stream order); smem buffers are reused only after a __syncthreads that
// follows their last read (the end of each key-tile iteration), and cp.async writes into a buffer are waited
// for (wait_group) and published (__syncthreads) before any ldmatrix reads it. Key codes: buffer t & 1 is
// written at the end of tile t (codes of tile t+2) after the mid-iteration barrier that follows its last
// read (issuing tile t's copies, one iteration earlier), and read after the end-of-iteration barrier. The
// scale < 0 negation of Q sits between two barriers. The output staging reuses only the warp's own Q rows,
// after the loop's last barrier, with __syncwarp between its writes and reads.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "device_common.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

struct AttnParams {
  const void* q;
  const void* hist_k;
  const void* hist_v;
  // History key j of (r, h) is row hist_rows[(r*H + h) * n_hist + j] (null: row j) of the (r, h) history, which
  // starts (r*H + h) * hist_stride rows into hist_k / hist_v: the gather over slabs of hist_cap rows, or the
  // pool rows over the whole pool (stride 0).
  const int32_t* hist_rows;
  const void* cur_k;
  const void* cur_v;
  void* out;
  const int32_t* window_rows;
  float* window_logits;
  float* window_lse;
  const int32_t* status;
  // 8-bit K/V only: the scale byte of every token row, indexed as the rows (history rows from hist_stride * (r*H + h),
  // or pool rows; current rows from lc * (r*H + h)).
  KvFormat kv_format;
  const uint8_t* hist_scales;
  const uint8_t* cur_scales;
  int heads, lq, head_dim, hist_stride, n_hist, lc, n_keys, n_window;
  float scale;
  // Tensor-core path only.
  float scale_log2;  // max(|scale| log2(e), FLT_MIN): positive, so -inf logits always give 0
  bool negate_q;     // scale < 0: the kernel negates its Q tile in smem
  int n_splits, tiles_per_split;  // split-KV: blockIdx.x = query block * n_splits + split
  int64_t part_rows;              // R * H * Lq: rows of one split's partials
  float* part_o;                  // [n_splits][R*H*Lq][D] unnormalised O (workspace)
  float* part_ml;                 // [n_splits][R*H*Lq][2] (running max in the log2 domain, sum)
};
// Key/value row j of the virtual sequence [history (gathered) ‖ current] of one (r, h), with its scale (8-bit rows;
// 1 otherwise); a null row past the end. `hist`/`cur`, their scales and `rows_bh` already point at this (r, h).
template <typename KV>
struct KvRowRef {
  const KV* row;
  float scale;
};
// The K (values = false) or V dequantisation factor of a token's scale byte.
__device__ __forceinline__ float kv_row_scale(KvFormat f, uint8_t s, bool values) {
  return values ? kv_value_scale(f, s) : kv_key_scale(f, s);
}
template <typename KV>
__device__ __forceinline__ KvRowRef<KV> kv_row(const AttnParams& p, const int32_t* rows_bh, const KV* hist,
                                               const KV* cur, const uint8_t* hist_scales, const uint8_t* cur_scales,
                                               bool values, int j) {
  if (j < p.n_hist) {
    const int hr = rows_bh ? __ldg(rows_bh + j) : j;
    return {hist + static_cast<size_t>(hr) * p.head_dim,
            hist_scales ? kv_row_scale(p.kv_format, __ldg(hist_scales + hr), values) : 1.0f};
  }
  if (j < p.n_keys) {
    const int c = j - p.n_hist;
    return {cur + static_cast<size_t>(c) * p.head_dim,
            cur_scales ? kv_row_scale(p.kv_format, __ldg(cur_scales + c), values) : 1.0f};
  }
  return {nullptr, 0.0f};
}

// Element d of a K/V row as f32: its dtype's value, or its 8-bit code decoded times the row's scale.
template <typename T>
__device__ __forceinline__ float kv_value(const KvRowRef<T>& r, int d, KvFormat) {
  return to_f32(r.row[d]);
}
__device__ __forceinline__ float kv_value(const KvRowRef<uint8_t>& r, int d, KvFormat f) {
  return kv_decode(f, r.row[d]) * r.scale;
}

// ---------------------------------------------------------------------------------------------------------
// validation

// Checks, as one flat list: the gather values, the window rows, then the first pages_read page-table entries of
// every row (detail: the flat index into the tensor holding the bad value).
__global__ void attention_validate_kernel(const int32_t* gather, int64_t n_gather_total, int hist_len,
                                          const int32_t* window_rows, int n_window, int lq, KvPages pages,
                                          int64_t n_pages_total, int pages_read, int32_t* status) {
  const int64_t total = n_gather_total + n_window + n_pages_total;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < n_gather_total) {
      const int v = gather[i];
      if (v < 0 || v >= hist_len) report_status(status, StatusCode::index_out_of_range, static_cast<int32_t>(i));
    } else if (i < n_gather_total + n_window) {
      const int v = window_rows[i - n_gather_total];
      if (v < 0 || v >= lq)
        report_status(status, StatusCode::index_out_of_range, static_cast<int32_t>(i - n_gather_total));
    } else {
      const int64_t k = i - n_gather_total - n_window;
      const int64_t entry = k / pages_read * pages.table_pages + k % pages_read;
      const int v = pages.table[entry];
      if (v < 0 || v >= pages.pages) report_status(status, StatusCode::index_out_of_range, static_cast<int32_t>(entry));
    }
  }
}

// pool_rows [R*H, n_hist]: the pool row of every history key of every (r, h). Runs after validation and writes
// nothing when it failed (a bad gather value could index past the table); nothing reads pool_rows then.
__global__ void attention_pool_rows_kernel(KvPages pages, int heads, const int32_t* gather, int n_hist,
                                           int64_t total, const int32_t* status, int32_t* pool_rows) {
  if (status[0] != 0) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t bh = i / n_hist;
    const int t = gather ? gather[i] : static_cast<int>(i % n_hist);
    pool_rows[i] = static_cast<int32_t>(
        kv_page_row(pages, heads, static_cast<int>(bh / heads), static_cast<int>(bh % heads), t));
  }
}

// ---------------------------------------------------------------------------------------------------------
// bf16 tensor-core flash attention

// Keys per tile: 64, or 32 for D = 128, whose 2 x 64 O accumulators leave room for only 32 S accumulators.
constexpr int mma_bk(int head_dim) { return head_dim >= 128 ? 32 : 64; }
constexpr int kNoRow = INT32_MIN;     // key code of a key past the end: its K/V rows are zero-filled
constexpr int kMinTilesPerSplit = 2;  // a split-KV block runs at least two key tiles (one overlaps the other's load)
constexpr int kMaxSplits = 16;

template <int D, int NW, bool Q8 = false>
struct MmaTile {
  static constexpr int BQ = 32 * NW, BK = mma_bk(D), CH = D / 8, NT = 32 * NW;
  // bf16 K/V tiles: double buffered, or (8-bit K/V) one, decoded from the double-buffered u8 staging each tile.
  static constexpr int KB = Q8 ? 1 : 2;
  static constexpr int U8 = D / 16;               // 16-byte units of an 8-bit row
  static constexpr int UPT = BK * U8 / NT;        // units per thread and tile, for K and for V
  static constexpr size_t kStage = Q8 ? 2 * 2 * static_cast<size_t>(BK) * D : 0;  // [2 buffers][K, V][BK][D] u8
  static constexpr size_t kSmem =
      static_cast<size_t>(BQ + 2 * KB * BK) * D * sizeof(bf16) + 2 * BK * sizeof(int32_t) + kStage;
  static_assert(!Q8 || BK * U8 % NT == 0, "8-bit units per tile must share out evenly");
  // __launch_bounds__ register target: 255 per thread (2 blocks of 4 warps per SM). O (2 x D/2 floats), S
  // (2 x BK/2 floats) and the addresses need it: ptxas spills at a 168 cap (3 blocks). Q fragments are
  // therefore reloaded from smem per tile (2 ldmatrix per 16 d beside 2-4 for K) rather than kept.
  static constexpr int kMinBlocks = 2;
};

// Element offset of 16-byte chunk `chunk` of smem row `row` in a [rows][D] bf16 tile, XOR-swizzled.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Where key j of one (r, h) lives: >= 0 a history row (from the row list), -1 - c current row c, kNoRow past
// the end.
__device__ __forceinline__ int key_code(const AttnParams& p, const int32_t* rows_bh, int j) {
  if (j < p.n_hist) return rows_bh ? __ldg(rows_bh + j) : j;
  return j < p.n_keys ? -1 - (j - p.n_hist) : kNoRow;
}

// The K and V rows of key code `code`: a history row, a current row, or (past the end) `dummy`, any valid address
// for the zero-fill copies, which read nothing.
template <int D, typename T>
__device__ __forceinline__ void code_rows(int code, const T* hk, const T* hv, const T* ck, const T* cv, const T* dummy,
                                          const T*& kr, const T*& vr) {
  kr = vr = dummy;
  if (code >= 0) {
    kr = hk + static_cast<size_t>(code) * D;
    vr = hv + static_cast<size_t>(code) * D;
  } else if (code != kNoRow) {
    kr = ck + static_cast<size_t>(-1 - code) * D;
    vr = cv + static_cast<size_t>(-1 - code) * D;
  }
}

// Issues the cp.async copies of one K/V tile whose 64 key codes are in smem `codes`.
template <int D, int NW>
__device__ __forceinline__ void load_kv_tile(const int32_t* codes, const bf16* hk, const bf16* hv,
                                             const bf16* ck, const bf16* cv, const bf16* dummy, bf16* sk,
                                             bf16* sv) {
  using C = MmaTile<D, NW>;
#pragma unroll
  for (int i = 0; i < C::BK * C::CH / C::NT; ++i) {
    const int e = threadIdx.x + i * C::NT, row = e / C::CH, c = e % C::CH, code = codes[row];
    const bf16 *kr, *vr;
    code_rows<D>(code, hk, hv, ck, cv, dummy, kr, vr);
    const int bytes = code != kNoRow ? 16 : 0;
    skv::cp_async_16(sk + swz<D>(row, c), kr + (bytes ? c * 8 : 0), bytes);
    skv::cp_async_16(sv + swz<D>(row, c), vr + (bytes ? c * 8 : 0), bytes);
  }
}

// 8-bit K/V: issues the cp.async copies of one tile's u8 rows (key codes in smem `codes`) into the staging tile
// st = [K, V][BK][D], unit e of the tile (row e / U8, 16 bytes u8 of it) by thread e % NT.
template <int D, int NW>
__device__ __forceinline__ void load_kv_tile_u8(const int32_t* codes, const uint8_t* hk, const uint8_t* hv,
                                                const uint8_t* ck, const uint8_t* cv, const uint8_t* dummy,
                                                uint8_t* st) {
  using C = MmaTile<D, NW, true>;
#pragma unroll
  for (int i = 0; i < C::UPT; ++i) {
    const int e = threadIdx.x + i * C::NT, row = e / C::U8, u = e % C::U8, code = codes[row];
    const uint8_t *kr, *vr;
    code_rows<D>(code, hk, hv, ck, cv, dummy, kr, vr);
    const int bytes = code != kNoRow ? 16 : 0;
    skv::cp_async_16(st + row * D + u * 16, kr + (bytes ? u * 16 : 0), bytes);
    skv::cp_async_16(st + (C::BK + row) * D + u * 16, vr + (bytes ? u * 16 : 0), bytes);
  }
}

// The K and V scales of this thread's units of a tile, from their tokens' scale bytes (read before the copies are
// waited for, so their latency overlaps).
template <int D, int NW>
__device__ __forceinline__ void kv_tile_scales(const int32_t* codes, const uint8_t* hist_scales,
                                               const uint8_t* cur_scales, KvFormat f, float* ks, float* vs) {
  using C = MmaTile<D, NW, true>;
#pragma unroll
  for (int i = 0; i < C::UPT; ++i) {
    const int code = codes[(threadIdx.x + i * C::NT) / C::U8];
    if (code == kNoRow) {
      ks[i] = vs[i] = 0.0f;
      continue;
    }
    const uint8_t s = code >= 0 ? __ldg(hist_scales + code) : __ldg(cur_scales + (-1 - code));
    ks[i] = kv_key_scale(f, s);
    vs[i] = kv_value_scale(f, s);
  }
}

// 16 codes (one staging unit) times `scale`, as 16 bf16 in two swizzled chunks of row `row` of a [BK][D] tile, one
// 8-code half at a time (fewer live registers beside the O accumulators).
template <int D>
__device__ __forceinline__ void decode_unit(const uint8_t* src, float scale, KvFormat f, bf16* tile, int row, int u) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint2 raw = *reinterpret_cast<const uint2*>(src + 8 * half);
    uint32_t packed[4];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      const uint32_t word = w ? raw.y : raw.x;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        packed[2 * w + h] = skv::pack_bf16x2(kv_decode(f, (word >> (16 * h)) & 0xFFu) * scale,
                                             kv_decode(f, (word >> (16 * h + 8)) & 0xFFu) * scale);
    }
    *reinterpret_cast<uint4*>(tile + swz<D>(row, 2 * u + half)) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

// Decodes this thread's own units of the staging tile st (its own cp.async copies: visible to it after the wait)
// into the bf16 K and V tiles.
template <int D, int NW>
__device__ __forceinline__ void decode_kv_tile(const uint8_t* st, const float* ks, const float* vs, KvFormat f,
                                               bf16* sK, bf16* sV) {
  using C = MmaTile<D, NW, true>;
#pragma unroll
  for (int i = 0; i < C::UPT; ++i) {
    const int e = threadIdx.x + i * C::NT, row = e / C::U8, u = e % C::U8;
    decode_unit<D>(st + row * D + u * 16, ks[i], f, sK, row, u);
    decode_unit<D>(st + (C::BK + row) * D + u * 16, vs[i], f, sV, row, u);
  }
}

template <int D, int NW, bool Q8>
__global__ void __launch_bounds__(32 * NW, MmaTile<D, NW, Q8>::kMinBlocks) attention_mma_kernel(const AttnParams p) {
  using C = MmaTile<D, NW, Q8>;
  using KV = std::conditional_t<Q8, uint8_t, bf16>;
  constexpr int BQ = C::BQ, BK = C::BK, CH = C::CH, NT = C::NT, KB = C::KB;
  if (p.status[0] != 0) return;  // a bad index list: write nothing
  SKV_DYNAMIC_SMEM(smem_raw);
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);                  // [BQ][D]; output staging at the end
  bf16* sK = sQ + BQ * D;                                         // [KB][BK][D]
  bf16* sV = sK + KB * BK * D;                                    // [KB][BK][D]
  int32_t* sRow = reinterpret_cast<int32_t*>(sV + KB * BK * D);  // [2][BK] key codes
  uint8_t* sStage = reinterpret_cast<uint8_t*>(sRow + 2 * BK);    // 8-bit: [2][K, V][BK][D]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int split = blockIdx.x % p.n_splits, q0 = static_cast<int>(blockIdx.x / p.n_splits) * BQ;
  const size_t bh = static_cast<size_t>(blockIdx.z) * p.heads + blockIdx.y;
  const bf16* q = static_cast<const bf16*>(p.q) + bh * p.lq * D;
  const KV* hk = static_cast<const KV*>(p.hist_k) + bh * p.hist_stride * D;
  const KV* hv = static_cast<const KV*>(p.hist_v) + bh * p.hist_stride * D;
  const KV* ck = static_cast<const KV*>(p.cur_k) + bh * p.lc * D;
  const KV* cv = static_cast<const KV*>(p.cur_v) + bh * p.lc * D;
  const int32_t* rows_bh = p.hist_rows ? p.hist_rows + bh * p.n_hist : nullptr;
  // Issues the copies of the tile whose codes are in `codes` into buffer b.
  auto load_tile = [&](const int32_t* codes, int b) {
    if constexpr (Q8)
      load_kv_tile_u8<D, NW>(codes, hk, hv, ck, cv, reinterpret_cast<const uint8_t*>(q), sStage + b * 2 * BK * D);
    else
      load_kv_tile<D, NW>(codes, hk, hv, ck, cv, q, sK + b * BK * D, sV + b * BK * D);
  };
  const int n_tiles = (p.n_keys + BK - 1) / BK;
  const int t_begin = split * p.tiles_per_split;
  const int t_end = min(n_tiles, t_begin + p.tiles_per_split);
  const float sl2 = p.scale_log2;

  // Fragment coordinates: g = row within an 8-row group, t = column pair; mi = which of the 4 ldmatrix
  // matrices this lane addresses, lr = the row of that matrix it addresses.
  const int g = lane >> 2, t = lane & 3, mi = lane >> 3, lr = lane & 7;
  const int wrow = warp * 32;  // this warp's 32 query rows: m-tile m covers wrow + 16m .. + 15
  // ldmatrix addresses as a per-lane offset plus compile-time constants (immediates, not registers). Every
  // fragment row r this lane addresses has r & 7 == lr, so chunk 8h + 2j + c of it sits at
  // 8h + ((2j + c) ^ lr) = 8h + (2j ^ (c ^ lr)): four lane offsets per operand shape, j = 0..3.
  //   a_off: matrices (rows +8 for mi & 1, chunk +1 for mi >> 1): Q (A operand) and V (.trans)
  //   b_off: matrices (rows +8 for mi >> 1, chunk +1 for mi & 1): K (B operand)
  int a_off[4], b_off[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    a_off[j] = ((mi & 1) * 8 + lr) * D + (((2 * j) ^ ((mi >> 1) ^ lr)) << 3);
    b_off[j] = ((mi >> 1) * 8 + lr) * D + (((2 * j) ^ ((mi & 1) ^ lr)) << 3);
  }

  if (t_begin < t_end) {
    if (tid < BK) {
      sRow[tid] = key_code(p, rows_bh, t_begin * BK + tid);
      if (t_begin + 1 < t_end) sRow[BK + tid] = key_code(p, rows_bh, (t_begin + 1) * BK + tid);
    }
#pragma unroll
    for (int i = 0; i < BQ * CH / NT; ++i) {
      const int e = tid + i * NT, row = e / CH, c = e % CH, qi = q0 + row;
      skv::cp_async_16(sQ + swz<D>(row, c), qi < p.lq ? q + static_cast<size_t>(qi) * D + c * 8 : q,
                       qi < p.lq ? 16 : 0);
    }
    __syncthreads();  // publish the key codes of the first two tiles
    load_tile(sRow, 0);
    skv::cp_async_commit();
  }

  float m_run[2][2], l_run[2][2];  // [m-tile][rows g, g+8]: running max (log2 domain), this lane's partial sum
  float o[2][D / 8][4];            // O accumulators: 2 m-tiles x D/8 n-blocks of 8
#pragma unroll
  for (int m = 0; m < 2; ++m) {
    m_run[m][0] = m_run[m][1] = -INFINITY;
    l_run[m][0] = l_run[m][1] = 0.0f;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[m][i][0] = o[m][i][1] = o[m][i][2] = o[m][i][3] = 0.0f;
  }

  for (int kt = t_begin; kt < t_end; ++kt) {
    const int buf = (kt - t_begin) & 1;
    if (kt + 1 < t_end) {
      // The buffer buf^1 was last read in the previous iteration, which ended with __syncthreads.
      load_tile(sRow + (buf ^ 1) * BK, buf ^ 1);
      skv::cp_async_commit();
    }
    // The key codes of tile kt+2 are read now and stored at the end of this iteration, so the row list load's
    // latency hides behind this tile's math and the cp.async of tile kt+2 never waits on it.
    const bool fetch = tid < BK && kt + 2 < t_end;
    const int next_code = fetch ? key_code(p, rows_bh, (kt + 2) * BK + tid) : 0;
    float k_scales[Q8 ? C::UPT : 1], v_scales[Q8 ? C::UPT : 1];
    if constexpr (Q8)
      kv_tile_scales<D, NW>(sRow + buf * BK, p.hist_scales + bh * p.hist_stride, p.cur_scales + bh * p.lc,
                            p.kv_format, k_scales, v_scales);
    if (kt + 1 < t_end) skv::cp_async_wait<1>();  // everything but the newest group (tile kt+1) has landed
    else skv::cp_async_wait<0>();
    // 8-bit: the single bf16 tile was last read in the previous iteration, which ended with __syncthreads.
    if constexpr (Q8) decode_kv_tile<D, NW>(sStage + buf * 2 * BK * D, k_scales, v_scales, p.kv_format, sK, sV);
    __syncthreads();  // publish every thread's cp.async writes of tile kt (and Q), or the decoded tile

    if (kt == t_begin) {
      if (p.negate_q) {  // scale < 0: softmax(scale s) = softmax(|scale| (-s)); Q is negated once, in smem
        uint32_t* w = reinterpret_cast<uint32_t*>(sQ);
        for (int e = tid; e < BQ * D / 2; e += NT) w[e] ^= 0x80008000u;
        __syncthreads();
      }
    }

    // S = Q K^T for this warp's 32 rows x 64 keys: every K fragment serves both m-tiles.
    const bf16* ks = sK + (Q8 ? 0 : buf) * BK * D;
    float s[2][BK / 8][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int i = 0; i < BK / 8; ++i) s[m][i][0] = s[m][i][1] = s[m][i][2] = s[m][i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      // A operand 16x16: a0 = rows 0-7 / k 0-7, a1 = rows 8-15 / k 0-7, a2 = rows 0-7 / k 8-15, a3 = rows 8-15 / k 8-15.
      uint32_t qa[2][4];
#pragma unroll
      for (int m = 0; m < 2; ++m) skv::ldmatrix_x4(qa[m], sQ + (wrow + 16 * m) * D + (kk >> 2) * 64 + a_off[kk & 3]);
#pragma unroll
      for (int nb2 = 0; nb2 < BK / 16; ++nb2) {
        // B operand (k = d, n = key): b0 = keys 0-7 / d 0-7, b1 = keys 0-7 / d 8-15 for n-block 2*nb2;
        // b2, b3 the same for keys 8-15 (n-block 2*nb2+1). K rows are [key][d], so no transpose.
        uint32_t b[4];
        skv::ldmatrix_x4(b, ks + nb2 * 16 * D + (kk >> 2) * 64 + b_off[kk & 3]);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          skv::mma_m16n8k16_bf16(s[m][2 * nb2], qa[m], b, s[m][2 * nb2]);
          skv::mma_m16n8k16_bf16(s[m][2 * nb2 + 1], qa[m], b + 2, s[m][2 * nb2 + 1]);
        }
      }
    }

    // Only the last tile of the sequence can hold keys past the end: their logits become -inf (the raw
    // logits' max is then over real keys; exp2(-inf * sl2) = 0 as sl2 > 0). Lane holds s[m][nb][0..1] =
    // (row g, keys nb*8 + 2t, +1) and s[m][nb][2..3] = (row g+8, same keys).
    if (kt == n_tiles - 1 && p.n_keys % BK != 0) {
      const int n_valid = p.n_keys - kt * BK;
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int nb = 0; nb < BK / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (nb * 8 + 2 * t + (e & 1) >= n_valid) s[m][nb][e] = -INFINITY;
    }
    // Online softmax in the log2 domain: the row max of the raw logits times sl2 = |scale| log2(e) is the
    // running max, and each probability is exp2 of one FMA, s * sl2 - m.
#pragma unroll
    for (int m = 0; m < 2; ++m) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < BK / 8; ++nb) mx = fmaxf(mx, fmaxf(s[m][nb][2 * hr], s[m][nb][2 * hr + 1]));
        // The 4 lanes of a quad (same g) hold the 64 columns of the row between them.
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m_run[m][hr], mx * sl2);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // never -inf - -inf
        const float alpha = exp2f(m_run[m][hr] - m_use);         // 0 on the first tile
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < BK / 8; ++nb) {
          s[m][nb][2 * hr] = exp2f(fmaf(s[m][nb][2 * hr], sl2, -m_use));
          s[m][nb][2 * hr + 1] = exp2f(fmaf(s[m][nb][2 * hr + 1], sl2, -m_use));
          sum += s[m][nb][2 * hr] + s[m][nb][2 * hr + 1];
        }
        l_run[m][hr] = l_run[m][hr] * alpha + sum;
        m_run[m][hr] = m_new;
#pragma unroll
        for (int db = 0; db < D / 8; ++db) {
          o[m][db][2 * hr] *= alpha;
          o[m][db][2 * hr + 1] *= alpha;
        }
      }
    }

    // O += P V. The accumulator layout of S n-blocks 2kk2 and 2kk2+1 is exactly the A layout of the
    // 16x16 P block over keys 16kk2..16kk2+15: a0 = (g, 2t..), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
    // a3 = (g+8, 2t+8..). V rows are [key][d] but B wants (k = key, n = d) per lane, hence .trans; every
    // V fragment serves both m-tiles.
    const bf16* vs = sV + (Q8 ? 0 : buf) * BK * D;
#pragma unroll
    for (int kk2 = 0; kk2 < BK / 16; ++kk2) {
      uint32_t a[2][4];
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        a[m][0] = skv::pack_bf16x2(s[m][2 * kk2][0], s[m][2 * kk2][1]);
        a[m][1] = skv::pack_bf16x2(s[m][2 * kk2][2], s[m][2 * kk2][3]);
        a[m][2] = skv::pack_bf16x2(s[m][2 * kk2 + 1][0], s[m][2 * kk2 + 1][1]);
        a[m][3] = skv::pack_bf16x2(s[m][2 * kk2 + 1][2], s[m][2 * kk2 + 1][3]);
      }
#pragma unroll
      for (int db2 = 0; db2 < D / 16; ++db2) {
        // b0 = keys 0-7 / d-chunk 2db2, b1 = keys 8-15 / same chunk (n-block 2db2); b2, b3 for chunk 2db2+1.
        uint32_t b[4];
        skv::ldmatrix_x4_trans(b, vs + kk2 * 16 * D + (db2 >> 2) * 64 + a_off[db2 & 3]);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          skv::mma_m16n8k16_bf16(o[m][2 * db2], a[m], b, o[m][2 * db2]);
          skv::mma_m16n8k16_bf16(o[m][2 * db2 + 1], a[m], b + 2, o[m][2 * db2 + 1]);
        }
      }
    }
    // sRow[buf] held tile kt's codes, read when tile kt was issued (before this iteration's first barrier).
    if (fetch) sRow[buf * BK + tid] = next_code;
    __syncthreads();  // every warp is done with buffer buf before iteration kt+1 refills it
  }

#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      l_run[m][hr] += __shfl_xor_sync(0xffffffffu, l_run[m][hr], 1);
      l_run[m][hr] += __shfl_xor_sync(0xffffffffu, l_run[m][hr], 2);
    }

  if (p.n_splits == 1) {
    // Normalise, stage the warp's 32 rows as bf16 in its own rows of sQ (every warp passed the loop's last
    // barrier, and Q rows are read only by their warp), then 16-byte coalesced stores.
    bf16* out = static_cast<bf16*>(p.out) + bh * p.lq * D;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float l = l_run[m][hr];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // no keys at all: zeros, as the CPU backend
        const int row = wrow + 16 * m + g + 8 * hr;
#pragma unroll
        for (int db = 0; db < D / 8; ++db)
          *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, db) + 2 * t) =
              skv::pack_bf16x2(o[m][db][2 * hr] * inv, o[m][db][2 * hr + 1] * inv);
      }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int e = lane + 32 * i, row = wrow + e / CH, c = e % CH;
      if (q0 + row < p.lq)
        *reinterpret_cast<uint4*>(out + static_cast<size_t>(q0 + row) * D + c * 8) =
            *reinterpret_cast<const uint4*>(sQ + swz<D>(row, c));
    }
  } else {
    // Split-KV: this split's unnormalised O and its (max, sum) per row, combined by attention_combine_kernel.
    const size_t base = static_cast<size_t>(split) * p.part_rows + bh * p.lq;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int row = q0 + wrow + 16 * m + g + 8 * hr;
        if (row >= p.lq) continue;
        float* po = p.part_o + (base + row) * D;
#pragma unroll
        for (int db = 0; db < D / 8; ++db)
          *reinterpret_cast<float2*>(po + db * 8 + 2 * t) = make_float2(o[m][db][2 * hr], o[m][db][2 * hr + 1]);
        if (t == 0) *reinterpret_cast<float2*>(p.part_ml + (base + row) * 2) = make_float2(m_run[m][hr], l_run[m][hr]);
      }
  }
}

// Split-KV combine: one warp per (r, h, query row), D/32 elements per lane. With M = max_s m_s,
// out = sum_s 2^(m_s - M) O_s / sum_s 2^(m_s - M) l_s.
template <int D>
__global__ void attention_combine_kernel(const AttnParams p) {
  constexpr int V = D / 32;
  if (p.status[0] != 0) return;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= p.part_rows) return;  // whole warps: no collectives below
  const int lane = threadIdx.x % 32;
  float mx = -INFINITY;
  for (int s = 0; s < p.n_splits; ++s) mx = fmaxf(mx, p.part_ml[(s * p.part_rows + r) * 2]);
  const float m_use = mx == -INFINITY ? 0.0f : mx;
  float l = 0.0f, acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
  for (int s = 0; s < p.n_splits; ++s) {
    const float2 ml = *reinterpret_cast<const float2*>(p.part_ml + (s * p.part_rows + r) * 2);
    const float w = exp2f(ml.x - m_use);
    l += w * ml.y;
    const float* po = p.part_o + (s * p.part_rows + r) * D + lane * V;
    if constexpr (V == 4) {
      const float4 v = *reinterpret_cast<const float4*>(po);
      acc[0] += w * v.x; acc[1] += w * v.y; acc[2] += w * v.z; acc[3] += w * v.w;
    } else {
      const float2 v = *reinterpret_cast<const float2*>(po);
      acc[0] += w * v.x; acc[1] += w * v.y;
    }
  }
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  bf16* out = static_cast<bf16*>(p.out) + r * D + lane * V;
  if constexpr (V == 4)
    *reinterpret_cast<uint2*>(out) = make_uint2(skv::pack_bf16x2(acc[0] * inv, acc[1] * inv),
                                                skv::pack_bf16x2(acc[2] * inv, acc[3] * inv));
  else
    *reinterpret_cast<uint32_t*>(out) = skv::pack_bf16x2(acc[0] * inv, acc[1] * inv);
}

// ---------------------------------------------------------------------------------------------------------
// SIMT flash attention (f32 exact path; bf16 with other head dims)

constexpr int kSimtWarps = 4, kSimtRowsPerWarp = 4, kSimtQT = kSimtWarps * kSimtRowsPerWarp, kSimtKT = 32;

// The K and V rows of one (r, h) as the SIMT kernels read them: KV = T, or u8 codes with per-row scales.
template <typename KV>
struct KvSlices {
  const KV *hk, *hv, *ck, *cv;
  const uint8_t *hs, *cs;  // scale bytes; null for plain rows
  __device__ KvSlices(const AttnParams& p, size_t bh) {
    const int D = p.head_dim;
    hk = static_cast<const KV*>(p.hist_k) + bh * p.hist_stride * D;
    hv = static_cast<const KV*>(p.hist_v) + bh * p.hist_stride * D;
    ck = static_cast<const KV*>(p.cur_k) + bh * p.lc * D;
    cv = static_cast<const KV*>(p.cur_v) + bh * p.lc * D;
    const bool q8 = p.kv_format != KvFormat::plain;
    hs = q8 ? p.hist_scales + bh * p.hist_stride : nullptr;
    cs = q8 ? p.cur_scales + bh * p.lc : nullptr;
  }
};

// Loads key (and, with sV, value) rows [tile*32, tile*32+32) as f32 into sK [32][D+1] and sV [32][D]; zeros past
// the end.
template <typename KV>
__device__ __forceinline__ void load_kv_f32(const AttnParams& p, const int32_t* rows_bh, const KvSlices<KV>& kv,
                                            int tile, float* sK, float* sV, int nt) {
  const int D = p.head_dim;
  for (int e = threadIdx.x; e < kSimtKT * D; e += nt) {
    const int row = e / D, d = e % D, j = tile * kSimtKT + row;
    const KvRowRef<KV> kr = kv_row(p, rows_bh, kv.hk, kv.ck, kv.hs, kv.cs, false, j);
    sK[row * (D + 1) + d] = kr.row ? kv_value(kr, d, p.kv_format) : 0.0f;
    if (sV) {
      const KvRowRef<KV> vr = kv_row(p, rows_bh, kv.hv, kv.cv, kv.hs, kv.cs, true, j);
      sV[e] = vr.row ? kv_value(vr, d, p.kv_format) : 0.0f;
    }
  }
}

template <typename T, typename KV, int DV>  // DV: 32-wide slices of the head dim per lane, D <= 32 * DV
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
  const KvSlices<KV> kv(p, bh);
  const int32_t* rows_bh = p.hist_rows ? p.hist_rows + bh * p.n_hist : nullptr;

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
    load_kv_f32(p, rows_bh, kv, kt, sK, sV, NT);
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

template <typename T, typename KV>
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
  const KvSlices<KV> kv(p, bh);
  const int32_t* rows_bh = p.hist_rows ? p.hist_rows + bh * p.n_hist : nullptr;

  for (int e = tid; e < kWinQ * D; e += kWinWarps * 32) {
    const int w = w0 + e / D;
    sQ[e] = w < p.n_window ? to_f32(q[static_cast<size_t>(p.window_rows[w]) * D + e % D]) : 0.0f;
  }
  load_kv_f32(p, rows_bh, kv, blockIdx.x, sK, nullptr, kWinWarps * 32);
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

// Why bf16 attention cannot take the tensor-core kernel, or null when it can (f32 is never asked).
const char* mma_obstacle(const AttentionArgs& a) {
  if (a.head_dim != 64 && a.head_dim != 128) return "bf16 attention on SIMT cores: head_dim is not 64 or 128";
  if (!aligned16(a.q) || !aligned16(a.hist_k) || !aligned16(a.hist_v) || !aligned16(a.cur_k) ||
      !aligned16(a.cur_v) || !aligned16(a.out))
    return "bf16 attention on SIMT cores: a tensor is not 16-byte aligned (cp.async)";
  return nullptr;
}

// The tensor-core launch: warps per block and the split of the key tiles. Split-KV only when the grid
// (query blocks x heads x rows) is under one block per SM and there are enough key tiles to share out.
struct MmaPlan {
  int nw = 0;  // 0: not the tensor-core kernel
  int q_blocks = 0, splits = 1, tiles_per_split = 0;
};

MmaPlan plan_mma(const AttentionArgs& a) {
  MmaPlan pl;
  if (!a.out || a.lq <= 0 || a.dtype != DType::bf16 || mma_obstacle(a)) return pl;
  pl.nw = a.lq > 64 ? 4 : 2;  // 128-row query blocks halve K/V traffic; 64 rows waste less on short Lq
  pl.q_blocks = (a.lq + 32 * pl.nw - 1) / (32 * pl.nw);
  const int n_tiles = (a.n_keys() + mma_bk(a.head_dim) - 1) / mma_bk(a.head_dim);
  pl.tiles_per_split = n_tiles;
  const int64_t blocks = static_cast<int64_t>(pl.q_blocks) * a.heads * a.rows;
  const int sms = sm_count("attention");
  if (blocks < sms && n_tiles >= 2 * kMinTilesPerSplit) {
    const int64_t want = std::min<int64_t>({(sms + blocks - 1) / blocks, n_tiles / kMinTilesPerSplit, kMaxSplits});
    pl.tiles_per_split = static_cast<int>((n_tiles + want - 1) / want);
    pl.splits = (n_tiles + pl.tiles_per_split - 1) / pl.tiles_per_split;  // no empty split
  }
  return pl;
}

template <int D, int NW, bool Q8>
void launch_mma(const AttnParams& p, const MmaPlan& pl, int rows, cudaStream_t stream) {
  using C = MmaTile<D, NW, Q8>;
  auto kernel = attention_mma_kernel<D, NW, Q8>;
  static SmemOptIn smem_set;
  opt_in_smem(kernel, C::kSmem, smem_set, "attention");
  const dim3 grid(static_cast<unsigned>(pl.q_blocks * pl.splits), p.heads, rows);
  SKV_LAUNCH(kernel, grid, dim3(C::NT), C::kSmem, stream, p);
  if (pl.splits > 1) {
    check(cudaGetLastError(), "attention kernel launch");
    constexpr int kRowsPerBlock = 4;
    SKV_LAUNCH(attention_combine_kernel<D>, dim3(static_cast<unsigned>((p.part_rows + kRowsPerBlock - 1) / kRowsPerBlock)),
               dim3(32 * kRowsPerBlock), 0, stream, p);
  }
}

template <int D>
void launch_mma_dispatch(const AttnParams& p, const MmaPlan& pl, int rows, bool q8, cudaStream_t stream) {
  if (q8) {
    if (pl.nw == 4) launch_mma<D, 4, true>(p, pl, rows, stream);
    else launch_mma<D, 2, true>(p, pl, rows, stream);
  } else if (pl.nw == 4) {
    launch_mma<D, 4, false>(p, pl, rows, stream);
  } else {
    launch_mma<D, 2, false>(p, pl, rows, stream);
  }
}

size_t simt_smem(int D) {
  return static_cast<size_t>(kSimtQT * D + kSimtKT * (D + 1) + kSimtKT * D) * sizeof(float);
}

template <typename T, typename KV, int DV>
void launch_simt(const AttnParams& p, int rows, cudaStream_t stream) {
  auto kernel = attention_simt_kernel<T, KV, DV>;
  static SmemOptIn smem_set;
  opt_in_smem(kernel, simt_smem(32 * DV), smem_set, "attention");
  const dim3 grid((p.lq + kSimtQT - 1) / kSimtQT, p.heads, rows);
  skv::declare_simt_flops(4.0 * rows * p.heads * p.lq * p.n_keys * p.head_dim);
  SKV_LAUNCH(kernel, grid, dim3(32 * kSimtWarps), simt_smem(p.head_dim), stream, p);
}

template <typename T, typename KV>
void launch_simt_dispatch(const AttnParams& p, int rows, cudaStream_t stream) {
  if (p.head_dim <= 64) launch_simt<T, KV, 2>(p, rows, stream);
  else if (p.head_dim <= 128) launch_simt<T, KV, 4>(p, rows, stream);
  else launch_simt<T, KV, 8>(p, rows, stream);
}

size_t window_smem(int D) { return static_cast<size_t>(kWinQ * D + kWinK * (D + 1)) * sizeof(float); }

template <typename T, typename KV>
void launch_window(const AttnParams& p, int rows, cudaStream_t stream) {
  auto kernel = window_logits_kernel<T, KV>;
  static SmemOptIn smem_set;
  opt_in_smem(kernel, window_smem(256), smem_set, "attention");
  const dim3 grid((p.n_keys + kWinK - 1) / kWinK, (p.n_window + kWinQ - 1) / kWinQ, rows * p.heads);
  skv::declare_simt_flops(2.0 * rows * p.heads * p.n_window * p.n_keys * p.head_dim);
  SKV_LAUNCH(kernel, grid, dim3(32 * kWinWarps), window_smem(p.head_dim), stream, p);
}

// Workspace: the pool rows of a paged history (padded to 256 bytes), then the split-KV partials: O then (m, l),
// each [splits][R*H*Lq]; O's rows stay 16-byte aligned.
size_t pool_rows_bytes(const AttentionArgs& a) {
  const int n_hist = a.gather ? a.n_gather : a.hist_len;
  if (!a.hist_pages.table || n_hist == 0) return 0;
  return (static_cast<size_t>(a.rows) * a.heads * n_hist * sizeof(int32_t) + 255) / 256 * 256;
}
size_t part_o_bytes(const AttentionArgs& a, const MmaPlan& pl) {
  return static_cast<size_t>(pl.splits) * a.rows * a.heads * a.lq * a.head_dim * sizeof(float);
}

}  // namespace

size_t attention_workspace_bytes(const AttentionArgs& a) {
  const MmaPlan pl = plan_mma(a);
  size_t bytes = pool_rows_bytes(a);
  if (pl.nw != 0 && pl.splits > 1)
    bytes += part_o_bytes(a, pl) + static_cast<size_t>(pl.splits) * a.rows * a.heads * a.lq * 2 * sizeof(float);
  return bytes;
}

void attention(const AttentionArgs& a, cudaStream_t stream, int32_t* status, void* workspace) {
  if (a.dtype != DType::f32 && a.dtype != DType::bf16)
    throw BackendError(StatusCode::internal, std::string("attention: unsupported dtype ") + dtype_name(a.dtype));
  if (a.head_dim <= 0 || a.head_dim > 256)
    throw BackendError(StatusCode::internal,
                       "attention: head_dim " + std::to_string(a.head_dim) + " is outside [1, 256]");
  if (a.heads > 65535 || a.rows > 65535)
    throw BackendError(StatusCode::internal, "attention: rows and heads must each be at most 65535");
  const int64_t pairs = static_cast<int64_t>(a.rows) * a.heads;
  if (pairs == 0) return;
  const bool q8 = a.kv_format != KvFormat::plain;
  if (q8 && ((a.hist_k && !a.hist_scales) || (a.lc > 0 && !a.cur_scales)))
    throw BackendError(StatusCode::internal, "attention: 8-bit K/V needs their scales");

  AttnParams p{};
  p.q = a.q;
  p.hist_k = a.hist_k;
  p.hist_v = a.hist_v;
  p.hist_rows = a.gather;
  p.cur_k = a.cur_k;
  p.cur_v = a.cur_v;
  p.kv_format = a.kv_format;
  p.hist_scales = a.hist_scales;
  p.cur_scales = a.cur_scales;
  p.out = a.out;
  p.window_rows = a.window_rows;
  p.window_logits = a.window_logits;
  p.window_lse = a.window_lse;
  p.status = status;
  p.heads = a.heads;
  p.lq = a.lq;
  p.head_dim = a.head_dim;
  p.hist_stride = a.hist_cap;
  p.n_hist = a.gather ? a.n_gather : a.hist_len;
  p.lc = a.lc;
  p.n_keys = a.n_keys();
  p.n_window = a.window_logits ? a.n_window : 0;
  p.scale = a.scale;
  // Positive even for scale 0, so that masked (-inf) logits give exp2(-inf) = 0 and real ones exp2(~0) = 1.
  p.scale_log2 = std::max(std::fabs(a.scale) * kLog2e, FLT_MIN);
  p.negate_q = a.scale < 0.0f;
  p.n_splits = 1;

  // 1. Validate the index lists and the page-table entries the history reads on the device; the kernels below
  // return early if anything is wrong.
  const int64_t n_gather_total = a.gather ? pairs * a.n_gather : 0;
  const int n_window_rows = a.window_rows ? a.n_window : 0;
  const int pages_read = a.hist_pages.table ? (a.hist_len + a.hist_pages.page_tokens - 1) / a.hist_pages.page_tokens : 0;
  const int64_t n_pages_total = static_cast<int64_t>(a.rows) * pages_read;
  const int64_t n_check = n_gather_total + n_window_rows + n_pages_total;
  if (n_check > 0) {
    const int blocks = static_cast<int>(n_check / 256 + 1 < 1024 ? n_check / 256 + 1 : 1024);
    SKV_LAUNCH(attention_validate_kernel, dim3(blocks), dim3(256), 0, stream, a.gather, n_gather_total,
               a.hist_len, a.window_rows, n_window_rows, a.lq, a.hist_pages, n_pages_total, pages_read, status);
    check(cudaGetLastError(), "validate launch");
  }

  // 2. A paged history: every history key's pool row, once for all the kernels below.
  void* partials = workspace;
  if (const size_t bytes = pool_rows_bytes(a)) {
    if (static_cast<int64_t>(a.hist_pages.pages) * a.heads * a.hist_pages.page_tokens > INT32_MAX)
      throw BackendError(StatusCode::internal, "attention: a K/V pool of 2^31 rows or more (int32 pool rows)");
    int32_t* pool_rows = static_cast<int32_t*>(workspace);
    const int64_t total = pairs * p.n_hist;
    const int blocks = static_cast<int>(total / 256 + 1 < 1024 ? total / 256 + 1 : 1024);
    skv::declare_every_block();  // the kernels below read keys at these rows
    SKV_LAUNCH(attention_pool_rows_kernel, dim3(blocks), dim3(256), 0, stream, a.hist_pages, a.heads, a.gather,
               p.n_hist, total, status, pool_rows);
    check(cudaGetLastError(), "pool rows launch");
    p.hist_rows = pool_rows;
    p.hist_stride = 0;
    partials = static_cast<unsigned char*>(workspace) + bytes;
  }

  // 3. Attention output.
  if (a.out && a.lq > 0) {
    const MmaPlan pl = plan_mma(a);
    if (pl.nw != 0) {
      p.n_splits = pl.splits;
      p.tiles_per_split = pl.tiles_per_split;
      p.part_rows = pairs * a.lq;
      if (pl.splits > 1) {
        p.part_o = static_cast<float*>(partials);
        p.part_ml = reinterpret_cast<float*>(static_cast<unsigned char*>(partials) + part_o_bytes(a, pl));
      }
      if (a.head_dim == 64) launch_mma_dispatch<64>(p, pl, a.rows, q8, stream);
      else launch_mma_dispatch<128>(p, pl, a.rows, q8, stream);
    } else if (a.dtype == DType::bf16) {
      note_slow_path("attention", mma_obstacle(a));
      if (q8) launch_simt_dispatch<bf16, uint8_t>(p, a.rows, stream);
      else launch_simt_dispatch<bf16, bf16>(p, a.rows, stream);
    } else if (q8) {
      launch_simt_dispatch<float, uint8_t>(p, a.rows, stream);
    } else {
      launch_simt_dispatch<float, float>(p, a.rows, stream);
    }
    check(cudaGetLastError(), "attention kernel launch");
  }

  // 4. Window logits (and their log-sum-exp).
  if (p.n_window > 0 && p.n_keys > 0) {
    if ((p.n_window + kWinQ - 1) / kWinQ > 65535 || pairs > 65535)
      throw BackendError(StatusCode::internal, "attention: too many window rows or (row, head) pairs");
    if (q8) {
      if (a.dtype == DType::bf16) launch_window<bf16, uint8_t>(p, a.rows, stream);
      else launch_window<float, uint8_t>(p, a.rows, stream);
    } else if (a.dtype == DType::bf16) {
      launch_window<bf16, bf16>(p, a.rows, stream);
    } else {
      launch_window<float, float>(p, a.rows, stream);
    }
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
