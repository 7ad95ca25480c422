// layer_norm: per row of C channels, n = (x - mean) / sqrt(var + eps), then y = n * (1 + scale[b]) + shift[b]
// (AdaLN), y = n * weight + bias (affine) or y = n. One block of 256 threads per row: the row is staged in smem
// as f32, mean and then the centred variance come from two block sums (the same two-pass order as the CPU).
// Each thread writes only the elements it read, so y may be x. Cost: ~8*rows*C FLOP, one read and one write.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const LayerNormArgs a) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* scratch = reinterpret_cast<float*>(smem_raw);  // [32]
  float* v = scratch + 32;                               // [C]
  const int C = a.channels;
  const int64_t row = blockIdx.x;
  float sum = 0.0f;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    v[c] = tx::load_f32(a.x, a.x_dtype, row * C + c);
    sum += v[c];
  }
  const float mean = tx::block_sum(sum, scratch) / static_cast<float>(C);
  float sq = 0.0f;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    const float d = v[c] - mean;
    sq += d * d;
  }
  const float rstd = 1.0f / sqrtf(tx::block_sum(sq, scratch) / static_cast<float>(C) + a.eps);
  const int64_t b = row / a.tokens;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    float y = (v[c] - mean) * rstd;
    if (a.mode == NormMode::modulate) y = y * (1.0f + a.scale[b * a.scale_stride + c]) + a.shift[b * a.shift_stride + c];
    else if (a.mode == NormMode::affine) y = y * a.weight[c] + a.bias[c];
    tx::store_f32(a.y, a.y_dtype, row * C + c, y);
  }
}

}  // namespace

void layer_norm(const LayerNormArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  const int64_t rows = static_cast<int64_t>(a.batch) * a.tokens;
  if (rows == 0) return;
  const size_t smem = tx::row_staging_smem("layerNorm", a.channels, rows);
  SKV_LAUNCH(layer_norm_kernel, dim3(static_cast<unsigned>(rows)), dim3(kThreads), smem, stream, a);
  tx::check_launch("layerNorm");
}

}  // namespace scalekv::cuda_ops
