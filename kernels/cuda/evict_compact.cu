// evict_compact: for every (r, h), hist[r,h,i,:] <- U[keep[r,h,i]] for i in [0, n_keep), for K and V, in
// place, where U = [hist[r,h,0:hist_len) ‖ cur[r,h,0:lc)].
// Shapes: hist [R,H,Hcap,D], cur [R,H,Lc,D], keep [R,H,K]. Bytes moved: <= 2 * 2*R*H*K*D*dsize.
//
// Kernels, in launch order:
//   evict_validate_kernel    one block per (r,h): keep in [0, hist_len+lc) and strictly increasing, and
//                            K <= Hcap; else status (index_out_of_range / index_not_sorted, detail = the flat
//                            index of the bad entry). It runs to completion before the compaction starts
//                            (stream order), so a bad list anywhere means nothing moves anywhere.
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
// the history are no-op moves and are skipped.
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kPieces = 4;  // vectors per thread per chunk, for K and for V

__device__ __forceinline__ void report_status(int32_t* status, StatusCode code, int32_t detail) {
  if (atomicCAS(reinterpret_cast<int*>(status), 0, static_cast<int>(code)) == 0) status[1] = detail;
}

__global__ void evict_validate_kernel(const int32_t* keep, int n_keep, int n_total, int hist_cap, int32_t* status) {
  const size_t bh = blockIdx.x;
  const int32_t* list = keep + bh * n_keep;
  if (bh == 0 && threadIdx.x == 0 && n_keep > hist_cap) report_status(status, StatusCode::index_out_of_range, n_keep);
  for (int i = threadIdx.x; i < n_keep; i += blockDim.x) {
    const int v = list[i];
    const int32_t flat = static_cast<int32_t>(bh * n_keep + i);
    if (v < 0 || v >= n_total) report_status(status, StatusCode::index_out_of_range, flat);
    else if (i > 0 && v <= list[i - 1]) report_status(status, StatusCode::index_not_sorted, flat);
  }
}

struct CompactParams {
  void* hist_k;
  void* hist_v;
  const void* cur_k;
  const void* cur_v;
  const int32_t* keep;
  const int32_t* status;
  int n_keep, hist_cap, hist_len, lc;
  int row_vecs;  // vectors per row
};

template <typename V>
__global__ void evict_compact_kernel(const CompactParams p) {
  if (p.status[0] != 0) return;  // some list somewhere is bad: move nothing
  const size_t bh = blockIdx.x;
  const int rv = p.row_vecs;
  V* hk = static_cast<V*>(p.hist_k) + bh * p.hist_cap * rv;
  V* hv = static_cast<V*>(p.hist_v) + bh * p.hist_cap * rv;
  const V* ck = static_cast<const V*>(p.cur_k) + bh * p.lc * rv;
  const V* cv = static_cast<const V*>(p.cur_v) + bh * p.lc * rv;
  const int32_t* keep = p.keep + bh * p.n_keep;
  const int64_t total = static_cast<int64_t>(p.n_keep) * rv;

  for (int64_t e0 = 0; e0 < total; e0 += kThreads * kPieces) {
    V k_reg[kPieces], v_reg[kPieces];
    bool move[kPieces];
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int64_t e = e0 + i * kThreads + threadIdx.x;
      move[i] = false;
      if (e < total) {
        const int row = static_cast<int>(e / rv), c = static_cast<int>(e % rv);
        const int src = __ldg(keep + row);
        if (src < p.hist_len) {
          move[i] = src != row;  // keep[i] == i from the history: already in place
          if (move[i]) {
            k_reg[i] = hk[static_cast<int64_t>(src) * rv + c];
            v_reg[i] = hv[static_cast<int64_t>(src) * rv + c];
          }
        } else {
          move[i] = true;
          k_reg[i] = ck[static_cast<int64_t>(src - p.hist_len) * rv + c];
          v_reg[i] = cv[static_cast<int64_t>(src - p.hist_len) * rv + c];
        }
      }
    }
    __syncthreads();  // every source of this chunk is in registers before any destination is written
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      if (move[i]) {
        const int64_t e = e0 + i * kThreads + threadIdx.x;
        hk[e] = k_reg[i];
        hv[e] = v_reg[i];
      }
    }
    __syncthreads();  // (not needed by the argument above, which keeps chunks disjoint; kept for clarity)
  }
}

template <typename V>
void launch_compact(const CompactParams& p, unsigned blocks, cudaStream_t stream) {
  auto kernel = evict_compact_kernel<V>;
  SKV_LAUNCH(kernel, dim3(blocks), dim3(kThreads), 0, stream, p);
}

bool aligned(const void* ptr, size_t n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; }

}  // namespace

size_t evict_compact_workspace_bytes(const EvictCompactArgs&) { return 0; }

void evict_compact(const EvictCompactArgs& a, cudaStream_t stream, int32_t* status, void* /*workspace*/) {
  if (a.dtype != DType::f32 && a.dtype != DType::bf16)
    throw BackendError(StatusCode::internal, std::string("evictCompact: unsupported dtype ") + dtype_name(a.dtype));
  const int64_t pairs = static_cast<int64_t>(a.rows) * a.heads;
  if (pairs == 0 || a.n_keep == 0) return;
  if (a.lc > 0 && (!a.cur_k || !a.cur_v))
    throw BackendError(StatusCode::internal, "evictCompact: lc > 0 needs current K and V");

  SKV_LAUNCH(evict_validate_kernel, dim3(static_cast<unsigned>(pairs)), dim3(kThreads), 0, stream, a.keep, a.n_keep,
             a.hist_len + a.lc, a.hist_cap, status);

  // Widest vector that divides the row and every base pointer (all allocations are 256-aligned, so this is
  // 16 bytes except for odd head dims or offset views).
  const size_t row_bytes = static_cast<size_t>(a.head_dim) * dtype_size(a.dtype);
  auto fits = [&](size_t n) {
    return row_bytes % n == 0 && aligned(a.hist_k, n) && aligned(a.hist_v, n) && aligned(a.cur_k, n) &&
           aligned(a.cur_v, n);
  };
  const size_t vec = fits(16) ? 16 : fits(4) ? 4 : 2;
  if (!fits(vec))
    throw BackendError(StatusCode::internal, "evictCompact: tensors must be at least 2-byte aligned");

  CompactParams p{};
  p.hist_k = a.hist_k;
  p.hist_v = a.hist_v;
  p.cur_k = a.cur_k;
  p.cur_v = a.cur_v;
  p.keep = a.keep;
  p.status = status;
  p.n_keep = a.n_keep;
  p.hist_cap = a.hist_cap;
  p.hist_len = a.hist_len;
  p.lc = a.lc;
  p.row_vecs = static_cast<int>(row_bytes / vec);
  const unsigned blocks = static_cast<unsigned>(pairs);
  if (vec == 16) launch_compact<uint4>(p, blocks, stream);
  else if (vec == 4) launch_compact<uint32_t>(p, blocks, stream);
  else launch_compact<uint16_t>(p, blocks, stream);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, "evictCompact: launch failed: CUDA error " + std::to_string(static_cast<int>(err)));
}

}  // namespace scalekv::cuda_ops
