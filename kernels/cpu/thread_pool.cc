#include "thread_pool.h"

#include <algorithm>
#include <atomic>

namespace scalekv::cpu {

#ifdef SCALEKV_OPENMP

ThreadPool::ThreadPool(int threads) : threads_(std::max(1, threads)) {}
ThreadPool::~ThreadPool() = default;

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (threads_ == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  // About four chunks per thread balances uneven work; chunks are claimed from a shared counter.
  const int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, int64_t(threads_) * 4);
  const int64_t chunk = (n + chunks - 1) / chunks;
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mu;
#pragma omp parallel num_threads(threads_)
  for (;;) {
    const int64_t begin = next.fetch_add(chunk);
    if (begin >= n) break;
    try {
      fn(begin, std::min(n, begin + chunk));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mu);
      if (!error) error = std::current_exception();
      next.store(n);
    }
  }
  if (error) std::rethrow_exception(error);
}

#else

ThreadPool::ThreadPool(int threads) : threads_(std::max(1, threads)) {
  const int extra = std::max(0, threads - 1);
  workers_.reserve(extra);
  for (int i = 0; i < extra; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::run_chunks() {
  for (;;) {
    int64_t begin;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (next_ >= n_) return;
      begin = next_;
      next_ = std::min(n_, next_ + chunk_);
    }
    const int64_t end = std::min(n_, begin + chunk_);
    try {
      (*job_)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      next_ = n_;
    }
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      ++active_;
    }
    run_chunks();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_.notify_all();
    }
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (workers_.empty() || n <= grain) {
    fn(0, n);
    return;
  }
  // About four chunks per thread balances uneven work without much locking.
  const int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, int64_t(size()) * 4);
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &fn;
    n_ = n;
    chunk_ = (n + chunks - 1) / chunks;
    next_ = 0;
    error_ = nullptr;
    ++generation_;
  }
  wake_.notify_all();
  run_chunks();
  std::exception_ptr error;
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return active_ == 0 && next_ >= n_; });
    job_ = nullptr;
    error = error_;
    error_ = nullptr;
  }
  if (error) std::rethrow_exception(error);
}

#endif

}  // namespace scalekv::cpu
