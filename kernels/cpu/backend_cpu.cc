// The CPU backend: host memory and the C++ kernels. Ops run on the caller (the engine's queue thread) and
// spread over the intra-op pool; they complete before returning, so synchronize has nothing to wait for.
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
  // reference the fused CUDA epilogue is checked against) gives their bits. The buffer lives for the call only.
  void gemm_residual(const GemmArgs& a) {
    std::unique_ptr<float[]> product(new (std::nothrow) float[size_t(a.m) * a.n]);
    if (!product) throw BackendError(StatusCode::out_of_memory, "gemmResidual: cannot allocate the product");
    GemmArgs g = a;
    g.residual = false;
    g.y = product.get();
    g.y_dtype = DType::f32;
    gemm(g);
    GatedResidualArgs r;
    r.batch = a.m / a.tokens;
    r.tokens = a.tokens;
    r.channels = a.n;
    r.x_dtype = a.y_dtype;
    r.y_dtype = DType::f32;
    r.x = a.y;
    r.y = product.get();
    r.gate = a.gate;
    r.gate_stride = a.gate_stride;
    cpu::gated_residual(pool_, r);
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
