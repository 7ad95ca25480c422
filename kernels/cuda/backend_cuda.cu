// The CUDA backend: device memory, one non-blocking stream, and the launchers of kernels/cuda/*.cu.
// Everything is queued on the stream; `synchronize` waits, then reports the first error of the queued work:
// a runtime failure (ERR_DEVICE) or a data error the kernels recorded in the device status word
// {code, detail} (bad index lists, see ops.cuh), which it then clears. Uploads are staged through pinned
// host buffers, so the copies are truly asynchronous; progress marks (when_reached) are events a waiter thread
// waits for. nvcc only: the emulator brings its own backend around the same launchers.
#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "ops.cuh"
#include "status_message.h"

namespace scalekv {
namespace {

std::string cuda_message(const char* what, cudaError_t err) {
  return std::string("cuda: ") + what + ": " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw BackendError(StatusCode::device, cuda_message(what, err));
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    void* status = nullptr;
    if (cudaMalloc(&status, 2 * sizeof(int32_t)) != cudaSuccess) {
      cudaGetLastError();
      cudaStreamDestroy(stream_);
      throw BackendError(StatusCode::out_of_memory, "cuda: cannot allocate the status word");
    }
    status_ = static_cast<int32_t*>(status);
    check(cudaMemsetAsync(status_, 0, 2 * sizeof(int32_t), stream_), "cudaMemsetAsync(status)");
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    {
      std::lock_guard<std::mutex> lock(marks_mu_);
      marks_stop_ = true;
    }
    marks_cv_.notify_all();
    if (waiter_.joinable()) waiter_.join();  // the stream is idle: it reaches the marks left at once
    for (Staging& s : staging_) {
      if (s.host) cudaFreeHost(s.host);
      if (s.copied) cudaEventDestroy(s.copied);
    }
    if (workspace_) cudaFree(workspace_);
    cudaFree(status_);
    cudaStreamDestroy(stream_);
    cudaGetLastError();
  }

  const char* name() const override { return "cuda"; }

  std::string device_description() const override {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, device_) != cudaSuccess) {
      cudaGetLastError();
      return "CUDA device " + std::to_string(device_);
    }
    char buf[384];
    std::snprintf(buf, sizeof(buf), "%s (device %d), %d SMs, %.1f GiB, compute capability %d.%d", prop.name, device_,
                  prop.multiProcessorCount, static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0),
                  prop.major, prop.minor);
    return buf;
  }

  void* alloc(size_t bytes) override {
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes == 0 ? 1 : bytes);  // never hand out null
    if (err != cudaSuccess) {
      cudaGetLastError();  // not sticky: clear it so the next launch check does not see it
      throw BackendError(StatusCode::out_of_memory,
                         "cuda: cannot allocate " + std::to_string(bytes) + " bytes: " + cudaGetErrorString(err));
    }
    return p;
  }

  void free(void* ptr) override {
    if (!ptr) return;
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    // cudaFree waits for the device, so queued work that still reads ptr finishes first.
    check(cudaFree(ptr), "cudaFree");
  }

  // `src` is pageable memory, which would make the copy wait for the device: it is copied into one of two
  // pinned staging buffers instead (in chunks, alternating, so filling one overlaps the other's transfer), and
  // the call returns once `src` has been read, so the caller may reuse it.
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    const auto* from = static_cast<const unsigned char*>(src);
    auto* to = static_cast<unsigned char*>(dst);
    for (size_t done = 0; done < bytes;) {
      const size_t n = std::min(bytes - done, kStagingChunk);
      Staging& s = staging(n);
      std::memcpy(s.host, from + done, n);
      check(cudaMemcpyAsync(to + done, s.host, n, cudaMemcpyHostToDevice, stream_), "upload (cudaMemcpyAsync)");
      check(cudaEventRecord(s.copied, stream_), "upload (cudaEventRecord)");
      done += n;
    }
  }

  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "download (cudaMemcpyAsync)");
    check(cudaStreamSynchronize(stream_), "download (cudaStreamSynchronize)");
  }

  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0 || dst == src) return;
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    const auto d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    if (d < s + bytes && s < d + bytes) {
      // Overlapping ranges (memmove semantics): cudaMemcpy does not allow them, so go through scratch.
      void* tmp = workspace(bytes);
      check(cudaMemcpyAsync(tmp, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy (cudaMemcpyAsync)");
      check(cudaMemcpyAsync(dst, tmp, bytes, cudaMemcpyDeviceToDevice, stream_), "copy (cudaMemcpyAsync)");
    } else {
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy (cudaMemcpyAsync)");
    }
  }

  void fill_u8(void* dst, uint8_t value, size_t bytes) override {
    if (bytes == 0) return;
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    check(cudaMemsetAsync(dst, value, bytes, stream_), "fill (cudaMemsetAsync)");
  }

  void attention(const AttentionArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    void* ws = workspace(cuda_ops::attention_workspace_bytes(a));
    note_pending("attention");
    cuda_ops::attention(a, stream_, status_, ws);
    check(cudaGetLastError(), "attention launch");
  }

  void evict_compact(const EvictCompactArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    void* ws = workspace(cuda_ops::evict_compact_workspace_bytes(a));
    note_pending("evictCompact");
    cuda_ops::evict_compact(a, stream_, status_, ws);
    check(cudaGetLastError(), "evictCompact launch");
  }

  void selection(const SelectionArgs& a) override {
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    void* ws = workspace(cuda_ops::selection_workspace_bytes(a));
    note_pending("selection");
    cuda_ops::selection(a, stream_, status_, ws);
    check(cudaGetLastError(), "selection launch");
  }

  // Transformer ops: none needs workspace; only crossAttention, segmentAttention and qkNormRope (a bad page
  // table) can set the status word.
  void gemm(const GemmArgs& a) override { run_op([&] { cuda_ops::gemm(a, stream_, status_); }); }
  void layer_norm(const LayerNormArgs& a) override { run_op([&] { cuda_ops::layer_norm(a, stream_, status_); }); }
  void rms_norm(const RmsNormArgs& a) override { run_op([&] { cuda_ops::rms_norm(a, stream_, status_); }); }
  void gated_activation(const GatedActivationArgs& a) override {
    run_op([&] { cuda_ops::gated_activation(a, stream_, status_); });
  }
  void segment_attention(const SegmentAttentionArgs& a) override {
    run_op([&] {
      note_pending("segmentAttention");
      cuda_ops::segment_attention(a, stream_, status_);
    });
  }
  void gated_residual(const GatedResidualArgs& a) override {
    run_op([&] { cuda_ops::gated_residual(a, stream_, status_); });
  }
  void activation(const ActivationArgs& a) override { run_op([&] { cuda_ops::activation(a, stream_, status_); }); }
  void qk_norm_rope(const QkNormRopeArgs& a) override {
    run_op([&] {
      note_pending("qkNormRope");
      cuda_ops::qk_norm_rope(a, stream_, status_);
    });
  }
  void cross_attention(const CrossAttentionArgs& a) override {
    run_op([&] {
      note_pending("crossAttention");
      cuda_ops::cross_attention(a, stream_, status_);
    });
  }
  void cfg_tau(const CfgTauArgs& a) override { run_op([&] { cuda_ops::cfg_tau(a, stream_, status_); }); }
  void topk_topp_mask(const TopkToppMaskArgs& a) override {
    run_op([&] { cuda_ops::topk_topp_mask(a, stream_, status_); });
  }
  void sample_bits(const SampleBitsArgs& a) override { run_op([&] { cuda_ops::sample_bits(a, stream_, status_); }); }

  // Latent and VAE-decoder ops: no status word; group_norm takes workspace.
  void bits_to_codes(const BitsToCodesArgs& a) override { run_op([&] { cuda_ops::bits_to_codes(a, stream_); }); }
  void resize_bilinear(const ResizeBilinearArgs& a) override { run_op([&] { cuda_ops::resize_bilinear(a, stream_); }); }
  void conv2d(const Conv2dArgs& a) override { run_op([&] { cuda_ops::conv2d(a, stream_); }); }
  void group_norm(const GroupNormArgs& a) override {
    run_op([&] { cuda_ops::group_norm(a, stream_, workspace(cuda_ops::group_norm_workspace_bytes(a))); });
  }
  void upsample_nearest2x(const UpsampleNearest2xArgs& a) override {
    run_op([&] { cuda_ops::upsample_nearest2x(a, stream_); });
  }
  void pixel_shuffle2x(const PixelShuffle2xArgs& a) override { run_op([&] { cuda_ops::pixel_shuffle2x(a, stream_); }); }
  void pixel_unshuffle2x(const PixelUnshuffle2xArgs& a) override {
    run_op([&] { cuda_ops::pixel_unshuffle2x(a, stream_); });
  }
  void add(const AddArgs& a) override { run_op([&] { cuda_ops::add(a, stream_); }); }
  void cast(const CastArgs& a) override { run_op([&] { cuda_ops::cast(a, stream_); }); }
  void transpose12(const Transpose12Args& a) override { run_op([&] { cuda_ops::transpose12(a, stream_); }); }
  void image_to_u8(const ImageToU8Args& a) override { run_op([&] { cuda_ops::image_to_u8(a, stream_); }); }

  // CUDA events on the stream: device time between two points of the queue, with no host synchronisation.
  // "gemm:simt (K % 8 != 0)" when the op just run took a slower kernel than its dtypes allow.
  const char* take_profile_label() override { return cuda_ops::take_slow_path_label(); }

  TimingMark mark_time() override {
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    cudaEvent_t event;
    check(cudaEventCreate(&event), "cudaEventCreate");
    check(cudaEventRecord(event, stream_), "cudaEventRecord");
    return TimingMark(new cudaEvent_t(event), [](void* p) {
      cudaEventDestroy(*static_cast<cudaEvent_t*>(p));
      delete static_cast<cudaEvent_t*>(p);
    });
  }
  double elapsed_ms(const TimingMark& start, const TimingMark& end) override {
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, *static_cast<cudaEvent_t*>(start.get()), *static_cast<cudaEvent_t*>(end.get())),
          "cudaEventElapsedTime");
    return ms;
  }

  // An event recorded on the stream (no timing, blocking sync: the waiter sleeps instead of spinning); the
  // waiter thread, started with the first mark, waits for the events in order and calls their callbacks.
  // A mark whose event cannot be made or recorded (a device already failing: the error is sticky, the next
  // synchronize reports it) still joins the waiter's queue, event-less, so marks stay in order.
  void when_reached(const std::function<void()>& reached) override {
    cudaEvent_t event = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      bind();
      if (cudaEventCreateWithFlags(&event, cudaEventDisableTiming | cudaEventBlockingSync) != cudaSuccess) event = nullptr;
      if (event && cudaEventRecord(event, stream_) != cudaSuccess) {
        cudaEventDestroy(event);
        event = nullptr;
      }
    }
    std::lock_guard<std::mutex> lock(marks_mu_);
    try {
      if (!waiter_.joinable()) waiter_ = std::thread([this] { wait_marks(); });
      marks_.push_back({event, reached});
    } catch (...) {
      if (event) cudaEventDestroy(event);
      throw;
    }
    marks_cv_.notify_one();
  }
  void synchronize() override {
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    const std::vector<std::string> pending = std::move(pending_);
    pending_.clear();
    const cudaError_t synced = cudaStreamSynchronize(stream_);
    {
      // Every mark placed so far is reached now (or failed with the stream): let the waiter report them first.
      std::unique_lock<std::mutex> marks(marks_mu_);
      marks_idle_cv_.wait(marks, [&] { return marks_.empty() && !marks_busy_; });
    }
    check(synced, "synchronize");
    int32_t st[2] = {0, 0};
    check(cudaMemcpyAsync(st, status_, sizeof(st), cudaMemcpyDeviceToHost, stream_), "synchronize (read status)");
    check(cudaStreamSynchronize(stream_), "synchronize (read status)");
    if (st[0] == 0) return;
    check(cudaMemsetAsync(status_, 0, sizeof(st), stream_), "synchronize (clear status)");
    check(cudaStreamSynchronize(stream_), "synchronize (clear status)");
    throw BackendError(static_cast<StatusCode>(st[0]), kernel_status_message(st[0], st[1], pending));
  }

 private:
  void bind() const { check(cudaSetDevice(device_), "cudaSetDevice"); }  // calls may come from any thread

  // Runs a launcher under the backend lock on this device (the launchers check their own launches). No slow-path
  // note of an earlier op survives into it (the queue reads the note after the op's end timing mark).
  template <typename Launch>
  void run_op(Launch&& launch) {
    std::lock_guard<std::mutex> lock(mutex_);
    bind();
    cuda_ops::note_slow_path(nullptr, nullptr);
    launch();
  }

  // Grows the cached workspace; the old buffer may still be read by queued kernels, so wait first.
  void* workspace(size_t bytes) {
    if (bytes == 0) return workspace_;
    if (bytes <= workspace_bytes_) return workspace_;
    const size_t want = std::max(bytes, workspace_bytes_ * 2);  // amortise growth
    check(cudaStreamSynchronize(stream_), "workspace (cudaStreamSynchronize)");
    if (workspace_) check(cudaFree(workspace_), "workspace (cudaFree)");
    workspace_ = nullptr;
    workspace_bytes_ = 0;
    if (cudaMalloc(&workspace_, want) != cudaSuccess) {
      cudaGetLastError();
      workspace_ = nullptr;
      throw BackendError(StatusCode::out_of_memory, "cuda: cannot allocate " + std::to_string(want) +
                                                        " bytes of op workspace");
    }
    workspace_bytes_ = want;
    return workspace_;
  }

  // Waits for marks in placement order and reports each, outside any lock of the backend's.
  void wait_marks() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lock(marks_mu_);
    for (;;) {
      marks_cv_.wait(lock, [&] { return marks_stop_ || !marks_.empty(); });
      if (marks_.empty()) return;  // stopped and drained
      Mark m = std::move(marks_.front());
      marks_.pop_front();
      marks_busy_ = true;
      lock.unlock();
      // A failure here is the stream's: the next synchronize reports it; the mark is passed either way.
      if (m.event) {
        cudaEventSynchronize(m.event);
        cudaEventDestroy(m.event);
      }
      cudaGetLastError();
      m.reached();
      lock.lock();
      marks_busy_ = false;
      marks_idle_cv_.notify_all();
    }
  }
  // The next staging buffer, holding at least `bytes` (<= kStagingChunk), once the copy it last fed is done.
  struct Staging {
    void* host = nullptr;
    size_t bytes = 0;
    cudaEvent_t copied = nullptr;
  };
  Staging& staging(size_t bytes) {
    Staging& s = staging_[next_staging_];
    next_staging_ = (next_staging_ + 1) % staging_.size();
    if (!s.copied) check(cudaEventCreateWithFlags(&s.copied, cudaEventDisableTiming), "cudaEventCreate (staging)");
    check(cudaEventSynchronize(s.copied), "upload (wait for the staging buffer)");
    if (s.bytes < bytes) {
      if (s.host) check(cudaFreeHost(s.host), "cudaFreeHost");
      s.host = nullptr;
      s.bytes = 0;
      size_t want = 64 * 1024;
      while (want < bytes) want *= 2;
      want = std::min(want, kStagingChunk);
      if (cudaHostAlloc(&s.host, want, cudaHostAllocDefault) != cudaSuccess) {
        cudaGetLastError();
        s.host = nullptr;
        throw BackendError(StatusCode::out_of_memory, "cuda: cannot allocate " + std::to_string(want) +
                                                          " bytes of pinned upload staging");
      }
      s.bytes = want;
    }
    return s;
  }
  // The ops that take workspace start here (the others through run_op): no earlier slow-path note survives.
  void note_pending(const char* op) {
    cuda_ops::note_slow_path(nullptr, nullptr);
    if (std::find(pending_.begin(), pending_.end(), op) == pending_.end()) pending_.emplace_back(op);
  }

  int device_;
  cudaStream_t stream_ = nullptr;
  int32_t* status_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::vector<std::string> pending_;  // ops queued since the last synchronize that may set the status
  mutable std::mutex mutex_;
  // Pinned upload staging (guarded by mutex_): two buffers used in turn, grown up to one chunk.
  static constexpr size_t kStagingChunk = size_t(8) << 20;
  std::vector<Staging> staging_ = std::vector<Staging>(2);
  size_t next_staging_ = 0;
  // Progress marks: events in placement order, waited for by waiter_ (guarded by marks_mu_; taken after mutex_
  // when both are held, never the other way round).
  struct Mark {
    cudaEvent_t event;
    std::function<void()> reached;
  };
  std::mutex marks_mu_;
  std::condition_variable marks_cv_, marks_idle_cv_;
  std::deque<Mark> marks_;
  bool marks_busy_ = false, marks_stop_ = false;
  std::thread waiter_;
};

}  // namespace

bool cuda_probe(std::string* reason) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (reason) *reason = std::string("no CUDA device: ") + cudaGetErrorString(err);
    return false;
  }
  if (count == 0) {
    if (reason) *reason = "no CUDA device: none found";
    return false;
  }
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0) != cudaSuccess) {
    cudaGetLastError();
    if (reason) *reason = "no CUDA device: cannot query device 0";
    return false;
  }
  if (major < 8) {
    if (reason)
      *reason = "CUDA device 0 has compute capability " + std::to_string(major) + "." + std::to_string(minor) +
                "; the kernels need 8.0 or newer (bf16 tensor cores, cp.async)";
    return false;
  }
  return true;
}

std::unique_ptr<Backend> make_cuda_backend(int device) {
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (device < 0 || device >= count)
    throw BackendError(StatusCode::device, "cuda: device " + std::to_string(device) + " does not exist (" +
                                               std::to_string(count) + " devices)");
  return std::make_unique<CudaBackend>(device);
}

}  // namespace scalekv
