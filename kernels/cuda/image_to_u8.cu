// image_to_u8: NCHW [B,3,H,W] float image -> NHWC [B,H,W,3] uint8 = trunc((clamp(x,-1,1) + 1) / 2 * 255) in
// f32, RGB or BGR. NaN maps to 0. One thread per output byte.
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

template <typename T>
__global__ void image_to_u8_kernel(const T* image, uint8_t* out, int64_t total, int64_t plane, bool bgr) {
  for (int64_t e = elem::global_thread(); e < total; e += elem::global_stride()) {
    const int k = static_cast<int>(e % 3);
    const int64_t p = e / 3, yx = p % plane, b = p / plane;
    const int c = bgr ? 2 - k : k;
    const float x = to_f32(image[(b * 3 + c) * plane + yx]);
    const float clamped = x > -1.0f ? (x < 1.0f ? x : 1.0f) : -1.0f;
    out[e] = static_cast<uint8_t>((clamped + 1.0f) / 2.0f * 255.0f);
  }
}

}  // namespace

void image_to_u8(const ImageToU8Args& a, cudaStream_t stream) {
  const int64_t plane = int64_t(a.height) * a.width, total = a.batch * plane * 3;
  if (total == 0) return;
  elem::dispatch_float(a.dtype, "imageToU8", [&](auto tag) {
    using T = decltype(tag);
    SKV_LAUNCH(image_to_u8_kernel<T>, dim3(elem::grid_for(total)), dim3(elem::kThreads), 0, stream,
               static_cast<const T*>(a.image), a.out, total, plane, a.bgr);
  });
  elem::check_launch("imageToU8");
}

}  // namespace scalekv::cuda_ops
