// group_norm: per (b, g), mean and biased variance over the group's cpg*S values (groups are contiguous in
// NCHW), y = (x - mean) * rstd * weight[c] + bias[c], optional swish y * sigmoid(y). out may be x.
// Bytes: 2 reads + 1 write of x.
//
// Kernels, in launch order:
//   group_norm_stats_kernel     grid (chunks, B*G), 256 threads: Welford over one chunk of a group per block
//                               (per thread, then merged across lanes and warps with Chan's formula), written
//                               as a partial (count, mean, M2). Chunks make long groups (4M values at 1024^2)
//                               spread over the device instead of one block each.
//   group_norm_finalize_kernel  one thread per (b, g) merges its partials into mean and rstd (f32).
//   group_norm_apply_kernel<T,P> grid (ceil(S / (256*4)), B*C): a block normalises part of one channel plane,
//                               so the channel's scale and shift are loaded once.
// Welford keeps the variance exact enough when |mean| >> std, where E[x^2] - E[x]^2 would cancel.
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

constexpr int kStatsThreads = 256;
constexpr int kMaxChunks = 64;
constexpr int64_t kMinChunk = 4096;
constexpr int kApplyPerThread = 4;

struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ Moments merge(Moments a, Moments b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean, fb = b.n / n;
  return Moments{n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

int64_t chunk_length(int64_t group_size) {
  return std::max(kMinChunk, (group_size + kMaxChunks - 1) / kMaxChunks);
}

template <typename T>
__global__ void group_norm_stats_kernel(const T* x, int64_t group_size, int64_t chunk, Moments* partials) {
  SKV_DYNAMIC_SMEM(smem_raw);
  Moments* warp_moments = reinterpret_cast<Moments*>(smem_raw);
  const int64_t group = blockIdx.y;
  const int64_t begin = blockIdx.x * chunk, end = begin + chunk < group_size ? begin + chunk : group_size;
  const T* g = x + group * group_size;
  Moments m{0.0f, 0.0f, 0.0f};
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float v = to_f32(g[i]);
    m.n += 1.0f;
    const float d = v - m.mean;
    m.mean += d / m.n;
    m.m2 += d * (v - m.mean);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const Moments other{__shfl_xor_sync(0xffffffffu, m.n, o), __shfl_xor_sync(0xffffffffu, m.mean, o),
                        __shfl_xor_sync(0xffffffffu, m.m2, o)};
    m = merge(m, other);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_moments[warp] = m;
  __syncthreads();
  if (threadIdx.x == 0) {
    Moments total = warp_moments[0];
    for (int w = 1; w < static_cast<int>(blockDim.x / 32); ++w) total = merge(total, warp_moments[w]);
    partials[group * gridDim.x + blockIdx.x] = total;
  }
}

__global__ void group_norm_finalize_kernel(const Moments* partials, int chunks, int groups_total, float eps,
                                           float2* stats) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups_total) return;
  Moments total = partials[static_cast<int64_t>(g) * chunks];
  for (int c = 1; c < chunks; ++c) total = merge(total, partials[static_cast<int64_t>(g) * chunks + c]);
  const float var = total.n > 0.0f ? total.m2 / total.n : 0.0f;
  stats[g] = make_float2(total.mean, rsqrtf(var + eps));
}

template <typename T, typename P>
__global__ void group_norm_apply_kernel(const T* x, const P* weight, const P* bias, const float2* stats, T* out,
                                        int channels, int channels_per_group, int64_t spatial, bool swish) {
  const int64_t plane = blockIdx.y;  // b * C + c
  const int c = static_cast<int>(plane % channels);
  const int64_t group = plane / channels * (channels / channels_per_group) + c / channels_per_group;
  const float2 st = stats[group];
  const float s = st.y * to_f32(weight[c]), t = to_f32(bias[c]);
  const T* src = x + plane * spatial;
  T* dst = out + plane * spatial;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * blockDim.x * kApplyPerThread;
  for (int j = 0; j < kApplyPerThread; ++j) {
    const int64_t i = begin + j * blockDim.x + threadIdx.x;
    if (i >= spatial) break;
    float y = (to_f32(src[i]) - st.x) * s + t;
    if (swish) y = y / (1.0f + expf(-y));
    dst[i] = from_f32<T>(y);
  }
}

}  // namespace

size_t group_norm_workspace_bytes(const GroupNormArgs& a) {
  const int64_t group_size = int64_t(a.channels / a.groups) * a.spatial;
  const int64_t chunks = std::max<int64_t>(1, (group_size + chunk_length(group_size) - 1) / chunk_length(group_size));
  const int64_t groups_total = int64_t(a.batch) * a.groups;
  // partials, then the (mean, rstd) pairs at a 256-byte aligned offset
  return static_cast<size_t>((groups_total * chunks * sizeof(Moments) + 255) / 256 * 256 + groups_total * sizeof(float2));
}

void group_norm(const GroupNormArgs& a, cudaStream_t stream, void* workspace) {
  const int cpg = a.channels / a.groups;
  const int64_t group_size = int64_t(cpg) * a.spatial;
  const int groups_total = a.batch * a.groups;
  if (groups_total == 0 || group_size == 0) return;
  const int64_t chunk = chunk_length(group_size);
  const int chunks = static_cast<int>((group_size + chunk - 1) / chunk);
  Moments* partials = static_cast<Moments*>(workspace);
  float2* stats = reinterpret_cast<float2*>(static_cast<char*>(workspace) +
                                            (int64_t(groups_total) * chunks * sizeof(Moments) + 255) / 256 * 256);
  const size_t stats_smem = (kStatsThreads / 32) * sizeof(Moments);
  elem::dispatch_float(a.dtype, "groupNorm", [&](auto tag) {
    using T = decltype(tag);
    SKV_LAUNCH(group_norm_stats_kernel<T>, dim3(chunks, groups_total), dim3(kStatsThreads), stats_smem, stream,
               static_cast<const T*>(a.x), group_size, chunk, partials);
  });
  SKV_LAUNCH(group_norm_finalize_kernel, dim3((groups_total + 127) / 128), dim3(128), 0, stream, partials, chunks,
             groups_total, a.eps, stats);
  const dim3 grid(static_cast<unsigned>((a.spatial + elem::kThreads * kApplyPerThread - 1) / (elem::kThreads * kApplyPerThread)),
                  static_cast<unsigned>(int64_t(a.batch) * a.channels));
  elem::dispatch_float(a.dtype, "groupNorm", [&](auto tag) {
    using T = decltype(tag);
    elem::dispatch_float(a.param_dtype, "groupNorm", [&](auto ptag) {
      using P = decltype(ptag);
      SKV_LAUNCH((group_norm_apply_kernel<T, P>), grid, dim3(elem::kThreads), 0, stream, static_cast<const T*>(a.x),
                 static_cast<const P*>(a.weight), static_cast<const P*>(a.bias), stats, static_cast<T*>(a.out),
                 a.channels, cpg, a.spatial, a.swish);
    });
  });
  elem::check_launch("groupNorm");
}

}  // namespace scalekv::cuda_ops
