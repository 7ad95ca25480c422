// transpose12: out[out_offset + ((a*C + c)*B + b)*D + d] = in[in_offset + ((a*B + b)*C + c)*D + d], any dtype (moved as raw
// words). One thread per output element. Bytes: 2 * count * dsize.
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

template <typename T>
__global__ void transpose12_kernel(const T* in, T* out, int64_t total, int64_t B, int64_t C, int64_t D) {
  for (int64_t e = elem::global_thread(); e < total; e += elem::global_stride()) {
    const int64_t d = e % D;
    const int64_t b = e / D % B;
    const int64_t c = e / (D * B) % C;
    const int64_t a = e / (D * B * C);
    out[e] = in[((a * B + b) * C + c) * D + d];
  }
}

}  // namespace

void transpose12(const Transpose12Args& a, cudaStream_t stream) {
  const int64_t total = a.a * a.b * a.c * a.d;
  if (total == 0) return;
  elem::dispatch_word(a.dtype, [&](auto word) {
    using T = decltype(word);
    SKV_LAUNCH(transpose12_kernel<T>, dim3(elem::grid_for(total)), dim3(elem::kThreads), 0, stream,
               static_cast<const T*>(a.in) + a.in_offset, static_cast<T*>(a.out) + a.out_offset, total, a.b, a.c, a.d);
  });
  elem::check_launch("transpose12");
}

}  // namespace scalekv::cuda_ops
