// evict_compact: for every (r, h), hist[r,h,i,:] <- U[keep[r,h,i]] for i in [0, n_keep), for K and V, in
// place, where U = [hist[r,h,0:hist_len) ‖ cur[r,h,0:lc)].
// Shapes: hist [P,H,T,D] (a pool of P pages of T tokens: history position t of (r, h) is pool row
// kv_page_row(pages, H, r, h, t), backend.h; without a page table P = R and T = Hcap), cur [R,H,Lc,D],
// keep [R,H,K]. Bytes moved: <= 2 * 2*R*H*K*D*dsize (twice that with repeats).
//
// Kernels, in launch order:
//   evict_validate_kernel    one block per (r,h): keep in [0, hist_len+lc), strictly increasing (non-decreasing
//                            with repeats), and K <= Hcap; the (r, 0) block also checks the page-table entries
//                            of row r covering [0, max(hist_len, K)) (read or written) against [0, P); else
//                            status (index_out_of_range / index_not_sorted, detail = the flat index of the bad
//                            entry in keep or the table). It runs to completion before the compaction starts
//                            (stream order), so a bad list or page anywhere means nothing moves anywhere.
//   evict_compact_kernel<V>  one block (256 threads) per (r,h). The kept rows, flattened to K*D*dsize/sizeof(V)
//                            vectors V (uint4 when row bytes and pointers allow, else 4 or 2 bytes), are moved
//                            in chunks of 256*kPieces vectors: every thread loads its vectors of the chunk
//                            (K and V) into registers, __syncthreads, stores them to the destination, then
//                            __syncthreads again before the next chunk.
//
// Why in place is safe: keep is strictly increasing and >= 0, so keep[i] >= i. A vector at flat position
// e = i*rowvec + c (destination row i) comes from history position keep[i]*rowvec + c >= e (or from the
// separate current buffer). A chunk covers flat positions [e0, e0 + chunk): it writes only there, and every
// later chunk reads history positions >= its own e > e0 + chunk - 1, so no write clobbers a source still
// to be read. Inside one chunk a destination may be another piece's source (keep[i] = i+1), which is why
// the whole chunk is loaded into registers before any of it is stored. Rows with keep[i] == i taken from
// the history are no-op moves and are skipped. All of this is about logical history positions: the pages only
// relocate them, and distinct positions of one (r, h) are distinct pool rows (a row's table names distinct pages).
//
// 8-bit K/V (kv_format int8/fp8): the rows are u8 and move as any other bytes; their tokens' scale bytes
// ([pages, H, T] and [R, H, Lc], one per token for K and V together) move by a second launch of the same kernel
// with rows of one byte and no V (the pool row index is the scale's index), after the rows in stream order.
//
// Repeats (a non-decreasing list: the official gather of the duplicates average pooling can select) break
// keep[i] >= i, so the same block works in three steps. (1) rank[i] = distinct values among keep[0..i] - 1,
// by a block scan, into the workspace. (2) The first occurrence of each value moves to row rank[i]: these
// sources form a strictly increasing list whose j-th entry is >= j, so the forward argument above holds with
// destination rank[i]. (3) Expansion, back to front: row i <- row rank[i] <= i. A chunk covers rows below
// every row already written, and reads only rows <= its own, so it never reads a row a later-processed
// (lower) chunk has not yet produced nor one an earlier (higher) chunk has overwritten; inside the chunk,
// registers again come before stores.
#include <algorithm>

#include "device_common.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kPieces = 4;  // vectors per thread per chunk, for K and for V

// pages_read: the table entries per row the compaction touches (0 without a table).
__global__ void evict_validate_kernel(const int32_t* keep, int n_keep, int n_total, int hist_cap, bool repeats,
                                      KvPages pages, int heads, int pages_read, int32_t* status) {
  const size_t bh = blockIdx.x;
  const int32_t* list = keep + bh * n_keep;
  if (bh == 0 && threadIdx.x == 0 && n_keep > hist_cap) report_status(status, StatusCode::index_out_of_range, n_keep);
  for (int i = threadIdx.x; i < n_keep; i += blockDim.x) {
    const int v = list[i];
    const int32_t flat = static_cast<int32_t>(bh * n_keep + i);
    if (v < 0 || v >= n_total) report_status(status, StatusCode::index_out_of_range, flat);
    else if (i > 0 && (v < list[i - 1] || (v == list[i - 1] && !repeats))) report_status(status, StatusCode::index_not_sorted, flat);
  }
  if (bh % heads != 0) return;  // one block per row checks its table
  const int64_t row_entries = static_cast<int64_t>(bh / heads) * pages.table_pages;
  for (int i = threadIdx.x; i < pages_read; i += blockDim.x) {
    const int v = pages.table[row_entries + i];
    if (v < 0 || v >= pages.pages)
      report_status(status, StatusCode::index_out_of_range, static_cast<int32_t>(row_entries + i));
  }
}

struct CompactParams {
  void* hist_k;
  void* hist_v;  // null: K only (the scale bytes)
  const void* cur_k;
  const void* cur_v;
  const int32_t* keep;
  const int32_t* status;
  int32_t* rank;  // [R*H, K] workspace, with repeats only
  KvPages pages;
  int heads, n_keep, hist_len, lc;
  int row_vecs;  // vectors per row
};

// Offset, in vectors of the pool, of vector c of history position t of (r, h).
__device__ __forceinline__ int64_t hist_vec(const CompactParams& p, int r, int h, int t, int c) {
  return kv_page_row(p.pages, p.heads, r, h, t) * p.row_vecs + c;
}

// Moves the rows `row` of [0, n_rows) with source(row) >= 0 to history position dest(row), front to back in chunks
// (see the header for why this order is safe); source < hist_len reads the history, otherwise the current
// buffer. hk / hv are the pools, ck / cv the current rows of (r, h).
template <typename V, typename Source, typename Dest>
__device__ __forceinline__ void move_forward(const CompactParams& p, int r, int h, V* hk, V* hv, const V* ck,
                                             const V* cv, int n_rows, Source source, Dest dest) {
  const int rv = p.row_vecs;
  const int64_t total = static_cast<int64_t>(n_rows) * rv;
  for (int64_t e0 = 0; e0 < total; e0 += kThreads * kPieces) {
    V k_reg[kPieces], v_reg[kPieces];
    int64_t to[kPieces];
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int64_t e = e0 + i * kThreads + threadIdx.x;
      to[i] = -1;
      if (e < total) {
        const int row = static_cast<int>(e / rv), c = static_cast<int>(e % rv);
        const int src = source(row);
        if (src < 0) continue;
        const int dst = dest(row);
        if (src < p.hist_len) {
          if (src == dst) continue;  // already in place
          const int64_t from = hist_vec(p, r, h, src, c);
          k_reg[i] = hk[from];
          if (hv) v_reg[i] = hv[from];
        } else {
          k_reg[i] = ck[static_cast<int64_t>(src - p.hist_len) * rv + c];
          if (hv) v_reg[i] = cv[static_cast<int64_t>(src - p.hist_len) * rv + c];
        }
        to[i] = hist_vec(p, r, h, dst, c);
      }
    }
    __syncthreads();  // every source of this chunk is in registers before any destination is written
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      if (to[i] >= 0) {
        hk[to[i]] = k_reg[i];
        if (hv) hv[to[i]] = v_reg[i];
      }
    }
    __syncthreads();
  }
}

template <typename V>
__global__ void evict_compact_kernel(const CompactParams p) {
  if (p.status[0] != 0) return;  // some list somewhere is bad: move nothing
  const size_t bh = blockIdx.x;
  const int r = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
  const int rv = p.row_vecs;
  V* hk = static_cast<V*>(p.hist_k);
  V* hv = static_cast<V*>(p.hist_v);
  const V* ck = p.cur_k ? static_cast<const V*>(p.cur_k) + bh * p.lc * rv : nullptr;
  const V* cv = p.cur_v ? static_cast<const V*>(p.cur_v) + bh * p.lc * rv : nullptr;
  const int32_t* keep = p.keep + bh * p.n_keep;
  if (!p.rank) {
    move_forward(p, r, h, hk, hv, ck, cv, p.n_keep, [&](int row) { return __ldg(keep + row); },
                 [](int row) { return row; });
    return;
  }

  SKV_DYNAMIC_SMEM(smem_raw);
  int* scratch = reinterpret_cast<int*>(smem_raw);  // [kWarps + 1], for the scan
  int32_t* rank = p.rank + bh * p.n_keep;
  int distinct = 0;  // distinct values before the current chunk of the list
  for (int i0 = 0; i0 < p.n_keep; i0 += kThreads) {
    const int i = i0 + static_cast<int>(threadIdx.x);
    const int first = i < p.n_keep && (i == 0 || keep[i] != keep[i - 1]);
    int chunk_total;
    const int before = block_exclusive_scan<kWarps>(first, scratch, &chunk_total);
    if (i < p.n_keep) rank[i] = distinct + before + first - 1;
    distinct += chunk_total;
  }
  __syncthreads();  // ranks visible to the whole block
  move_forward(
      p, r, h, hk, hv, ck, cv, p.n_keep, [&](int row) { return row == 0 || keep[row] != keep[row - 1] ? keep[row] : -1; },
      [&](int row) { return rank[row]; });
  // Expansion, back to front: row i <- row rank[i] (<= i), rows that already hold their value skipped.
  const int64_t total = static_cast<int64_t>(p.n_keep) * rv;
  for (int64_t e1 = total; e1 > 0; e1 -= kThreads * kPieces) {
    V k_reg[kPieces], v_reg[kPieces];
    int64_t to[kPieces];
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int64_t e = e1 - 1 - (i * kThreads + threadIdx.x);
      to[i] = -1;
      if (e >= 0) {
        const int row = static_cast<int>(e / rv), c = static_cast<int>(e % rv);
        const int from = rank[row];
        if (from != row) {
          const int64_t src = hist_vec(p, r, h, from, c);
          k_reg[i] = hk[src];
          if (hv) v_reg[i] = hv[src];
          to[i] = hist_vec(p, r, h, row, c);
        }
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      if (to[i] >= 0) {
        hk[to[i]] = k_reg[i];
        if (hv) hv[to[i]] = v_reg[i];
      }
    }
    __syncthreads();
  }
}

template <typename V>
void launch_compact(const CompactParams& p, unsigned blocks, cudaStream_t stream) {
  auto kernel = evict_compact_kernel<V>;
  const size_t smem = p.rank ? (kWarps + 1) * sizeof(int) : 0;
  SKV_LAUNCH(kernel, dim3(blocks), dim3(kThreads), smem, stream, p);
}

bool aligned(const void* ptr, size_t n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; }

}  // namespace

size_t evict_compact_workspace_bytes(const EvictCompactArgs& a) {
  return a.repeats ? static_cast<size_t>(a.rows) * a.heads * a.n_keep * sizeof(int32_t) : 0;
}

void evict_compact(const EvictCompactArgs& a, cudaStream_t stream, int32_t* status, void* workspace) {
  const bool quantised = a.kv_format != KvFormat::plain;
  if (quantised ? a.dtype != DType::u8 : a.dtype != DType::f32 && a.dtype != DType::bf16)
    throw BackendError(StatusCode::internal, std::string("evictCompact: unsupported dtype ") + dtype_name(a.dtype));
  const int64_t pairs = static_cast<int64_t>(a.rows) * a.heads;
  if (pairs == 0 || a.n_keep == 0) return;
  if (a.lc > 0 && (!a.cur_k || !a.cur_v))
    throw BackendError(StatusCode::internal, "evictCompact: lc > 0 needs current K and V");

  // The compaction reads history positions [0, hist_len) and writes [0, n_keep); n_keep > hist_cap is reported
  // by the keep check, the clamp keeps the table check inside the table.
  const int tokens_touched = std::max(a.hist_len, a.n_keep);
  const int pages_read = a.hist_pages.table ? std::min((tokens_touched + a.hist_pages.page_tokens - 1) /
                                                           a.hist_pages.page_tokens, a.hist_pages.table_pages)
                                            : 0;
  SKV_LAUNCH(evict_validate_kernel, dim3(static_cast<unsigned>(pairs)), dim3(kThreads), 0, stream, a.keep, a.n_keep,
             a.hist_len + a.lc, a.hist_cap, a.repeats, a.hist_pages, a.heads, pages_read, status);

  // Widest vector that divides the row and every base pointer (all allocations are 256-aligned, so this is
  // 16 bytes except for odd head dims or offset views; 8-bit rows of an odd head dim move byte by byte).
  const size_t row_bytes = static_cast<size_t>(a.head_dim) * dtype_size(a.dtype);
  auto fits = [&](size_t n) {
    return row_bytes % n == 0 && aligned(a.hist_k, n) && aligned(a.hist_v, n) && aligned(a.cur_k, n) &&
           aligned(a.cur_v, n);
  };
  const size_t vec = fits(16) ? 16 : fits(4) ? 4 : fits(2) ? 2 : 1;
  if (quantised && (!a.hist_scales || (a.lc > 0 && !a.cur_scales)))
    throw BackendError(StatusCode::internal, "evictCompact: 8-bit K/V needs their scales");

  CompactParams p{};
  p.hist_k = a.hist_k;
  p.hist_v = a.hist_v;
  p.cur_k = a.cur_k;
  p.cur_v = a.cur_v;
  p.keep = a.keep;
  p.status = status;
  p.rank = a.repeats ? static_cast<int32_t*>(workspace) : nullptr;
  p.pages = a.hist_pages;
  p.heads = a.heads;
  p.n_keep = a.n_keep;
  p.hist_len = a.hist_len;
  p.lc = a.lc;
  p.row_vecs = static_cast<int>(row_bytes / vec);
  const unsigned blocks = static_cast<unsigned>(pairs);
  if (vec == 16) launch_compact<uint4>(p, blocks, stream);
  else if (vec == 4) launch_compact<uint32_t>(p, blocks, stream);
  else if (vec == 2) launch_compact<uint16_t>(p, blocks, stream);
  else launch_compact<uint8_t>(p, blocks, stream);
  if (quantised) {
    p.hist_k = a.hist_scales;
    p.hist_v = nullptr;
    p.cur_k = a.cur_scales;
    p.cur_v = nullptr;
    p.row_vecs = 1;
    launch_compact<uint8_t>(p, blocks, stream);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, "evictCompact: launch failed: CUDA error " + std::to_string(static_cast<int>(err)));
}

}  // namespace scalekv::cuda_ops
