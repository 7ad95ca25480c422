// SKV_LAUNCH's back end: checks the launch configuration as the CUDA runtime would, then runs the grid's
// blocks on a small pool of OS threads (each block entirely on one of them, with its own fibers).
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <numeric>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <vector>

#include "block_state.h"
#include "profile_internal.h"

namespace skv_emu {

// Dynamic shared memory: 48 KiB without opt-in; the opt-in ceiling defaults to sm_80's 163 KiB, the smaller
// of the two targets, so a kernel that fits here fits on both A100 and H100.
static constexpr size_t kDefaultSmem = 48 * 1024;
static size_t max_optin_smem() {
  static const size_t v = [] {
    const char* s = std::getenv("SKV_EMU_MAX_SMEM_OPTIN");
    return s ? static_cast<size_t>(std::strtoull(s, nullptr, 0)) : size_t(166912);
  }();
  return v;
}

static std::mutex g_attr_mutex;
static std::map<const void*, int>& smem_optin() {
  static std::map<const void*, int> m;
  return m;
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > max_optin_smem()) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(g_attr_mutex);
  smem_optin()[kernel] = bytes;
  return cudaSuccess;
}

static void check_config(const LaunchSpec& s) {
  const dim3 g = s.grid, b = s.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0)
    fatal_launch(s, "a zero grid or block dimension (CUDA: cudaErrorInvalidConfiguration)");
  if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    fatal_launch(s, "grid dimensions exceed (2^31-1, 65535, 65535) (CUDA: cudaErrorInvalidConfiguration)");
  if (b.x > 1024 || b.y > 1024 || b.z > 64 || uint64_t(b.x) * b.y * b.z > 1024)
    fatal_launch(s, "more than 1024 threads per block or a block dimension over (1024, 1024, 64) "
                    "(CUDA: cudaErrorInvalidConfiguration)");
  if (s.smem_bytes > kDefaultSmem) {
    int optin = 0;
    {
      std::lock_guard<std::mutex> lock(g_attr_mutex);
      auto it = smem_optin().find(s.kernel_id);
      if (it != smem_optin().end()) optin = it->second;
    }
    if (s.smem_bytes > static_cast<size_t>(optin))
      fatal_launch(s, "%zu bytes of dynamic shared memory need cudaFuncSetAttribute(kernel, "
                      "cudaFuncAttributeMaxDynamicSharedMemorySize, >= %zu) first (opted in: %d; ceiling %zu)",
                   s.smem_bytes, s.smem_bytes, optin, max_optin_smem());
  }
}

// ---- the pool ---------------------------------------------------------------------------------------------
// Blocks are handed out in a scrambled order (i -> (a * i + c) mod n with gcd(a, n) = 1) under the random
// schedule: a kernel that assumes block 0 runs first, or that blocks run in index order, fails here too.
struct GridJob {
  const LaunchSpec* spec;
  uint64_t blocks;
  uint64_t stride = 1, offset = 0;
  std::atomic<uint64_t> next{0};

  GridJob(const LaunchSpec* s, uint64_t n, bool scramble) : spec(s), blocks(n) {
    if (!scramble || n < 3) return;
    offset = (n * 7919u / 13u + 3u) % n;
    stride = (n * 5u / 8u) | 1u;
    while (std::gcd(stride, n) != 1) ++stride;
  }

  void work() {
    Worker& w = this_worker();
    for (uint64_t i = next.fetch_add(1, std::memory_order_relaxed); i < blocks;
         i = next.fetch_add(1, std::memory_order_relaxed))
      run_block(w, *spec, (static_cast<unsigned __int128>(i) * stride + offset) % blocks);
  }
};

class Pool {
 public:
  // Runs `job` on the calling thread plus `helpers` pool threads; returns when all blocks are done.
  void run(GridJob& job, int helpers) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while (static_cast<int>(threads_.size()) < helpers) {
        const int index = static_cast<int>(threads_.size());
        threads_.emplace_back([this, index] { loop(index); });
      }
      job_ = &job;
      wanted_ = helpers;
      finished_ = 0;
      ++generation_;
    }
    wake_.notify_all();
    job.work();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return finished_ == wanted_; });
    job_ = nullptr;
  }

 private:
  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      GridJob* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= wanted_) continue;
        job = job_;
      }
      job->work();
      std::lock_guard<std::mutex> lock(mutex_);
      if (++finished_ == wanted_) done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> threads_;  // never joined: they live as long as the process
  GridJob* job_ = nullptr;
  uint64_t generation_ = 0;
  int wanted_ = 0, finished_ = 0;
};

static Pool* g_pool = nullptr;
static std::mutex g_launch_mutex;

static Pool& pool() {
  if (!g_pool) {
    g_pool = new Pool;
    // A forked child (the self-test's death tests) has none of the pool's threads: start a fresh pool there.
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; }); });
  }
  return *g_pool;
}

static int default_workers() {
  static const int n = [] {
    const char* s = std::getenv("SKV_EMU_THREADS");
    return s ? std::atoi(s) : 1;
  }();
  return n;
}

static thread_local double t_declared_simt_flops = 0;
static thread_local bool t_every_block = false;

double take_declared_simt_flops() {
  const double f = t_declared_simt_flops;
  t_declared_simt_flops = 0;
  return f;
}

void launch(const LaunchSpec& spec) {
  check_config(spec);
  if (profile::detail::counting()) {  // counted launches run block after block on this thread
    profile::detail::launch_begin(spec);
    const uint64_t blocks = uint64_t(spec.grid.x) * spec.grid.y * spec.grid.z;
    const uint64_t sample = t_every_block ? 0 : profile::detail::sample_blocks();
    t_every_block = false;
    if (sample == 0 || blocks <= sample) {
      GridJob job(&spec, blocks, scheduling_is_random());
      job.work();
      profile::detail::launch_end(blocks);
    } else {
      Worker& w = this_worker();
      for (uint64_t i = 0; i < sample; ++i) run_block(w, spec, i * (blocks - 1) / (sample - 1));
      profile::detail::launch_end(sample);
    }
    return;
  }
  t_declared_simt_flops = 0;
  t_every_block = false;
  static const bool trace = std::getenv("SKV_EMU_TRACE") != nullptr;
  if (trace)
    std::fprintf(stderr, "skv_emu: launch '%s' [%s] grid (%u,%u,%u) block (%u,%u,%u) smem %zu\n", spec.kernel_name,
                 kernel_function_name(spec.kernel_id).c_str(), spec.grid.x, spec.grid.y, spec.grid.z, spec.block.x,
                 spec.block.y, spec.block.z, spec.smem_bytes);
  const uint64_t blocks = uint64_t(spec.grid.x) * spec.grid.y * spec.grid.z;
  GridJob job(&spec, blocks, scheduling_is_random());
  int workers = spec.stream ? spec.stream->workers : default_workers();
  if (workers < 1) workers = 1;
  if (static_cast<uint64_t>(workers) > blocks) workers = static_cast<int>(blocks);
  if (workers == 1) {
    job.work();
    return;
  }
  std::lock_guard<std::mutex> lock(g_launch_mutex);  // one grid at a time on the shared pool
  pool().run(job, workers - 1);
}

}  // namespace skv_emu

void skv::declare_simt_flops(double flops) { skv_emu::t_declared_simt_flops = flops; }
void skv::declare_every_block() { skv_emu::t_every_block = true; }
