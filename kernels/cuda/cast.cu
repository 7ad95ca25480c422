// cast: out[i] = in[i] between f32 and bf16 (element.cuh's from_f32: round to nearest even), one element per
// thread-iteration; equal dtypes copy. Bytes: count * (in dsize + out dsize).
#include <type_traits>

#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

template <typename In, typename Out>
__global__ void cast_kernel(const In* in, Out* out, int64_t count) {
  for (int64_t i = elem::global_thread(); i < count; i += elem::global_stride()) {
    if constexpr (std::is_same_v<In, Out>) out[i] = in[i];  // a copy: NaN payloads kept, as on the CPU
    else out[i] = from_f32<Out>(to_f32(in[i]));
  }
}

}  // namespace

void cast(const CastArgs& a, cudaStream_t stream) {
  if (a.count == 0) return;
  elem::dispatch_float(a.in_dtype, "cast", [&](auto in_tag) {
    elem::dispatch_float(a.out_dtype, "cast", [&](auto out_tag) {
      using In = decltype(in_tag);
      using Out = decltype(out_tag);
      SKV_LAUNCH((cast_kernel<In, Out>), dim3(elem::grid_for(a.count)), dim3(elem::kThreads), 0, stream, static_cast<const In*>(a.in),
                 static_cast<Out*>(a.out), a.count);
    });
  });
  elem::check_launch("cast");
}

}  // namespace scalekv::cuda_ops
