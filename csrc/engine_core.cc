#include "engine_core.h"

#include <algorithm>
#include <chrono>
#include <iterator>
#include <thread>

namespace scalekv {

const char* category_name(Category c) {
  switch (c) {
    case Category::weights: return "weights";
    case Category::kv: return "kv";
    case Category::activations: return "activations";
    case Category::scratch: return "scratch";
  }
  return "activations";
}

void Buffer::release() {
  if (released_.exchange(true)) return;
  if (arena_) {
    core_->release_planned(*arena_, ptr_, bytes_, category_);
  } else {
    core_->recycle(ptr_, bytes_, block_bytes_, category_);
  }
}

// An arena whose plan never ended (its engine went first) still goes to the cache, which the engine frees.
PlanArena::~PlanArena() {
  if (!returned_) core_->cache_block(base_, bytes_);
}

bool PlanArena::returnable() {
  if (!ended_ || !live_.empty() || returned_) return false;
  returned_ = true;
  return true;
}

bool PlanArena::end() {
  ended_ = true;
  return returnable();
}

bool PlanArena::take(int64_t offset, int64_t bytes) {
  auto next = live_.lower_bound(offset);
  if (next != live_.end() && next->first < offset + bytes) return false;
  if (next != live_.begin() && std::prev(next)->second > offset) return false;
  live_.emplace(offset, offset + bytes);
  return true;
}

bool PlanArena::give_back(int64_t offset) {
  live_.erase(offset);
  return returnable();
}

std::shared_ptr<EngineCore> EngineCore::create(std::unique_ptr<Backend> backend) {
  auto core = std::make_shared<EngineCore>(std::move(backend));
  core->worker_ = std::thread([core]() mutable {
    core->run();
    // Dropping the last reference here destroys the core on this thread; the destructor detaches.
    core.reset();
  });
  return core;
}

EngineCore::EngineCore(std::unique_ptr<Backend> backend) : backend_(std::move(backend)) {}

EngineCore::~EngineCore() {
  for (const auto& [size, ptr] : cache_) {
    try {
      backend_->free(ptr);
    } catch (...) {
      // Nothing to recover at teardown.
    }
  }
  if (worker_.joinable()) {
    if (worker_.get_id() == std::this_thread::get_id()) {
      worker_.detach();
    } else {
      worker_.join();
    }
  }
}

void EngineCore::shutdown() {
  end_plan();  // the plan's arena holds the core: a plan left open would keep it alive
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
}

namespace {
constexpr size_t kBlockRounding = 512;
// A cached block serves a request when it wastes at most a quarter of the request (plus a page): repeated
// shapes reuse exactly, nearby ones share, and small requests do not pin large blocks.
bool close_enough(size_t block, size_t want) { return block <= want + want / 4 + 4096; }
}  // namespace

std::shared_ptr<Buffer> EngineCore::allocate(size_t bytes, Category category) {
  const size_t want = (std::max<size_t>(bytes, 1) + kBlockRounding - 1) / kBlockRounding * kBlockRounding;
  void* ptr = nullptr;
  size_t block = want;
  {
    std::lock_guard<std::mutex> lock(mem_mu_);
    if (plan_arena_ && !plan_diverged_) {
      if (plan_next_ < plan_.sizes.size() && int64_t(want) <= plan_.sizes[plan_next_] &&
          plan_arena_->take(plan_.offsets[plan_next_], int64_t(want))) {
        const int64_t offset = plan_.offsets[plan_next_++];
        const int c = static_cast<int>(category);
        mem_.in_use[c] += int64_t(bytes);
        mem_.peak[c] = std::max(mem_.peak[c], mem_.in_use[c]);
        mem_.total_in_use += int64_t(bytes);
        mem_.total_peak = std::max(mem_.total_peak, mem_.total_in_use);
        return std::make_shared<Buffer>(shared_from_this(), plan_arena_->base() + offset, bytes, want, category, plan_arena_);
      }
      plan_diverged_ = true;
    }
    auto it = cache_.lower_bound(want);
    if (it != cache_.end() && close_enough(it->first, want)) {
      block = it->first;
      ptr = it->second;
      cache_.erase(it);
    }
  }
  if (!ptr) {
    try {
      ptr = device_alloc(want);
    } catch (const BackendError& e) {
      if (e.code != StatusCode::out_of_memory) throw;
      trim_cache();
      wait_idle();
      ptr = device_alloc(want);
    }
    std::lock_guard<std::mutex> lock(mem_mu_);
    mem_.reserved += int64_t(want);
    mem_.reserved_peak = std::max(mem_.reserved_peak, mem_.reserved);
  }
  {
    std::lock_guard<std::mutex> lock(mem_mu_);
    const int c = static_cast<int>(category);
    mem_.in_use[c] += int64_t(bytes);
    mem_.peak[c] = std::max(mem_.peak[c], mem_.in_use[c]);
    mem_.total_in_use += int64_t(bytes);
    mem_.total_peak = std::max(mem_.total_peak, mem_.total_in_use);
  }
  return std::make_shared<Buffer>(shared_from_this(), ptr, bytes, block, category);
}

void* EngineCore::device_alloc(size_t bytes) {
  if (const int64_t limit = memory_limit_.load(); limit > 0) {
    std::lock_guard<std::mutex> lock(mem_mu_);
    if (mem_.reserved + int64_t(bytes) > limit)
      throw BackendError(StatusCode::out_of_memory, "cannot allocate " + std::to_string(bytes) + " bytes: " +
                                                        std::to_string(mem_.reserved) + " of the engine's memoryLimit " +
                                                        std::to_string(limit) + " bytes are taken");
  }
  return backend_->alloc(bytes);
}

void EngineCore::recycle(void* ptr, size_t bytes, size_t block_bytes, Category category) {
  std::lock_guard<std::mutex> lock(mem_mu_);
  cache_.emplace(block_bytes, ptr);
  mem_.in_use[static_cast<int>(category)] -= int64_t(bytes);
  mem_.total_in_use -= int64_t(bytes);
}

void EngineCore::release_planned(PlanArena& arena, void* ptr, size_t bytes, Category category) {
  std::lock_guard<std::mutex> lock(mem_mu_);
  if (arena.give_back(static_cast<char*>(ptr) - arena.base())) cache_.emplace(arena.bytes(), arena.base());
  mem_.in_use[static_cast<int>(category)] -= int64_t(bytes);
  mem_.total_in_use -= int64_t(bytes);
}

void EngineCore::begin_plan(MemoryPlanSpec plan) {
  const size_t total = (std::max<int64_t>(plan.total, 1) + kBlockRounding - 1) / kBlockRounding * kBlockRounding;
  for (size_t i = 0; i < plan.sizes.size(); ++i)
    if (plan.sizes[i] <= 0 || plan.offsets[i] < 0 || plan.offsets[i] % int64_t(kBlockRounding) != 0 ||
        plan.offsets[i] + plan.sizes[i] > int64_t(total))
      throw BackendError(StatusCode::internal, "memory plan: allocation " + std::to_string(i) + " lies outside its arena");
  end_plan();
  // A cached block large enough (an earlier plan's arena, as a rule) serves as the arena. Every other cached block
  // goes back to the device first, and the wait makes that happen before a new arena is taken (the queue is short
  // here: a plan begins a generation).
  void* base = nullptr;
  size_t block = total;
  {
    std::lock_guard<std::mutex> lock(mem_mu_);
    auto it = cache_.lower_bound(total);
    if (it != cache_.end()) {
      block = it->first;
      base = it->second;
      cache_.erase(it);
    }
  }
  const bool fresh = base == nullptr;
  trim_cache();
  wait_idle();
  if (fresh) base = device_alloc(total);
  std::lock_guard<std::mutex> lock(mem_mu_);
  if (fresh) {
    mem_.reserved += int64_t(total);
    mem_.reserved_peak = std::max(mem_.reserved_peak, mem_.reserved);
  }
  plan_arena_ = std::make_shared<PlanArena>(shared_from_this(), base, block);
  plan_ = std::move(plan);
  plan_next_ = 0;
  plan_diverged_ = false;
}

MemoryPlanReport EngineCore::end_plan() {
  std::shared_ptr<PlanArena> arena;
  MemoryPlanReport report;
  {
    std::lock_guard<std::mutex> lock(mem_mu_);
    arena.swap(plan_arena_);
    if (arena && arena->end()) cache_.emplace(arena->bytes(), arena->base());
    report = {int64_t(plan_next_), plan_diverged_};
    plan_ = {};
    plan_next_ = 0;
    plan_diverged_ = false;
  }
  return report;
}

void EngineCore::cache_block(void* ptr, size_t block_bytes) {
  std::lock_guard<std::mutex> lock(mem_mu_);
  cache_.emplace(block_bytes, ptr);
}

void EngineCore::free_block(void* ptr, size_t block_bytes) {
  try {
    backend_->free(ptr);
  } catch (...) {
    // A failing free leaves nothing to recover; the counter still drops so it stays truthful.
  }
  std::lock_guard<std::mutex> lock(mem_mu_);
  mem_.reserved -= int64_t(block_bytes);
}

void EngineCore::trim_cache() {
  std::multimap<size_t, void*> blocks;
  {
    std::lock_guard<std::mutex> lock(mem_mu_);
    blocks.swap(cache_);
  }
  // In queue order: ops enqueued before a block was released may still be using it.
  for (const auto& [size, ptr] : blocks) {
    void* p = ptr;
    const size_t n = size;
    if (!enqueue([this, p, n] { free_block(p, n); })) free_block(p, n);
  }
}

void EngineCore::wait_idle() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_cv_.wait(lock, [&] { return queue_.empty() && running_ == 0; });
}

MemoryCounters EngineCore::memory() const {
  std::lock_guard<std::mutex> lock(mem_mu_);
  return mem_;
}

bool EngineCore::enqueue(std::function<void()> op, const char* name) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return false;
    queue_.push_back({std::move(op), nullptr, {}, name});
    queued_.store(queue_.size(), std::memory_order_release);
  }
  enqueued_.fetch_add(1, std::memory_order_relaxed);
  cv_.notify_one();
  return true;
}

bool EngineCore::enqueue(std::function<void(Backend&)> launch, std::vector<std::shared_ptr<Buffer>> hold, const char* name) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return false;
    queue_.push_back({nullptr, std::move(launch), std::move(hold), name});
    queued_.store(queue_.size(), std::memory_order_release);
  }
  enqueued_.fetch_add(1, std::memory_order_relaxed);
  cv_.notify_one();
  return true;
}

void EngineCore::record_error(const QueuedError& e) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!pending_error_) pending_error_ = e;
}

bool EngineCore::enqueue_completion(std::function<void()> op,
                                    std::function<void(std::optional<QueuedError>)> done) {
  return enqueue([this, op = std::move(op), done = std::move(done)] {
    try {
      backend_->synchronize();
      if (op) op();
      backend_->synchronize();
    } catch (const BackendError& e) {
      record_error({status_code_name(e.code), e.what()});
    } catch (const std::exception& e) {
      record_error({"ERR_INTERNAL", e.what()});
    }
    std::optional<QueuedError> error;
    {
      std::lock_guard<std::mutex> lock(mu_);
      error.swap(pending_error_);
    }
    done(std::move(error));
  });
}

bool EngineCore::enqueue_marker(std::function<void()> reached) {
  return enqueue([this, reached = std::move(reached)] {
    try {
      backend_->when_reached(reached);
    } catch (...) {
      reached();  // the mark could not be placed: report the error at the next completion, progress now
      throw;
    }
  });
}

// The JS thread issues small ops in bursts, each faster than a sleeping thread takes to wake: with the queue
// empty, look for the next op for a moment before sleeping, so a burst costs no wake-up per op.
void EngineCore::await_work() {
  // On one core the look would only take time from the thread about to enqueue.
  static const bool several_cores = std::thread::hardware_concurrency() > 1;
  if (!several_cores || queued_.load(std::memory_order_acquire) != 0) return;
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
  for (int i = 1;; ++i) {
    if (queued_.load(std::memory_order_acquire) != 0) return;
    if (i % 64 == 0 && std::chrono::steady_clock::now() > until) return;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

void EngineCore::run() {
  for (;;) {
    QueuedOp op;
    await_work();
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) {  // stop_ and drained
        // The process's kernel counters belong to this thread while on: release them before it ends, not when the
        // last buffer lets the backend go.
        if (kernel_counters_) backend_->set_kernel_counters(false);
        return;
      }
      op = std::move(queue_.front());
      queue_.pop_front();
      queued_.store(queue_.size(), std::memory_order_release);
      ++running_;
    }
    try {
      if (op.name && profiling_.load(std::memory_order_relaxed)) {
        Backend::TimingMark start = backend_->mark_time();
        op.launch ? op.launch(*backend_) : op.fn();
        Backend::TimingMark end = backend_->mark_time();
        const char* label = backend_->take_profile_label();
        std::vector<Backend::KernelLaunchCounters> launches;
        if (kernel_counters_) launches = backend_->take_kernel_counters();
        std::lock_guard<std::mutex> lock(profile_mu_);
        timed_.push_back({label ? label : op.name, std::move(start), std::move(end)});
        for (auto& l : launches) kernel_records_.push_back({label ? label : op.name, std::move(l)});
      } else {
        op.launch ? op.launch(*backend_) : op.fn();
      }
    } catch (const BackendError& e) {
      record_error({status_code_name(e.code), e.what()});
    } catch (const std::exception& e) {
      record_error({"ERR_INTERNAL", e.what()});
    }
    op = {};  // drop the op's buffers before reporting idle
    {
      std::lock_guard<std::mutex> lock(mu_);
      --running_;
    }
    idle_cv_.notify_all();
  }
}

}  // namespace scalekv

namespace scalekv {

void EngineCore::set_profiling(bool on, bool kernel_counters, uint64_t sample_blocks) {
  {
    std::lock_guard<std::mutex> lock(profile_mu_);
    if (on) {
      profile_.clear();
      timed_.clear();
      kernel_records_.clear();
    }
    profiling_ = on;
  }
  // The counters belong to the thread that launches the kernels: switch them there, in queue order.
  const bool counters = on && kernel_counters;
  enqueue([this, counters, sample_blocks] {
    if (!counters && !kernel_counters_) return;
    if (!backend_->set_kernel_counters(counters, sample_blocks))
      throw BackendError(StatusCode::device, std::string(backend_->name()) +
                                                 ": kernel cost counters are not available (only the emulator built "
                                                 "without a sanitizer has them, for one engine at a time)");
    kernel_counters_ = counters;
  });
}

std::vector<EngineCore::KernelRecord> EngineCore::take_kernel_records() {
  std::lock_guard<std::mutex> lock(profile_mu_);
  std::vector<KernelRecord> out;
  out.swap(kernel_records_);
  return out;
}

std::map<std::string, EngineCore::OpProfile> EngineCore::profile() {
  std::lock_guard<std::mutex> lock(profile_mu_);
  for (const TimedOp& t : timed_) {
    OpProfile& p = profile_[t.name];
    p.count += 1;
    p.ms += backend_->elapsed_ms(t.start, t.end);
  }
  timed_.clear();
  return profile_;
}

}  // namespace scalekv
