#include "engine_core.h"

#include <algorithm>

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

Buffer::~Buffer() {
  // Freed in queue order, so work enqueued before the last owner let go has finished with it. The raw
  // pointer is safe: the queue thread keeps the core alive until the queue is drained.
  EngineCore* core = core_.get();
  void* ptr = ptr_;
  const size_t bytes = bytes_;
  const Category category = category_;
  if (!core->enqueue([core, ptr, bytes, category] { core->release_memory(ptr, bytes, category); }))
    core->release_memory(ptr, bytes, category);
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
  if (worker_.joinable()) {
    if (worker_.get_id() == std::this_thread::get_id()) {
      worker_.detach();
    } else {
      worker_.join();
    }
  }
}

void EngineCore::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
}

std::shared_ptr<Buffer> EngineCore::allocate(size_t bytes, Category category) {
  void* ptr = backend_->alloc(std::max<size_t>(bytes, 1));
  {
    std::lock_guard<std::mutex> lock(mem_mu_);
    const int c = static_cast<int>(category);
    mem_.in_use[c] += int64_t(bytes);
    mem_.peak[c] = std::max(mem_.peak[c], mem_.in_use[c]);
    mem_.total_in_use += int64_t(bytes);
    mem_.total_peak = std::max(mem_.total_peak, mem_.total_in_use);
  }
  return std::make_shared<Buffer>(shared_from_this(), ptr, bytes, category);
}

void EngineCore::release_memory(void* ptr, size_t bytes, Category category) {
  try {
    backend_->free(ptr);
  } catch (...) {
    // A failing free leaves nothing to recover; the counters still drop so they stay truthful about
    // what the engine holds.
  }
  std::lock_guard<std::mutex> lock(mem_mu_);
  mem_.in_use[static_cast<int>(category)] -= int64_t(bytes);
  mem_.total_in_use -= int64_t(bytes);
}

MemoryCounters EngineCore::memory() const {
  std::lock_guard<std::mutex> lock(mem_mu_);
  return mem_;
}

bool EngineCore::enqueue(std::function<void()> op) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) return false;
    queue_.push_back(std::move(op));
  }
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

void EngineCore::run() {
  for (;;) {
    std::function<void()> op;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      op = std::move(queue_.front());
      queue_.pop_front();
    }
    try {
      op();
    } catch (const BackendError& e) {
      record_error({status_code_name(e.code), e.what()});
    } catch (const std::exception& e) {
      record_error({"ERR_INTERNAL", e.what()});
    }
  }
}

}  // namespace scalekv
