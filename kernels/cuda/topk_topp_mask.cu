// topk_topp_mask: per row of V logits, the official top-k / top-p masking (contract in backend.h). One block of
// 128 threads per row, the row in smem as f32:
//   top-k: x_i survives iff #{j : x_j > x_i} < k, which keeps exactly the values >= the k-th largest (ties
//          included) without sorting; O(V^2 / 128) per thread.
//   top-p: rank_i = #{j : x_j < x_i} + #{j < i : x_j == x_i} is the stable ascending position; values are
//          scattered to their ranks, then one thread takes the softmax sum and the running sum in rank order, in
//          f32, exactly as the CPU kernel does (a sequential scan keeps the rounding identical; rows are short).
// Smem: values, sorted values and rank -> index, 12 * V bytes (V <= 4096). out may be logits.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads) topk_topp_mask_kernel(const TopkToppMaskArgs a, float limit) {
  SKV_DYNAMIC_SMEM(smem_raw);
  const int V = a.vocab;
  float* x = reinterpret_cast<float*>(smem_raw);    // [V] the row
  float* sorted = x + V;                             // [V] scratch: masked row, then values in rank order
  int* index_of = reinterpret_cast<int*>(sorted + V);  // [V] rank -> index
  const float* in = a.logits + static_cast<int64_t>(blockIdx.x) * V;
  float* out = a.out + static_cast<int64_t>(blockIdx.x) * V;
  for (int i = threadIdx.x; i < V; i += kThreads) x[i] = in[i];
  __syncthreads();
  if (a.top_k > 0) {
    const int k = min(a.top_k, V);
    for (int i = threadIdx.x; i < V; i += kThreads) {
      int greater = 0;
      for (int j = 0; j < V; ++j) greater += x[j] > x[i];
      sorted[i] = greater < k ? x[i] : -INFINITY;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < V; i += kThreads) x[i] = sorted[i];
    __syncthreads();
  }
  if (a.top_p > 0.0) {
    for (int i = threadIdx.x; i < V; i += kThreads) {
      int rank = 0;
      for (int j = 0; j < V; ++j) rank += x[j] < x[i] || (x[j] == x[i] && j < i);
      sorted[rank] = x[i];
      index_of[rank] = i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const float mx = sorted[V - 1];
      float sum = 0.0f;
      for (int r = 0; r < V; ++r) sum += expf(sorted[r] - mx);
      float cum = 0.0f;
      for (int r = 0; r < V - 1; ++r) {
        cum += expf(sorted[r] - mx) / sum;
        if (cum <= limit) x[index_of[r]] = -INFINITY;
      }
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < V; i += kThreads) out[i] = x[i];
}

}  // namespace

void topk_topp_mask(const TopkToppMaskArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  if (a.rows == 0) return;
  if (a.vocab > 4096)
    throw BackendError(StatusCode::internal, "topkTopPMask: V = " + std::to_string(a.vocab) +
                                                 " exceeds the CUDA kernel's limit of 4096");
  if (a.rows > 0x7fffffff) throw BackendError(StatusCode::internal, "topkTopPMask: too many rows");
  const size_t smem = static_cast<size_t>(a.vocab) * (2 * sizeof(float) + sizeof(int));
  SKV_LAUNCH(topk_topp_mask_kernel, dim3(static_cast<unsigned>(a.rows)), dim3(kThreads), smem, stream, a,
             static_cast<float>(1.0 - a.top_p));
  tx::check_launch("topkTopPMask");
}

}  // namespace scalekv::cuda_ops
