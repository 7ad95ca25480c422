// The emu backend mirrors backend_cuda.cu around the same cuda_ops launchers: a status word {code, detail}
// the kernels set with atomicCAS, a cached workspace, a stream (here a fake one that names the worker
// count). Work runs synchronously at each call, so `synchronize` only reads and clears the status word.
// Unlike cudaMalloc'd memory, fresh allocations and the workspace before each op are filled with 0xFF,
// so a kernel that relies on zeroed or stale device memory fails here instead of passing by luck.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../cuda/ops.cuh"
#include "../cuda/status_message.h"
#include "../host_clock.h"
#include "emu_backend.h"
#include "emu_profile.h"

namespace scalekv {
namespace {

// Ops without workspace, launched with or without the status word (ops whose inputs need no data checks
// take none), exactly as backend_cuda.cu launches them.
#define SKV_EMU_FORWARD(method, Args, op_name)                 \
  void method(const Args& a) override {                        \
    std::lock_guard<std::mutex> lock(mutex_);                  \
    note_pending(op_name);                                     \
    cuda_ops::method(a, &stream_, status_);                    \
    check_launch(op_name " launch");                           \
  }
#define SKV_EMU_FORWARD_NO_STATUS(method, Args, op_name)       \
  void method(const Args& a) override {                        \
    std::lock_guard<std::mutex> lock(mutex_);                  \
    note_pending(op_name);                                     \
    cuda_ops::method(a, &stream_);                             \
    check_launch(op_name " launch");                           \
  }

constexpr size_t kAlign = 256;  // cudaMalloc's alignment, which vectorised kernels may rely on
constexpr unsigned char kPoison = 0xff;

class EmuBackend final : public Backend {
 public:
  explicit EmuBackend(int threads) {
    stream_.workers = threads > 0 ? threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    status_ = static_cast<int32_t*>(allocate(2 * sizeof(int32_t)));
    status_[0] = status_[1] = 0;
  }

  ~EmuBackend() override {
    set_kernel_counters(false, 0);
    release(workspace_);
    release(status_);
  }

  const char* name() const override { return "emu"; }

  std::string device_description() const override {
    return "SIMT emulator on the CPU (" + std::to_string(stream_.workers) + " worker thread(s))";
  }

  void* alloc(size_t bytes) override {
    void* p = allocate(bytes);
    std::memset(p, kPoison, bytes);
    return p;
  }

  void free(void* ptr) override { release(ptr); }

  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes) std::memcpy(dst, src, bytes);
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src) std::memmove(dst, src, bytes);
  }
  void fill_u8(void* dst, uint8_t value, size_t bytes) override {
    if (bytes) std::memset(dst, value, bytes);
  }

  void attention(const AttentionArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    void* ws = workspace(cuda_ops::attention_workspace_bytes(a));
    note_pending("attention");
    cuda_ops::attention(a, &stream_, status_, ws);
    check_launch("attention launch");
  }

  void evict_compact(const EvictCompactArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    void* ws = workspace(cuda_ops::evict_compact_workspace_bytes(a));
    note_pending("evictCompact");
    cuda_ops::evict_compact(a, &stream_, status_, ws);
    check_launch("evictCompact launch");
  }

  void selection(const SelectionArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    void* ws = workspace(cuda_ops::selection_workspace_bytes(a));
    note_pending("selection");
    cuda_ops::selection(a, &stream_, status_, ws);
    check_launch("selection launch");
  }

  SKV_EMU_FORWARD(gemm, GemmArgs, "gemm")
  SKV_EMU_FORWARD(layer_norm, LayerNormArgs, "layerNorm")
  SKV_EMU_FORWARD(rms_norm, RmsNormArgs, "rmsNorm")
  SKV_EMU_FORWARD(gated_activation, GatedActivationArgs, "gatedActivation")
  SKV_EMU_FORWARD(segment_attention, SegmentAttentionArgs, "segmentAttention")
  SKV_EMU_FORWARD(gated_residual, GatedResidualArgs, "gatedResidual")
  SKV_EMU_FORWARD(activation, ActivationArgs, "activation")
  SKV_EMU_FORWARD(qk_norm_rope, QkNormRopeArgs, "qkNormRope")
  SKV_EMU_FORWARD(cross_attention, CrossAttentionArgs, "crossAttention")
  SKV_EMU_FORWARD(cfg_tau, CfgTauArgs, "cfgTau")
  SKV_EMU_FORWARD(topk_topp_mask, TopkToppMaskArgs, "topkTopPMask")
  SKV_EMU_FORWARD(sample_bits, SampleBitsArgs, "sampleBits")
  SKV_EMU_FORWARD_NO_STATUS(bits_to_codes, BitsToCodesArgs, "bitsToCodes")
  SKV_EMU_FORWARD_NO_STATUS(resize_bilinear, ResizeBilinearArgs, "resizeBilinear")
  SKV_EMU_FORWARD_NO_STATUS(conv2d, Conv2dArgs, "conv2d")
  SKV_EMU_FORWARD_NO_STATUS(upsample_nearest2x, UpsampleNearest2xArgs, "upsampleNearest2x")
  SKV_EMU_FORWARD_NO_STATUS(pixel_shuffle2x, PixelShuffle2xArgs, "pixelShuffle2x")
  SKV_EMU_FORWARD_NO_STATUS(pixel_unshuffle2x, PixelUnshuffle2xArgs, "pixelUnshuffle2x")
  SKV_EMU_FORWARD_NO_STATUS(add, AddArgs, "add")
  SKV_EMU_FORWARD_NO_STATUS(cast, CastArgs, "cast")
  SKV_EMU_FORWARD_NO_STATUS(transpose12, Transpose12Args, "transpose12")
  SKV_EMU_FORWARD_NO_STATUS(image_to_u8, ImageToU8Args, "imageToU8")

  void group_norm(const GroupNormArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    void* ws = workspace(cuda_ops::group_norm_workspace_bytes(a));
    note_pending("groupNorm");
    cuda_ops::group_norm(a, &stream_, ws);
    check_launch("groupNorm launch");
  }

  // Emulated kernels run to completion at the call, so the host clock at the call is the time the queue reached it.
  TimingMark mark_time() override { return host_clock_mark(); }
  double elapsed_ms(const TimingMark& start, const TimingMark& end) override { return host_clock_elapsed_ms(start, end); }

  // "gemm:simt (K % 8 != 0)" when the op just run took a slower kernel than its dtypes allow, as on CUDA.
  const char* take_profile_label() override { return cuda_ops::take_slow_path_label(); }

  bool set_kernel_counters(bool on, uint64_t sample_blocks) override {
    if (!on) {
      if (counting_) {
        skv_emu::profile::stop();
        skv_emu::profile::take();  // records this engine never collected
      }
      counting_ = false;
      return true;
    }
    if (!skv_emu::profile::available()) return false;
    counting_ = skv_emu::profile::start(sample_blocks);
    return counting_;
  }

  std::vector<KernelLaunchCounters> take_kernel_counters() override {
    std::vector<KernelLaunchCounters> out;
    if (!counting_) return out;
    for (skv_emu::profile::Launch& l : skv_emu::profile::take()) {
      KernelLaunchCounters k;
      k.kernel = std::move(l.kernel);
      std::copy(l.grid, l.grid + 3, k.grid);
      std::copy(l.block, l.block + 3, k.block);
      k.smem_bytes = l.smem_bytes;
      k.simt_flops = l.simt_flops;
      k.blocks_run = l.blocks_run;
      const skv_emu::profile::Counters& c = l.counters;
      k.counters = {{"globalLoadRequests", c.global_load_requests}, {"globalLoadSectors", c.global_load_sectors},
                    {"globalLoadBytes", c.global_load_bytes}, {"globalStoreRequests", c.global_store_requests},
                    {"globalStoreSectors", c.global_store_sectors}, {"globalStoreBytes", c.global_store_bytes},
                    {"dramReadBytes", c.dram_read_bytes}, {"dramWriteBytes", c.dram_write_bytes},
                    {"sharedLoadRequests", c.shared_load_requests}, {"sharedLoadWavefronts", c.shared_load_wavefronts},
                    {"sharedLoadIdealWavefronts", c.shared_load_ideal}, {"sharedStoreRequests", c.shared_store_requests},
                    {"sharedStoreWavefronts", c.shared_store_wavefronts},
                    {"sharedStoreIdealWavefronts", c.shared_store_ideal}, {"tensorFlops", c.tensor_flops},
                    {"barriers", c.barriers}, {"blocks", c.blocks}};
      out.push_back(std::move(k));
    }
    return out;
  }

  void synchronize() override {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::vector<std::string> pending = std::move(pending_);
    pending_.clear();
    const int32_t code = status_[0], detail = status_[1];
    if (code == 0) return;
    status_[0] = status_[1] = 0;
    throw BackendError(static_cast<StatusCode>(code), kernel_status_message(code, detail, pending));
  }

 private:
  static void* allocate(size_t bytes) {
    void* p = nullptr;
    // Exactly `bytes` (at least 1, never null, as the CUDA backend), so ASan flags the first byte past it.
    if (posix_memalign(&p, kAlign, bytes == 0 ? 1 : bytes) != 0 || !p)
      throw BackendError(StatusCode::out_of_memory, "emu: cannot allocate " + std::to_string(bytes) + " bytes");
    skv_emu::profile::register_global(p, bytes);  // device memory, for the cost counters
    return p;
  }

  static void release(void* p) {
    if (!p) return;
    skv_emu::profile::unregister_global(p);
    std::free(p);
  }

  static void check_launch(const char* what) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
      throw BackendError(StatusCode::device, std::string("emu: ") + what + ": " + cudaGetErrorString(err));
  }

  // Exactly the requested size each time (no slack for an overrun to hide in), poisoned.
  void* workspace(size_t bytes) {
    if (bytes == 0) return nullptr;
    if (bytes != workspace_bytes_) {
      release(workspace_);
      workspace_ = nullptr;
      workspace_bytes_ = 0;
      workspace_ = allocate(bytes);
      workspace_bytes_ = bytes;
    }
    std::memset(workspace_, kPoison, bytes);
    return workspace_;
  }

  // Every op starts here: no slow-path note of an earlier op survives into it.
  void note_pending(const char* op) {
    cuda_ops::note_slow_path(nullptr, nullptr);
    if (std::find(pending_.begin(), pending_.end(), op) == pending_.end()) pending_.emplace_back(op);
  }

  skv_emu_stream stream_;
  int32_t* status_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::vector<std::string> pending_;
  bool counting_ = false;  // this backend's queue thread holds the process's cost counters
  std::mutex mutex_;
};

#undef SKV_EMU_FORWARD
#undef SKV_EMU_FORWARD_NO_STATUS

}  // namespace

std::unique_ptr<Backend> make_emu_backend(int threads) { return std::make_unique<EmuBackend>(threads); }

}  // namespace scalekv
