// The CPU backend: host memory and the C++ kernels. Ops run on the caller (the engine's queue thread) and
// spread over the intra-op pool; they complete before returning, so synchronize has nothing to wait for.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>

#include <sys/mman.h>

#include "../backend.h"
#include "../host_clock.h"
#include "onednn.h"
#include "ops.h"
#include "thread_pool.h"
#include "transformer_ops.h"

namespace scalekv {
namespace {

constexpr size_t kAlignment = 256;
constexpr size_t kHugePage = size_t(2) << 20;

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) : pool_(threads) {}

  const char* name() const override { return "cpu"; }
  std::string device_description() const override {
    return "CPU, " + std::to_string(pool_.size()) + " threads";
  }

  void* alloc(size_t bytes) override {
    // Tensors of a huge page or more sit on huge pages where the kernel allows it (transparent huge pages, 'madvise'
    // mode included): the KV arena's small pages and gathered rows are read in an order no TLB of 4 KiB pages
    // covers (a 2B batch's pool is hundreds of MiB).
    const bool huge = bytes >= kHugePage;
    const size_t align = huge ? kHugePage : kAlignment;
    const size_t rounded = (bytes + align - 1) / align * align;
    void* p = std::aligned_alloc(align, rounded == 0 ? align : rounded);
    if (!p) throw BackendError(StatusCode::out_of_memory, "cpu: cannot allocate " + std::to_string(bytes) + " bytes");
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: without THP the pages stay small
#endif
    return p;
  }
  void free(void* ptr) override { std::free(ptr); }
  // Empty tensors may have null buffers: the C library's copies must not see them, even for 0 bytes.
  void upload(void* dst, const void* src, size_t bytes) override { if (bytes) std::memcpy(dst, src, bytes); }
  void download(void* dst, const void* src, size_t bytes) override { if (bytes) std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { if (bytes) std::memmove(dst, src, bytes); }
  void fill_u8(void* dst, uint8_t value, size_t bytes) override { if (bytes) std::memset(dst, value, bytes); }

  void attention(const AttentionArgs& a) override { cpu::attention(pool_, a); }
  void evict_compact(const EvictCompactArgs& a) override { cpu::evict_compact(pool_, a); }
  void selection(const SelectionArgs& a) override { cpu::selection(pool_, a); }
  void gemm(const GemmArgs& a) override {
    if (a.residual) return gemm_residual(a);
    if (cpu::onednn::gemm(a, pool_.size())) label_ = "gemm:onednn";
    else cpu::gemm(pool_, a);
  }
  // The product into an f32 buffer, then the gated residual: the two ops the fusion stands for, so the CPU (the
  // reference the fused CUDA epilogue is checked against) gives their bits. Rows go through in blocks whose
  // product fits kResidualChunkBytes (at least 4096 rows, where oneDNN packs the weights, when that fits), so the
  // transient buffer, which no tensor accounts for, stays small whatever the batch.
  static constexpr size_t kResidualChunkBytes = size_t(32) << 20;
  void gemm_residual(const GemmArgs& a) {
    const int rows = int(std::max<int64_t>(1, std::min<int64_t>(a.m, int64_t(kResidualChunkBytes / sizeof(float)) / a.n)));
    std::unique_ptr<float[]> product(new (std::nothrow) float[size_t(rows) * a.n]);
    if (!product) throw BackendError(StatusCode::out_of_memory, "gemmResidual: cannot allocate the product");
    const size_t x_row_bytes = size_t(a.k) * dtype_size(a.x_dtype);
    for (int r0 = 0; r0 < a.m; r0 += rows) {
      const int chunk = std::min(rows, a.m - r0);
      GemmArgs g = a;
      g.residual = false;
      g.m = chunk;
      g.x = static_cast<const char*>(a.x) + size_t(r0) * x_row_bytes;
      g.y = product.get();
      g.y_dtype = DType::f32;
      gemm(g);
      // gated_residual over each image's rows of the block (the gate is per image).
      for (int r = r0; r < r0 + chunk;) {
        const int image = r / a.tokens, end = std::min(r0 + chunk, (image + 1) * a.tokens);
        GatedResidualArgs res;
        res.batch = 1;
        res.tokens = end - r;
        res.channels = a.n;
        res.x_dtype = DType::f32;
        res.y_dtype = DType::f32;
        res.x = static_cast<float*>(a.y) + int64_t(r) * a.n;
        res.y = product.get() + int64_t(r - r0) * a.n;
        res.gate = a.gate ? a.gate + image * a.gate_stride : nullptr;
        cpu::gated_residual(pool_, res);
        r = end;
      }
    }
  }
  void layer_norm(const LayerNormArgs& a) override { cpu::layer_norm(pool_, a); }
  void rms_norm(const RmsNormArgs& a) override { cpu::rms_norm(pool_, a); }
  void gated_activation(const GatedActivationArgs& a) override { cpu::gated_activation(pool_, a); }
  void segment_attention(const SegmentAttentionArgs& a) override { cpu::segment_attention(pool_, a); }
  void gated_residual(const GatedResidualArgs& a) override { cpu::gated_residual(pool_, a); }
  void activation(const ActivationArgs& a) override { cpu::activation(pool_, a); }
  void qk_norm_rope(const QkNormRopeArgs& a) override { cpu::qk_norm_rope(pool_, a); }
  void cross_attention(const CrossAttentionArgs& a) override { cpu::cross_attention(pool_, a); }
  void cfg_tau(const CfgTauArgs& a) override { cpu::cfg_tau(pool_, a); }
  void topk_topp_mask(const TopkToppMaskArgs& a) override { cpu::topk_topp_mask(pool_, a); }
  void sample_bits(const SampleBitsArgs& a) override { cpu::sample_bits(pool_, a); }
  void bits_to_codes(const BitsToCodesArgs& a) override { cpu::bits_to_codes(pool_, a); }
  void resize_bilinear(const ResizeBilinearArgs& a) override { cpu::resize_bilinear(pool_, a); }
  void conv2d(const Conv2dArgs& a) override {
    if (cpu::onednn::conv2d(a, pool_.size())) label_ = "conv2d:onednn";
    else cpu::conv2d(pool_, a);
  }
  void group_norm(const GroupNormArgs& a) override { cpu::group_norm(pool_, a); }
  void upsample_nearest2x(const UpsampleNearest2xArgs& a) override { cpu::upsample_nearest2x(pool_, a); }
  void pixel_shuffle2x(const PixelShuffle2xArgs& a) override { cpu::pixel_shuffle2x(pool_, a); }
  void pixel_unshuffle2x(const PixelUnshuffle2xArgs& a) override { cpu::pixel_unshuffle2x(pool_, a); }
  void add(const AddArgs& a) override { cpu::add(pool_, a); }
  void cast(const CastArgs& a) override { cpu::cast(pool_, a); }
  void transpose12(const Transpose12Args& a) override { cpu::transpose12(pool_, a); }
  void image_to_u8(const ImageToU8Args& a) override { cpu::image_to_u8(pool_, a); }
  void synchronize() override {}
  // Ops run in place on the calling thread, so the host clock at the call is the time the queue reached it.
  TimingMark mark_time() override { return host_clock_mark(); }
  double elapsed_ms(const TimingMark& start, const TimingMark& end) override { return host_clock_elapsed_ms(start, end); }


 private:
  const char* take_profile_label() override {
    const char* label = label_;
    label_ = nullptr;
    return label;
  }

  cpu::ThreadPool pool_;
  const char* label_ = nullptr;  // set by an op that took a library path, for the profile
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::make_unique<CpuBackend>(threads);
}

}  // namespace scalekv
