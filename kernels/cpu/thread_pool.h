// A fixed pool for intra-op parallelism on the CPU backend. One op runs at a time (the engine's queue is
// ordered), so parallel_for is called from a single thread and blocks until every chunk is done. Built with
// oneDNN (SCALEKV_OPENMP), the pool is OpenMP's team, the one oneDNN's kernels run on: one set of threads in
// the process, never two pools competing for the cores.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace scalekv::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return threads_; }

  // Calls fn(begin, end) over [0, n) in chunks of at least `grain`; the caller takes part. The first
  // exception thrown by any chunk is rethrown here after all chunks finish.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void worker_loop();
  void run_chunks();

  int threads_;
  std::vector<std::thread> workers_;  // empty with SCALEKV_OPENMP
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t n_ = 0, chunk_ = 0, next_ = 0;
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace scalekv::cpu
