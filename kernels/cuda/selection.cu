// selection: per (r, h), score every key from the window logits, pool, mask the window keys, keep the top
// (budget - W) keys (ties to the lowest index, -inf eligible) and write them merged with the window keys,
// ascending.  Shapes: logits [R,H,W,N], lse [R,H,W], window_keys [W], out [R,H,budget], pooled [R,H,N].
// Cost: R*H*N*(W + kernel + 4 radix passes + 1 scan pass) simple ops; bytes ~ R*H*N*(4W + 8*6).
//
// Kernels, in launch order:
//   selection_validate_kernel  budget in [W, N] (else budget_invalid), window keys in [0, N) (else
//                              index_out_of_range); the selection kernel then returns without writing.
//   selection_kernel           one block of 512 threads per (r,h); the raw and pooled scores live in a
//                              workspace [2][R*H][N] f32 (N may be ~20000, too much for shared memory, and the
//                              block reads it back from L1/L2). Dynamic smem: the window keys (raw and sorted,
//                              2*W ints), a 256-bin histogram, scan scratch.
//     1. s[j] = sum_w L[w,j] (or exp(L - lse[w])), summed in w order; then s[window keys] = -inf (as the CPU
//        backend: -inf in both modes).
//     2. pooled[j] = max / avg (count_include_pad) of s over [j-k/2, j+k/2] clipped to [0, N), summed left
//        to right; copied to pooled_scores when asked; then pooled[window keys] = -inf.
//     3. Radix select (4 passes of 8 bits, MSB first) on an order-preserving uint32 key of the float
//        (-0 folded onto +0, NaN largest) finds the k-th largest key T and how many entries equal to T are
//        taken (k_eq); the k picked are all keys > T plus the first k_eq keys == T in index order.
//     4. One pass in index order with a block-wide exclusive scan of (count > T, count == T) gives every
//        picked key its rank among the picked. The output is the merge of the picked list (ascending by
//        construction) with the sorted window keys, ties picked-first: picked j goes to
//        rank + #{window < j}; window key i (sorted, value v) goes to i + #{picked <= v}, written by the
//        thread that handles index v. Duplicates (a window key also picked) are kept, as the reference.
// Race freedom: each block owns its (r,h) slice of the workspace and output; phases are separated by
// __syncthreads (which also orders the block's global-memory writes for its own later reads).
#include "device_common.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 512, kWarps = kThreads / 32;

__global__ void selection_validate_kernel(const int32_t* window_keys, int n_window, int n_keys, int budget,
                                          int32_t* status) {
  if (blockIdx.x == 0 && threadIdx.x == 0 && (budget < n_window || budget > n_keys))
    report_status(status, StatusCode::budget_invalid, budget);
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_window; i += gridDim.x * blockDim.x) {
    const int v = window_keys[i];
    if (v < 0 || v >= n_keys) report_status(status, StatusCode::index_out_of_range, i);
  }
}

struct SelParams {
  const float* logits;
  const float* lse;
  const int32_t* window_keys;
  int32_t* out;
  float* pooled_scores;
  float* ws;  // [2][R*H][N]: raw scores, then pooled scores
  const int32_t* status;
  int n_pairs, n_window, n_keys, budget, kernel;
  ScoreMode mode;
  Pooling pooling;
};

// Order-preserving map float -> uint32 (larger float, larger key). -0 is folded onto +0 so that the two
// compare equal (tie to the lowest index), every NaN maps to the largest key.
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t b = __float_as_uint(f);
  if ((b & 0x7fffffffu) == 0) b = 0;
  if ((b & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Number of entries of the ascending array a[0, n) that are < x (lower bound) or <= x (upper bound).
__device__ __forceinline__ int count_less(const int32_t* a, int n, int x, bool or_equal) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] < x || (or_equal && a[mid] == x)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

__global__ void selection_kernel(const SelParams p) {
  if (p.status[0] != 0) return;
  SKV_DYNAMIC_SMEM(smem_raw);
  int* hist = reinterpret_cast<int*>(smem_raw);  // [256]
  int* scratch = hist + 256;                      // [kWarps + 1]
  int* bcast = scratch + kWarps + 1;              // [2]: radix prefix, k remaining
  int32_t* wk_raw = bcast + 2;                    // [W]
  int32_t* wk = wk_raw + p.n_window;              // [W] sorted

  const int tid = threadIdx.x, n = p.n_keys, nw = p.n_window;
  const size_t bh = blockIdx.x;
  float* raw = p.ws + bh * n;
  float* pooled = p.ws + (static_cast<size_t>(p.n_pairs) + bh) * n;
  const float* logits = p.logits + bh * nw * n;
  const float neg_inf = -INFINITY;

  // Window keys, sorted by rank (stable for duplicates); W is small.
  for (int i = tid; i < nw; i += kThreads) wk_raw[i] = p.window_keys[i];
  __syncthreads();
  for (int i = tid; i < nw; i += kThreads) {
    const int v = wk_raw[i];
    int rank = 0;
    for (int j = 0; j < nw; ++j) rank += (wk_raw[j] < v) || (wk_raw[j] == v && j < i);
    wk[rank] = v;
  }

  // 1. Raw scores.
  for (int j = tid; j < n; j += kThreads) {
    float acc = 0.0f;
    for (int w = 0; w < nw; ++w) {
      const float x = logits[static_cast<size_t>(w) * n + j];
      acc += p.mode == ScoreMode::logits ? x : expf(x - p.lse[bh * nw + w]);
    }
    raw[j] = acc;
  }
  __syncthreads();
  for (int i = tid; i < nw; i += kThreads) raw[wk_raw[i]] = neg_inf;
  __syncthreads();

  // 2. Pooling.
  const int half = p.kernel / 2;
  const bool pool = p.pooling != Pooling::none && p.kernel > 1;
  for (int j = tid; j < n; j += kThreads) {
    float v = raw[j];
    if (pool) {
      const int lo = j - half < 0 ? 0 : j - half, hi = j + half > n - 1 ? n - 1 : j + half;
      if (p.pooling == Pooling::max) {
        v = neg_inf;
        for (int t = lo; t <= hi; ++t) v = fmaxf(v, raw[t]);
      } else {
        float sum = 0.0f;
        for (int t = lo; t <= hi; ++t) sum += raw[t];
        v = sum / static_cast<float>(p.kernel);
      }
    }
    pooled[j] = v;
    if (p.pooled_scores) p.pooled_scores[bh * n + j] = v;
  }
  __syncthreads();
  for (int i = tid; i < nw; i += kThreads) pooled[wk_raw[i]] = neg_inf;
  __syncthreads();

  // 3. Radix select of the k-th largest key.
  const int k = p.budget - nw;
  uint32_t prefix = 0, prefix_mask = 0;
  int k_rem = k;  // rank of the wanted key among those matching the prefix (1 = largest)
  if (k > 0) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
      __syncthreads();
      for (int j = tid; j < n; j += kThreads) {
        const uint32_t u = order_key(pooled[j]);
        if ((u & prefix_mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1);
      }
      __syncthreads();
      if (tid == 0) {
        int above = 0, digit = 0;
        for (int d = 255; d >= 0; --d) {
          if (above + hist[d] >= k_rem) {
            digit = d;
            break;
          }
          above += hist[d];
        }
        bcast[0] = static_cast<int>(prefix | (static_cast<uint32_t>(digit) << shift));
        bcast[1] = k_rem - above;
      }
      __syncthreads();
      prefix = static_cast<uint32_t>(bcast[0]);
      prefix_mask |= 255u << shift;
      k_rem = bcast[1];
      // The next write of bcast (thread 0, next pass) comes after two more barriers: no one reads it stale.
    }
  }
  const uint32_t T = prefix;
  const int k_eq = k_rem;  // entries equal to T that are taken, lowest indices first

  // 4. Emit, in index order. Packed counts: bits 0-15 = (> T), bits 16-31 = (== T); a chunk has <= 512.
  int32_t* out = p.out + bh * p.budget;
  int gt_run = 0, eq_run = 0;
  for (int base = 0; base < n; base += kThreads) {
    const int j = base + tid;
    int gt = 0, eq = 0;
    if (j < n && k > 0) {
      const uint32_t u = order_key(pooled[j]);
      gt = u > T;
      eq = u == T;
    }
    int total = 0;
    const int excl = block_exclusive_scan<kWarps>(gt | (eq << 16), scratch, &total);
    if (j < n) {
      const int gt_before = gt_run + (excl & 0xffff), eq_before = eq_run + (excl >> 16);
      if (gt || (eq && eq_before < k_eq)) {
        const int rank = gt_before + (eq_before < k_eq ? eq_before : k_eq);
        out[rank + count_less(wk, nw, j, false)] = j;
      }
      const int w_lo = count_less(wk, nw, j, false), w_hi = count_less(wk, nw, j, true);
      if (w_lo < w_hi) {
        const int eq_incl = eq_before + eq;
        const int picked_le = gt_before + gt + (eq_incl < k_eq ? eq_incl : k_eq);
        for (int i = w_lo; i < w_hi; ++i) out[i + picked_le] = j;
      }
    }
    gt_run += total & 0xffff;
    eq_run += total >> 16;
  }
}

}  // namespace

size_t selection_workspace_bytes(const SelectionArgs& a) {
  return 2 * static_cast<size_t>(a.rows) * a.heads * static_cast<size_t>(a.n_keys) * sizeof(float);
}

void selection(const SelectionArgs& a, cudaStream_t stream, int32_t* status, void* workspace) {
  const int64_t pairs = static_cast<int64_t>(a.rows) * a.heads;
  if (pairs == 0) return;
  if (a.mode == ScoreMode::probs && a.n_window > 0 && !a.lse)
    throw BackendError(StatusCode::internal, "selection: probs mode needs lse");
  if (a.kernel < 1) throw BackendError(StatusCode::internal, "selection: pooling kernel must be >= 1");

  SKV_LAUNCH(selection_validate_kernel, dim3(1), dim3(256), 0, stream, a.window_keys, a.n_window, a.n_keys,
             a.budget, status);
  if (a.n_keys > 0) {
    SelParams p{};
    p.logits = a.logits;
    p.lse = a.lse;
    p.window_keys = a.window_keys;
    p.out = a.out;
    p.pooled_scores = a.pooled_scores;
    p.ws = static_cast<float*>(workspace);
    p.status = status;
    p.n_pairs = static_cast<int>(pairs);
    p.n_window = a.n_window;
    p.n_keys = a.n_keys;
    p.budget = a.budget;
    p.kernel = a.kernel;
    p.mode = a.mode;
    p.pooling = a.pooling;
    const size_t smem = (256 + kWarps + 1 + 2 + 2 * static_cast<size_t>(a.n_window)) * sizeof(int);
    static SmemOptIn smem_set;  // raised as window sizes grow: at most a few calls per device
    opt_in_smem(selection_kernel, smem, smem_set, "selection (window keys in shared memory)");
    SKV_LAUNCH(selection_kernel, dim3(static_cast<unsigned>(pairs)), dim3(kThreads), smem, stream, p);
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw BackendError(StatusCode::device, "selection: launch failed: CUDA error " + std::to_string(static_cast<int>(err)));
}

}  // namespace scalekv::cuda_ops
