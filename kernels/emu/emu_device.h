// Device-side names the kernels use: thread coordinates, dynamic shared memory, __syncthreads, warp
// collectives and atomics. Barriers and collectives are macros so that each carries its call site
// (file:line): threads that meet at different sites have diverged, and the scheduler aborts naming both.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu_cuda_types.h"

namespace skv_emu {

struct Site {
  const char* file;
  int line;
};
#define SKV_EMU_HERE (::skv_emu::Site{__FILE__, __LINE__})

// What device code may read about the running simulated thread. The scheduler points t_lane at the right
// one before every switch into a fiber.
struct LaneContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned char* smem;  // this block's dynamic shared memory, poisoned at block start
  size_t smem_bytes;
};
// Default (dynamic) TLS model: initial-exec would force the whole addon TLS, cudart_static's page-aligned
// block included, into the small static-TLS surplus dlopen allows, and the addon would not load.
extern __thread const LaneContext* t_lane;

[[noreturn]] void fatal_outside_kernel(const char* what);
inline const LaneContext& lane() {
  if (__builtin_expect(t_lane == nullptr, 0)) fatal_outside_kernel("a device intrinsic");
  return *t_lane;
}

// ---- block barrier ----------------------------------------------------------------------------------------
void syncthreads(const Site& site);
[[noreturn]] void trap(const Site& site);

// ---- warp collectives -------------------------------------------------------------------------------------
// Each lane passes a record on its own stack; when every lane named in `mask` has arrived at the same site,
// the last to arrive runs `combine` over all records (null for lanes outside the mask), then all continue.
using CombineFn = void (*)(void* const records[32], unsigned mask);
void warp_collective(const Site& site, const char* op, unsigned mask, void* record, CombineFn combine);
void check_shfl_width(const Site& site, const char* op, int width);

enum class ShflMode { idx, up, down, bfly };

template <class T>
struct ShflRecord {
  T value;
  unsigned b;  // source lane, delta or xor mask
  unsigned c;  // PTX's packed (segment mask << 8) | clamp
  T result;
};

// shfl.sync semantics from the PTX ISA. A source lane outside `mask` gives an undefined value on the GPU;
// here it gives all-ones bits (NaN for floats) so a result that depends on it fails the test.
template <class T, ShflMode Mode>
void shfl_combine(void* const records[32], unsigned mask) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!(mask >> lane & 1u)) continue;
    auto* r = static_cast<ShflRecord<T>*>(records[lane]);
    const int bval = static_cast<int>(r->b & 31u);
    const int segmask = static_cast<int>((r->c >> 8) & 31u);
    const int max_lane = (lane & segmask) | (static_cast<int>(r->c & 31u) & ~segmask);
    const int min_lane = lane & segmask;
    int j = lane;
    bool in_range = false;
    switch (Mode) {
      case ShflMode::up: j = lane - bval; in_range = j >= max_lane; break;
      case ShflMode::down: j = lane + bval; in_range = j <= max_lane; break;
      case ShflMode::bfly: j = lane ^ bval; in_range = j <= max_lane; break;
      case ShflMode::idx: j = min_lane | (bval & ~segmask); in_range = j <= max_lane; break;
    }
    if (!in_range) j = lane;
    if (mask >> j & 1u) {
      r->result = static_cast<ShflRecord<T>*>(records[j])->value;
    } else {
      std::memset(static_cast<void*>(&r->result), 0xff, sizeof(T));
    }
  }
}

template <class T, ShflMode Mode>
T shfl(const Site& site, const char* op, unsigned mask, T var, unsigned b, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move at most 8 bytes");
  check_shfl_width(site, op, width);
  const unsigned seg = (32u - static_cast<unsigned>(width)) << 8;
  ShflRecord<T> r{var, b, Mode == ShflMode::up ? seg : (seg | 31u), var};
  warp_collective(site, op, mask, &r, &shfl_combine<T, Mode>);
  return r.result;
}

struct VoteRecord {
  int pred;
  unsigned ballot;
};
void vote_combine(void* const records[32], unsigned mask);
inline unsigned ballot(const Site& site, const char* op, unsigned mask, int pred) {
  VoteRecord r{pred, 0};
  warp_collective(site, op, mask, &r, &vote_combine);
  return r.ballot;
}
inline void no_combine(void* const*, unsigned) {}

// The CUDA signatures, with the call site in front (the macros below add it).
template <class T>
T shfl_sync(const Site& s, unsigned mask, T var, int src_lane, int width = 32) {
  return shfl<T, ShflMode::idx>(s, "__shfl_sync", mask, var, static_cast<unsigned>(src_lane), width);
}
template <class T>
T shfl_up_sync(const Site& s, unsigned mask, T var, unsigned delta, int width = 32) {
  return shfl<T, ShflMode::up>(s, "__shfl_up_sync", mask, var, delta, width);
}
template <class T>
T shfl_down_sync(const Site& s, unsigned mask, T var, unsigned delta, int width = 32) {
  return shfl<T, ShflMode::down>(s, "__shfl_down_sync", mask, var, delta, width);
}
template <class T>
T shfl_xor_sync(const Site& s, unsigned mask, T var, int lane_mask, int width = 32) {
  return shfl<T, ShflMode::bfly>(s, "__shfl_xor_sync", mask, var, static_cast<unsigned>(lane_mask), width);
}
inline unsigned ballot_sync(const Site& s, unsigned mask, int pred) {
  return ballot(s, "__ballot_sync", mask, pred) & mask;
}
inline int any_sync(const Site& s, unsigned mask, int pred) {
  return (ballot(s, "__any_sync", mask, pred) & mask) != 0;
}
inline int all_sync(const Site& s, unsigned mask, int pred) {
  return (ballot(s, "__all_sync", mask, pred) & mask) == mask;
}
inline void syncwarp(const Site& s, unsigned mask = 0xffffffffu) {
  warp_collective(s, "__syncwarp", mask, nullptr, &no_combine);
}

}  // namespace skv_emu

#define threadIdx (static_cast<const uint3&>(::skv_emu::lane().thread_idx))
#define blockIdx (static_cast<const uint3&>(::skv_emu::lane().block_idx))
#define blockDim (static_cast<const dim3&>(::skv_emu::lane().block_dim))
#define gridDim (static_cast<const dim3&>(::skv_emu::lane().grid_dim))

// Inside a kernel body only: the block's own buffer, 128-byte aligned and exactly smem_bytes long (ASan
// catches overruns), filled with 0xFF at every block start (reads before writes give NaN / -1).
#define SKV_DYNAMIC_SMEM(name) unsigned char* const name = ::skv_emu::lane().smem

#define __syncthreads() ::skv_emu::syncthreads(SKV_EMU_HERE)
#define __trap() ::skv_emu::trap(SKV_EMU_HERE)

#define __shfl_sync(...) ::skv_emu::shfl_sync(SKV_EMU_HERE, __VA_ARGS__)
#define __shfl_up_sync(...) ::skv_emu::shfl_up_sync(SKV_EMU_HERE, __VA_ARGS__)
#define __shfl_down_sync(...) ::skv_emu::shfl_down_sync(SKV_EMU_HERE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::skv_emu::shfl_xor_sync(SKV_EMU_HERE, __VA_ARGS__)
#define __ballot_sync(...) ::skv_emu::ballot_sync(SKV_EMU_HERE, __VA_ARGS__)
#define __any_sync(...) ::skv_emu::any_sync(SKV_EMU_HERE, __VA_ARGS__)
#define __all_sync(...) ::skv_emu::all_sync(SKV_EMU_HERE, __VA_ARGS__)
#define __syncwarp(...) ::skv_emu::syncwarp(SKV_EMU_HERE, ##__VA_ARGS__)

// ---- atomics (relaxed, like CUDA's; blocks run on several OS threads, so these are real atomics) ----------
template <class T>
inline T skv_emu_atomic_update(T* p, T (*f)(T, T), T v) {
  T old;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  T next = f(old, v);
  while (!__atomic_compare_exchange(p, &old, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) next = f(old, v);
  return old;
}
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v) {
  return skv_emu_atomic_update<float>(p, [](float a, float b) { return a + b; }, v);
}
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline int atomicMax(int* p, int v) {
  return skv_emu_atomic_update<int>(p, [](int a, int b) { return a > b ? a : b; }, v);
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  return skv_emu_atomic_update<unsigned>(p, [](unsigned a, unsigned b) { return a > b ? a : b; }, v);
}
inline int atomicMin(int* p, int v) {
  return skv_emu_atomic_update<int>(p, [](int a, int b) { return a < b ? a : b; }, v);
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
  return skv_emu_atomic_update<unsigned>(p, [](unsigned a, unsigned b) { return a < b ? a : b; }, v);
}
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline int atomicAnd(int* p, int v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAnd(unsigned* p, unsigned v) { return __atomic_fetch_and(p, v, __ATOMIC_RELAXED); }
inline int atomicXor(int* p, int v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicXor(unsigned* p, unsigned v) { return __atomic_fetch_xor(p, v, __ATOMIC_RELAXED); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline float atomicExch(float* p, float v) {
  float old;
  __atomic_exchange(p, &v, &old, __ATOMIC_RELAXED);
  return old;
}
inline int atomicCAS(int* p, int compare, int v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline unsigned atomicCAS(unsigned* p, unsigned compare, unsigned v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long compare, unsigned long long v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
