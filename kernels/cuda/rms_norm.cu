// rms_norm (T5LayerNorm): per row of C channels, n = x * rsqrt(mean(x^2) + eps), rounded to a bf16 weight's
// dtype, then y = weight * n. One block of 256 threads per row: the row is staged in smem as f32 and the sum of
// squares is one block sum. Each thread writes only the elements it read, so y may be x.
// Cost: ~4*rows*C FLOP, one read and one write.
#include "transformer_common.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const RmsNormArgs a) {
  SKV_DYNAMIC_SMEM(smem_raw);
  float* scratch = reinterpret_cast<float*>(smem_raw);  // [32]
  float* v = scratch + 32;                               // [C]
  const int C = a.channels;
  const int64_t row = blockIdx.x;
  float sq = 0.0f;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    v[c] = tx::load_f32(a.x, a.x_dtype, row * C + c);
    sq += v[c] * v[c];
  }
  const float inv = 1.0f / sqrtf(tx::block_sum(sq, scratch) / static_cast<float>(C) + a.eps);
  for (int c = threadIdx.x; c < C; c += kThreads) {
    float n = v[c] * inv;
    if (a.weight_dtype == DType::bf16) n = __bfloat162float(__float2bfloat16(n));
    tx::store_f32(a.y, a.y_dtype, row * C + c, tx::load_f32(a.weight, a.weight_dtype, c) * n);
  }
}

}  // namespace

void rms_norm(const RmsNormArgs& a, cudaStream_t stream, int32_t* /*status*/) {
  if (a.rows == 0) return;
  const size_t smem = tx::row_staging_smem("rmsNorm", a.channels, a.rows);
  SKV_LAUNCH(rms_norm_kernel, dim3(static_cast<unsigned>(a.rows)), dim3(kThreads), smem, stream, a);
  tx::check_launch("rmsNorm");
}

}  // namespace scalekv::cuda_ops
