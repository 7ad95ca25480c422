// segment_attention (varlen self-attention with an optional relative-position bias, T5's encoder attention):
// within each segment [cu[s], cu[s+1]) of packed tokens, out[i, h] = softmax_j(scale * q_i . k_j +
// bias[h, clamp(j - i, -R, R) + R]) v_j. qkv [T, 3, H, c], out [T, H, c]. Segments are prompts (<= 512
// tokens), so plain SIMT flash attention serves; the projections around it are the encoder's FLOPs.
// Cost: 4*H*c*sum(n_s^2) FLOP.
//
// Kernels, in launch order:
//   segments_validate_kernel    cu[0] = 0, non-decreasing, cu[S] = T, every length <= max_seqlen; else status
//                               index_out_of_range and the attention kernel writes nothing.
//   segment_attention_kernel<T,DV> grid (ceil(max_seqlen/16), H, S), 4 warps x 4 query rows; a block past
//                               its segment's end exits. Per 32-key tile: K and V to smem as f32 (K rows
//                               padded to c+1: lane j reads row j conflict-free), logits with lane = key,
//                               the bias read through the read-only cache, online softmax in f32, then P V
//                               with lane = channel and p_j broadcast by shuffle. Smem Q [16][c] + K [32][c+1]
//                               + V [32][c] f32.
// Race freedom: each block writes only its own output rows; K/V tiles are refilled only after the barrier that
// ends their last read.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kWarps = 4, kRowsPerWarp = 4, kQT = kWarps * kRowsPerWarp, kKT = 32;  // kKT: one key per lane

__global__ void segments_validate_kernel(const SegmentAttentionArgs a, int32_t* status) {
  const int32_t* cu = a.cu_seqlens;
  if (threadIdx.x == 0 && (cu[0] != 0 || cu[a.segments] != a.tokens)) report_status(status, StatusCode::index_out_of_range, 0);
  for (int s = threadIdx.x; s < a.segments; s += blockDim.x) {
    if (cu[s] > cu[s + 1] || cu[s + 1] - cu[s] > a.max_seqlen) report_status(status, StatusCode::index_out_of_range, s);
  }
}

template <typename T, int DV>  // c <= 32 * DV
__global__ void __launch_bounds__(32 * kWarps) segment_attention_kernel(const SegmentAttentionArgs a, const int32_t* status) {
  if (status[0] != 0) return;  // bad segments (or an earlier op's error): write nothing
  const int first = a.cu_seqlens[blockIdx.z], n = a.cu_seqlens[blockIdx.z + 1] - first;
  const int i0 = blockIdx.x * kQT;
  if (i0 >= n) return;
  SKV_DYNAMIC_SMEM(smem_raw);
  const int c = a.head_dim, H = a.heads, R = (a.span - 1) / 2;
  const int64_t token_stride = 3 * static_cast<int64_t>(H) * c;
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [16][c]
  float* sK = sQ + kQT * c;                         // [32][c + 1]
  float* sV = sK + kKT * (c + 1);                   // [32][c]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int h = blockIdx.y;
  const T* qkv = static_cast<const T*>(a.qkv);
  const float* bias = a.relative_bias ? a.relative_bias + static_cast<int64_t>(h) * a.span : nullptr;

  for (int e = tid; e < kQT * c; e += 32 * kWarps) {
    const int i = i0 + e / c;
    sQ[e] = i < n ? to_f32(qkv[(first + i) * token_stride + static_cast<int64_t>(h) * c + e % c]) : 0.0f;
  }
  tx::WarpSoftmaxRows<kRowsPerWarp, DV> acc;
  acc.init();
  const float* qw = sQ + warp * kRowsPerWarp * c;

  for (int j0 = 0; j0 < n; j0 += kKT) {
    for (int e = tid; e < kKT * c; e += 32 * kWarps) {
      const int row = e / c, d = e % c, j = j0 + row;
      const int64_t at = (first + j) * token_stride + static_cast<int64_t>(h) * c + d;
      sK[row * (c + 1) + d] = j < n ? to_f32(qkv[at + static_cast<int64_t>(H) * c]) : 0.0f;
      sV[e] = j < n ? to_f32(qkv[at + 2 * static_cast<int64_t>(H) * c]) : 0.0f;
    }
    __syncthreads();  // also publishes sQ on the first tile
    float s[kRowsPerWarp];
    acc.dots(qw, sK + lane * (c + 1), c, s);
    const int j = j0 + lane;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = i0 + warp * kRowsPerWarp + r;
      float x = -INFINITY;
      if (j < n) {
        x = s[r] * a.scale;
        if (bias) x += __ldg(bias + min(max(j - i, -R), R) + R);
      }
      s[r] = x;
    }
    acc.add_tile(s, sV, c, lane);
    __syncthreads();  // all reads of sK/sV done before the next tile overwrites them
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = i0 + warp * kRowsPerWarp + r;
    if (i < n) acc.store(r, static_cast<T*>(a.out) + ((first + i) * static_cast<int64_t>(H) + h) * c, a.dtype, c, lane);
  }
}

template <typename T>
void dispatch(const SegmentAttentionArgs& a, cudaStream_t stream, const int32_t* status) {
  const size_t smem = sizeof(float) * (kQT * a.head_dim + kKT * (a.head_dim + 1) + kKT * a.head_dim);
  const dim3 grid((a.max_seqlen + kQT - 1) / kQT, a.heads, a.segments);
  tx::dispatch_channels_per_lane(a.head_dim, [&](auto dv) {
    tx::launch_with_smem<segment_attention_kernel<T, decltype(dv)::value>>("segmentAttention", grid, dim3(32 * kWarps), smem, stream, a, status);
  });
}

}  // namespace

void segment_attention(const SegmentAttentionArgs& a, cudaStream_t stream, int32_t* status) {
  if (a.head_dim <= 0 || a.head_dim > 256)
    throw BackendError(StatusCode::internal, "segmentAttention: headDim " + std::to_string(a.head_dim) + " exceeds 256");
  if (a.heads > 65535 || a.segments > 65535)
    throw BackendError(StatusCode::internal, "segmentAttention: segments and heads must each be at most 65535");
  SKV_LAUNCH(segments_validate_kernel, dim3(1), dim3(256), 0, stream, a, status);
  tx::check_launch("segmentAttention validation");
  if (a.tokens == 0 || a.segments == 0 || a.max_seqlen == 0) return;
  if (a.dtype == DType::bf16) dispatch<bf16>(a, stream, status);
  else dispatch<float>(a, stream, status);
}

}  // namespace scalekv::cuda_ops
