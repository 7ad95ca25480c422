// add: out[i] = a[i] + b[i] in f32, rounded to the storage dtype; out may be a or b (each element is read
// before it is written by the same thread). Bytes: 3 * count * dsize.
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

template <typename T>
__global__ void add_kernel(const T* a, const T* b, T* out, int64_t count) {
  for (int64_t i = elem::global_thread(); i < count; i += elem::global_stride())
    out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

}  // namespace

void add(const AddArgs& a, cudaStream_t stream) {
  if (a.count == 0) return;
  elem::dispatch_float(a.dtype, "add", [&](auto tag) {
    using T = decltype(tag);
    SKV_LAUNCH(add_kernel<T>, dim3(elem::grid_for(a.count)), dim3(elem::kThreads), 0, stream,
               static_cast<const T*>(a.a), static_cast<const T*>(a.b), static_cast<T*>(a.out), a.count);
  });
  elem::check_launch("add");
}

}  // namespace scalekv::cuda_ops
