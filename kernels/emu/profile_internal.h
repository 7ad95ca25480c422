// Internal: how the runtime feeds the cost counters (emu_profile.h). Every entry point returns at once unless
// the calling thread is counting, so the runtime calls them unconditionally.
#pragma once

#include <atomic>
#include <cstdint>
#include <pthread.h>

#include "block_state.h"
#include "emu_profile.h"

namespace skv_emu::profile::detail {

extern std::atomic<bool> g_any_counting;
extern std::atomic<pthread_t> g_counting_thread;
inline bool counting() {
  return g_any_counting.load(std::memory_order_relaxed) &&
         pthread_equal(g_counting_thread.load(std::memory_order_relaxed), pthread_self());
}

uint64_t sample_blocks();  // 0: run every block
void launch_begin(const LaunchSpec& spec);
void launch_end(uint64_t blocks_run);
void block_begin(const Block& b);
void barrier_done(const Block& b);  // every thread of b passed a __syncthreads
void block_end(const Block& b);
void mma();
void ldmatrix(const unsigned char* const rows[], int matrices);
void access(uintptr_t site, const void* ptr, int size, bool store);  // an instrumented load/store
void cp_async(const void* site, const void* smem_dst, const void* gmem_src, int src_bytes);

}  // namespace skv_emu::profile::detail
