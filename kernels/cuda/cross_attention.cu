// cross_attention (varlen): out[b, l, h, :] = softmax_j(scale * q[b, l, h, :] . k_j) . v_j over the text tokens
// j in [cu[b], cu[b+1]) of image b (or as many from kv_starts[b] on), head h (K/V rows at k + j * kv_row_stride +
// h * c). Shapes: q/out [B, L, H, c], cu [B + 1], kv_starts [B]. Text segments are short (<= 512), so plain SIMT flash attention serves.
// Cost: 4*B*L*H*n*c FLOP for n text tokens per image.
//
// Kernels, in launch order:
//   cu_seqlens_validate_kernel  cu[0] >= 0, non-decreasing, each segment inside the text; else status index_out_of_range
//                               and the attention kernel writes nothing.
//   cross_attention_kernel<T,DV> grid (ceil(L/16), H, B), 4 warps x 4 query rows. Per 32-token text tile: K and
//                               V to smem as f32 (K rows padded to c+1: lane j reads row j conflict-free), logits
//                               with lane = text token, online softmax in f32, then P V with lane = channel and
//                               p_j broadcast by shuffle. Smem Q [16][c] + K [32][c+1] + V [32][c] f32.
// Race freedom: each block writes only its own output rows; K/V tiles are refilled only after the barrier that
// ends their last read.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kWarps = 4, kRowsPerWarp = 4, kQT = kWarps * kRowsPerWarp, kKT = 32;  // kKT: one key per lane

__global__ void cu_seqlens_validate_kernel(const int32_t* cu, const int32_t* starts, int batch, int n_text, int32_t* status) {
  for (int b = threadIdx.x; b < batch; b += blockDim.x) {
    // With starts the segments only give lengths; the ranges the starts begin must fit the text.
    if (cu[b] < 0 || cu[b] > cu[b + 1] || (!starts && cu[b + 1] > n_text) ||
        (starts && (starts[b] < 0 || static_cast<int64_t>(starts[b]) + cu[b + 1] - cu[b] > n_text)))
      report_status(status, StatusCode::index_out_of_range, b);
  }
}

template <typename T, int DV>  // c <= 32 * DV
__global__ void __launch_bounds__(32 * kWarps) cross_attention_kernel(const CrossAttentionArgs a, const int32_t* status) {
  if (status[0] != 0) return;  // bad segments (or an earlier op's error): write nothing
  SKV_DYNAMIC_SMEM(smem_raw);
  const int c = a.head_dim, H = a.heads, L = a.tokens;
  float* sQ = reinterpret_cast<float*>(smem_raw);  // [16][c]
  float* sK = sQ + kQT * c;                         // [32][c + 1]
  float* sV = sK + kKT * (c + 1);                   // [32][c]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int l0 = blockIdx.x * kQT, h = blockIdx.y, b = blockIdx.z;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const int n = a.cu_seqlens[b + 1] - a.cu_seqlens[b];
  const int first = a.kv_starts ? a.kv_starts[b] : a.cu_seqlens[b];

  for (int e = tid; e < kQT * c; e += 32 * kWarps) {
    const int l = l0 + e / c;
    sQ[e] = l < L ? to_f32(q[((static_cast<int64_t>(b) * L + l) * H + h) * c + e % c]) : 0.0f;
  }
  tx::WarpSoftmaxRows<kRowsPerWarp, DV> acc;
  acc.init();
  const float* qw = sQ + warp * kRowsPerWarp * c;

  for (int j0 = 0; j0 < n; j0 += kKT) {
    for (int e = tid; e < kKT * c; e += 32 * kWarps) {
      const int row = e / c, d = e % c, j = j0 + row;
      const int64_t at = static_cast<int64_t>(first + j) * a.kv_row_stride + static_cast<int64_t>(h) * c + d;
      sK[row * (c + 1) + d] = j < n ? to_f32(k[at]) : 0.0f;
      sV[e] = j < n ? to_f32(v[at]) : 0.0f;
    }
    __syncthreads();  // also publishes sQ on the first tile
    float s[kRowsPerWarp];
    acc.dots(qw, sK + lane * (c + 1), c, s);
    const bool valid = j0 + lane < n;
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = valid ? s[r] * a.scale : -INFINITY;
    acc.add_tile(s, sV, c, lane);
    __syncthreads();  // all reads of sK/sV done before the next tile overwrites them
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int l = l0 + warp * kRowsPerWarp + r;
    if (l < L) acc.store(r, static_cast<T*>(a.out) + ((static_cast<int64_t>(b) * L + l) * H + h) * c, a.dtype, c, lane);
  }
}

template <typename T>
void dispatch(const CrossAttentionArgs& a, cudaStream_t stream, const int32_t* status) {
  const size_t smem = sizeof(float) * (kQT * a.head_dim + kKT * (a.head_dim + 1) + kKT * a.head_dim);
  const dim3 grid((a.tokens + kQT - 1) / kQT, a.heads, a.batch);
  tx::dispatch_channels_per_lane(a.head_dim, [&](auto dv) {
    tx::launch_with_smem<cross_attention_kernel<T, decltype(dv)::value>>("crossAttention", grid, dim3(32 * kWarps), smem, stream, a, status);
  });
}

}  // namespace

void cross_attention(const CrossAttentionArgs& a, cudaStream_t stream, int32_t* status) {
  if (a.batch == 0) return;
  if (a.head_dim <= 0 || a.head_dim > 256)
    throw BackendError(StatusCode::internal, "crossAttention: headDim " + std::to_string(a.head_dim) + " exceeds 256");
  if (a.heads > 65535 || a.batch > 65535)
    throw BackendError(StatusCode::internal, "crossAttention: batch and heads must each be at most 65535");
  SKV_LAUNCH(cu_seqlens_validate_kernel, dim3(1), dim3(256), 0, stream, a.cu_seqlens, a.kv_starts, a.batch, a.n_text, status);
  tx::check_launch("crossAttention validation");
  if (a.tokens == 0) return;
  if (a.dtype == DType::bf16) dispatch<bf16>(a, stream, status);
  else dispatch<float>(a, stream, status);
}

}  // namespace scalekv::cuda_ops
