// The engine below N-API: one backend, one ordered op queue (a worker thread that issues every backend
// call), buffers with memory counters by category, and the first error raised by queued work, which the
// next completion reports. Nothing here knows JavaScript.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../kernels/backend.h"

namespace scalekv {

enum class Category : int { weights = 0, kv = 1, activations = 2, scratch = 3 };
constexpr int kCategories = 4;
const char* category_name(Category c);

struct QueuedError {
  std::string code;
  std::string message;
};

class EngineCore;

// One device block that a static memory plan carves into tensors (EngineCore::begin_plan). Once the plan has ended
// and the last tensor placed in it is released, the block joins the engine's cache at once, as a released tensor's
// block does (the queue orders its reuse), where the next plan finds it. It knows the ranges its live tensors
// hold (guarded by the engine's mem_mu_), so a placement that would overlap one is refused, whatever other work
// shares the engine: a plan can be left, never overrun.
class PlanArena {
 public:
  PlanArena(std::shared_ptr<EngineCore> core, void* base, size_t bytes) : core_(std::move(core)), base_(base), bytes_(bytes) {}
  ~PlanArena();
  PlanArena(const PlanArena&) = delete;
  PlanArena& operator=(const PlanArena&) = delete;
  char* base() const { return static_cast<char*>(base_); }
  // [offset, offset + bytes) is free of live tensors: take it.
  bool take(int64_t offset, int64_t bytes);
  // A placed tensor was released; true when that leaves the ended arena empty (it is then to be cached, once).
  bool give_back(int64_t offset);
  // The plan stopped placing; true when the arena is already empty.
  bool end();
  size_t bytes() const { return bytes_; }

 private:
  bool returnable();

  std::shared_ptr<EngineCore> core_;
  void* base_;
  size_t bytes_;
  std::map<int64_t, int64_t> live_;  // offset -> end of each live tensor's range
  bool ended_ = false, returned_ = false;
};

// Device memory of one tensor. Memory is stream-ordered: `release()` (the JS dispose) hands the block back to
// the engine's cache at once, although queued ops may still use it, because the queue runs in order: every
// op that touches the old tensor was enqueued before the release and runs before any op on the tensor that
// reuses the block. Queued ops hold the Buffer object itself, so `data()` stays valid for them.
class Buffer {
 public:
  Buffer(std::shared_ptr<EngineCore> core, void* ptr, size_t bytes, size_t block_bytes, Category category,
         std::shared_ptr<PlanArena> arena = nullptr)
      : core_(std::move(core)), ptr_(ptr), bytes_(bytes), block_bytes_(block_bytes), category_(category), arena_(std::move(arena)) {}
  ~Buffer() { release(); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  // Returns the block to the engine's cache (once; also done by the destructor). A planned tensor's place in its
  // arena is reused by the plan itself; the arena stays alive while queued ops hold this Buffer.
  void release();

 private:
  std::shared_ptr<EngineCore> core_;
  void* ptr_;
  size_t bytes_;
  size_t block_bytes_;
  Category category_;
  std::shared_ptr<PlanArena> arena_;
  std::atomic<bool> released_{false};
};

// A static memory plan: the sizes (512-byte blocks) of a known sequence of allocations and their offsets in one
// arena of `total` bytes, computed from a dry run of the same work (lib/memory-plan.ts).
struct MemoryPlanSpec {
  std::vector<int64_t> sizes, offsets;
  int64_t total = 0;
};

// What a plan served when it ended: allocations placed, and whether the sequence left the plan (from then on the
// caching allocator served every allocation).
struct MemoryPlanReport {
  int64_t placed = 0;
  bool diverged = false;
};

struct MemoryCounters {
  // Bytes of live tensors (released ones no longer count), and their peak.
  std::array<int64_t, kCategories> in_use{}, peak{};
  int64_t total_in_use = 0, total_peak = 0;
  // Bytes the backend holds: live blocks plus the cache of released ones.
  int64_t reserved = 0, reserved_peak = 0;
};

class EngineCore : public std::enable_shared_from_this<EngineCore> {
 public:
  // The queue thread holds the core alive until it has drained after shutdown(), so queued work never
  // outlives the backend it uses.
  static std::shared_ptr<EngineCore> create(std::unique_ptr<Backend> backend);
  explicit EngineCore(std::unique_ptr<Backend> backend);
  ~EngineCore();

  Backend& backend() { return *backend_; }

  // Allocates now (so out-of-memory throws at the call), counted under `category`: a cached block of a
  // close size when there is one, else new backend memory; on out-of-memory the cache is emptied (after
  // the queued work) and the allocation retried once.
  std::shared_ptr<Buffer> allocate(size_t bytes, Category category);
  // Frees every cached block, in queue order.
  void trim_cache();
  // Caps the bytes the backend holds (live blocks, the cache and plan arenas), 0 for none: an allocation that would
  // pass it fails exactly as a full device does (the cache is emptied and the allocation retried first).
  void set_memory_limit(int64_t bytes) { memory_limit_.store(bytes); }

  // Static memory plan: takes a cached block as large as the arena (an earlier plan's) or else allocates it, after
  // returning every other cached block to the device (waiting for the queued work; out-of-memory throws at the
  // call); allocation i after this call
  // takes [offsets[i], offsets[i] + sizes[i]) of it when its rounded size is at most sizes[i]. The first that is
  // not (a larger one, or one past the plan) ends the placing: it and every later one go to the caching
  // allocator, so a plan that does not match the work is slower to reserve but never unsafe. end_plan() stops
  // the placing and reports; the arena goes once its last tensor does.
  void begin_plan(MemoryPlanSpec plan);
  MemoryPlanReport end_plan();
  // Puts a released block of backend memory in the cache (a plan's arena once its last tensor is gone).
  void cache_block(void* ptr, size_t block_bytes);

  // Runs `op` on the queue thread after everything enqueued before it. An exception it throws is kept as
  // the pending error; later ops still run (each validates its own inputs). False once shut down.
  // `name` (a string literal) labels the op in profiles.
  bool enqueue(std::function<void()> op, const char* name = nullptr);
  // Runs `launch` on the backend after everything enqueued before it, holding `hold` until it has run.
  bool enqueue(std::function<void(Backend&)> launch, std::vector<std::shared_ptr<Buffer>> hold, const char* name);
  // How many ops were accepted since the engine was created (a rejected call adds none).
  uint64_t enqueued() const { return enqueued_.load(std::memory_order_relaxed); }

  // Profiling: while on, the queue thread brackets every named op with backend timing marks (CUDA events on
  // the stream, the host clock elsewhere), so device time is measured without synchronising per op.
  // `profile()` must follow a synchronisation: it reads the marks of every op profiled so far.
  // With `kernel_counters` (the emulator only), every kernel launch of a profiled op is also recorded with the
  // backend's cost counters; a backend without them makes the next sync fail with ERR_DEVICE.
  // `sample_blocks` > 0 runs only that many blocks of larger grids (Backend::set_kernel_counters).
  void set_profiling(bool on, bool kernel_counters = false, uint64_t sample_blocks = 0);
  struct OpProfile {
    int64_t count = 0;
    double ms = 0;
  };
  std::map<std::string, OpProfile> profile();
  struct KernelRecord {
    std::string op;  // the op's profile label
    Backend::KernelLaunchCounters launch;
  };
  // The kernel launches recorded since the last call (after a synchronisation, like profile()).
  std::vector<KernelRecord> take_kernel_records();

  // Runs `op` on the queue, then synchronises the backend, then calls `done` (still on the queue thread)
  // with the pending error, if any, which is cleared. `done` must hand results to JS itself.
  bool enqueue_completion(std::function<void()> op, std::function<void(std::optional<QueuedError>)> done);

  // Places a progress mark on the queue: `reached` is called once the device has finished everything enqueued
  // before it (Backend::when_reached), from the queue thread or a backend's waiter thread, with no
  // synchronisation on the way: neither the queue nor the caller waits for the device. Errors of the work
  // before it stay pending for the next completion; `reached` is called anyway. It must hand results to JS
  // itself. Marks are reached in order, and before any completion enqueued after them. False once shut down.
  bool enqueue_marker(std::function<void()> reached);

  // Stops accepting work; the queue thread drains what was enqueued and exits. Returns at once.
  void shutdown();

  MemoryCounters memory() const;
  void recycle(void* ptr, size_t bytes, size_t block_bytes, Category category);
  // A planned tensor is released: the counters change and its range in the arena is free again.
  void release_planned(PlanArena& arena, void* ptr, size_t bytes, Category category);

 private:
  void run();
  void await_work();
  void record_error(const QueuedError& e);
  // New backend memory, within the memory limit.
  void* device_alloc(size_t bytes);

  std::unique_ptr<Backend> backend_;
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  struct QueuedOp {
    std::function<void()> fn;
    std::function<void(Backend&)> launch;       // an op of the table (fn is empty)
    std::vector<std::shared_ptr<Buffer>> hold;  // its operands, alive until it has run
    const char* name;
  };
  std::deque<QueuedOp> queue_;
  std::atomic<bool> profiling_{false};
  std::atomic<uint64_t> enqueued_{0};
  std::atomic<int64_t> memory_limit_{0};
  std::atomic<size_t> queued_{0};  // queue_.size(), readable without mu_ (the worker's look before it sleeps)
  struct TimedOp {
    const char* name;
    Backend::TimingMark start, end;
  };
  std::mutex profile_mu_;
  std::vector<TimedOp> timed_;               // marks not yet read
  std::map<std::string, OpProfile> profile_;  // totals of the marks read
  bool kernel_counters_ = false;              // queue thread only: the backend's counters are on
  std::vector<KernelRecord> kernel_records_;  // guarded by profile_mu_
  bool stop_ = false;
  std::optional<QueuedError> pending_error_;  // guarded by mu_

  void wait_idle();
  void free_block(void* ptr, size_t block_bytes);

  mutable std::mutex mem_mu_;
  MemoryCounters mem_;
  // The plan being placed (guarded by mem_mu_): its arena, the spec, the next allocation's index.
  std::shared_ptr<PlanArena> plan_arena_;
  MemoryPlanSpec plan_;
  size_t plan_next_ = 0;
  bool plan_diverged_ = false;
  std::multimap<size_t, void*> cache_;  // released blocks by size, guarded by mem_mu_
  std::condition_variable idle_cv_;
  int64_t running_ = 0;  // ops taken off the queue but not finished; guarded by mu_
};

}  // namespace scalekv
