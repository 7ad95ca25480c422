// bits_to_codes: codes[b,c,y,x] = bits[b,y,x,c] != 0 ? value : -value (channels-last bits -> NCHW codes).
// Bytes: B*H*W*D*(bits size + 4). One thread per output element (coalesced writes; the bit reads are strided
// by D, which is small).
#include "element.cuh"
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {

template <typename TB>
__global__ void bits_to_codes_kernel(const TB* bits, float* codes, int64_t total, int dim, int64_t plane, float value) {
  for (int64_t e = elem::global_thread(); e < total; e += elem::global_stride()) {
    const int64_t yx = e % plane, c = e / plane % dim, b = e / (plane * dim);
    codes[e] = bits[(b * plane + yx) * dim + c] != 0 ? value : -value;
  }
}

}  // namespace

void bits_to_codes(const BitsToCodesArgs& a, cudaStream_t stream) {
  const int64_t plane = int64_t(a.height) * a.width, total = a.batch * plane * a.dim;
  if (total == 0) return;
  const unsigned grid = elem::grid_for(total);
  if (a.bits_dtype == DType::u8) {
    SKV_LAUNCH(bits_to_codes_kernel<uint8_t>, dim3(grid), dim3(elem::kThreads), 0, stream,
               static_cast<const uint8_t*>(a.bits), a.codes, total, a.dim, plane, a.value);
  } else {
    SKV_LAUNCH(bits_to_codes_kernel<int32_t>, dim3(grid), dim3(elem::kThreads), 0, stream,
               static_cast<const int32_t*>(a.bits), a.codes, total, a.dim, plane, a.value);
  }
  elem::check_launch("bitsToCodes");
}

}  // namespace scalekv::cuda_ops
