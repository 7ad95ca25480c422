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

// Device memory owned jointly by JS handles and the queued ops that use it; freed (on the queue, after
// the work that uses it) when the last owner lets go.
class Buffer {
 public:
  Buffer(std::shared_ptr<EngineCore> core, void* ptr, size_t bytes, Category category)
      : core_(std::move(core)), ptr_(ptr), bytes_(bytes), category_(category) {}
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  std::shared_ptr<EngineCore> core_;
  void* ptr_;
  size_t bytes_;
  Category category_;
};

struct MemoryCounters {
  std::array<int64_t, kCategories> in_use{}, peak{};
  int64_t total_in_use = 0, total_peak = 0;
};

class EngineCore : public std::enable_shared_from_this<EngineCore> {
 public:
  // The queue thread holds the core alive until it has drained after shutdown(), so queued work never
  // outlives the backend it uses.
  static std::shared_ptr<EngineCore> create(std::unique_ptr<Backend> backend);
  explicit EngineCore(std::unique_ptr<Backend> backend);
  ~EngineCore();

  Backend& backend() { return *backend_; }

  // Allocates now (so out-of-memory throws at the call), counted under `category`.
  std::shared_ptr<Buffer> allocate(size_t bytes, Category category);

  // Runs `op` on the queue thread after everything enqueued before it. An exception it throws is kept as
  // the pending error; later ops still run (each validates its own inputs). False once shut down.
  bool enqueue(std::function<void()> op);

  // Runs `op` on the queue, then synchronises the backend, then calls `done` (still on the queue thread)
  // with the pending error, if any, which is cleared. `done` must hand results to JS itself.
  bool enqueue_completion(std::function<void()> op, std::function<void(std::optional<QueuedError>)> done);

  // Stops accepting work; the queue thread drains what was enqueued and exits. Returns at once.
  void shutdown();

  MemoryCounters memory() const;
  void release_memory(void* ptr, size_t bytes, Category category);

 private:
  void run();
  void record_error(const QueuedError& e);

  std::unique_ptr<Backend> backend_;
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::optional<QueuedError> pending_error_;  // guarded by mu_

  mutable std::mutex mem_mu_;
  MemoryCounters mem_;
};

}  // namespace scalekv
