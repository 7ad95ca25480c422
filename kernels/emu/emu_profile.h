// The emulator's cost counters: what each kernel launch asks of the memory system and the tensor cores, counted
// per warp-level instruction as the hardware would see it, for a roofline projection on a named GPU (the
// projection itself is lib/projection.ts). Host API; the runtime feeds the counters.
//
// How accesses are seen: the emu kernels are compiled with GCC's kernel-address instrumentation in callback
// mode (emu.cmake, flavour without a sanitizer), so every load and store calls a hook with its address, size
// and call site; nothing is recorded unless counting is on. An access inside the block's shared memory counts
// as shared, inside a registered device allocation as global; anything else (the thread's locals, kernel
// parameters) is a register or constant and is not counted. ldmatrix, cp.async and mma are counted where the
// runtime emulates them.
//
// Grouping lanes into warp instructions: lanes run one after another, not in lockstep, so the n-th execution of
// a given instruction (call site) by each lane of a warp since the last __syncthreads is taken as one warp
// instruction. Exact for convergent code; code where lanes run an instruction different numbers of times
// between barriers is paired approximately.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace skv_emu::profile {

struct Counters {
  // Global memory: warp-level requests, distinct 32-byte sectors they touch, and the bytes the lanes asked for
  // (coalescing efficiency = bytes / (32 * sectors)). cp.async reads count as loads.
  uint64_t global_load_requests = 0, global_load_sectors = 0, global_load_bytes = 0;
  uint64_t global_store_requests = 0, global_store_sectors = 0, global_store_bytes = 0;
  // Compulsory DRAM traffic: distinct sectors read and written over the whole launch.
  uint64_t dram_read_bytes = 0, dram_write_bytes = 0;
  // Shared memory: warp-level requests and wavefronts (one per bank-conflict-free pass of 128 bytes);
  // `ideal` is the wavefronts the same request needs without bank conflicts. ldmatrix counts as loads,
  // cp.async destinations as stores.
  uint64_t shared_load_requests = 0, shared_load_wavefronts = 0, shared_load_ideal = 0;
  uint64_t shared_store_requests = 0, shared_store_wavefronts = 0, shared_store_ideal = 0;
  uint64_t tensor_flops = 0;  // mma.m16n8k16: 2 * 16 * 8 * 16 per warp instruction
  uint64_t barriers = 0;      // __syncthreads completed, summed over blocks
  uint64_t blocks = 0;
};

struct Launch {
  std::string kernel;  // the kernel function's name, e.g. "gemm_mma_kernel" or "attention_mma_kernel<64, 4>"
  unsigned grid[3] = {1, 1, 1}, block[3] = {1, 1, 1};
  size_t smem_bytes = 0;
  double simt_flops = 0;  // declared by the launcher (skv::declare_simt_flops), 0 when it declares none
  uint64_t blocks_run = 0;  // blocks actually emulated: fewer than the grid's when sampling
  Counters counters;        // for the whole grid (scaled up from the blocks run when sampling)
};

// True when the kernels were built with the access hooks (the build without a sanitizer).
bool available();
// Starts counting on the calling thread: every launch it makes from now on runs its blocks on this thread
// (one at a time) and is recorded. One thread counts at a time: false when another already does.
// `sample_blocks` > 0: a grid with more blocks runs only that many, spread evenly over it (the first and last
// included), and its counters are scaled to the whole grid. The kernels' results are then incomplete: for
// projections of large shapes only.
bool start(uint64_t sample_blocks = 0);
// Stops counting, whichever thread calls it.
void stop();
// The launches recorded since the last take (in launch order).
std::vector<Launch> take();

// Device memory: accesses inside a registered range count as global memory.
void register_global(const void* ptr, size_t bytes);
void unregister_global(const void* ptr);

}  // namespace skv_emu::profile
