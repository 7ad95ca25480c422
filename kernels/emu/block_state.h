// Internal: the state of one block being run by one OS thread (a "worker"), and of its simulated threads.
// Only the runtime's .cc files include this.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "emu_runtime.h"
#include "fiber.h"

namespace skv_emu {

enum class Wait : uint8_t { running, barrier, warp, exited };
enum class Schedule : uint8_t { random, forward, reverse };

struct CpAsyncCopy {
  unsigned char* dst;
  int group;                // index of the commit group it belongs to
  unsigned char bytes[16];  // read from global memory at issue (so ASan blames the issuing line)
};

struct Block;

struct SimThread {
  LaneContext lane;
  Block* block = nullptr;
  Fiber* fiber = nullptr;
  unsigned linear = 0;  // x + y * bx + z * bx * by; warp = linear / 32, lane = linear % 32
  Wait wait = Wait::running;
  Site site{};          // where it waits (barrier or collective)
  const char* op = nullptr;
  unsigned mask = 0;
  void* record = nullptr;
  CombineFn combine = nullptr;
  std::vector<CpAsyncCopy> cp_pending;
  int cp_committed = 0;
  char name[48] = {};   // "block (x,y,z) thread (x,y,z)", for ThreadSanitizer reports
};

struct WarpState {
  unsigned lanes = 0;    // lanes that exist (a last, partial warp has fewer than 32)
  unsigned exited = 0;
  unsigned waiting = 0;     // lanes waiting in a collective
  unsigned at_barrier = 0;  // lanes waiting at __syncthreads
  char sync = 0;         // address for ThreadSanitizer release/acquire
};

struct Block {
  const LaunchSpec* spec = nullptr;
  uint3 idx{};
  uint64_t linear_idx = 0;
  unsigned nthreads = 0;
  unsigned char* smem = nullptr;
  std::vector<SimThread> threads;
  std::vector<WarpState> warps;
  std::vector<unsigned> ready;  // threads to resume; the schedule picks among them
  size_t ready_head = 0;
  uint64_t rng = 0;
  Schedule schedule = Schedule::random;
  unsigned at_barrier = 0, exited = 0;
  Site barrier_site{};
  unsigned barrier_first = 0;  // the first thread to reach the current barrier
  char barrier_sync = 0, start_sync = 0, end_sync = 0;  // ThreadSanitizer sync addresses
};

// One per OS thread that runs blocks: its fibers (grown to the largest block seen) and its block.
struct Worker {
  std::vector<std::unique_ptr<Fiber>> fibers;
  Block block;
  std::vector<char> signal_stack;
};

extern __thread SimThread* t_sim;

// The simulated thread now running; aborts with `what` when called from host code.
SimThread& current(const char* what);

inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || __builtin_strcmp(a.file, b.file) == 0);
}

// Runs block `linear_idx` of `spec` on the calling OS thread.
void run_block(Worker& w, const LaunchSpec& spec, uint64_t linear_idx);
Worker& this_worker();
// The SIMT FLOPs the launcher declared for the launch it is about to make (skv::declare_simt_flops); 0 if none.
double take_declared_simt_flops();
bool scheduling_is_random();  // SKV_EMU_SCHEDULE is random (the default)
void install_crash_handler(Worker& w);  // per OS thread, when no sanitizer is active

// Prints "skv_emu: kernel 'k' block (..) thread (..) (warp w lane l): message" and aborts.
[[noreturn]] void fatal(const SimThread* t, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
[[noreturn]] void fatal_launch(const LaunchSpec& spec, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void describe_thread(const SimThread& t, char* out, size_t n);  // "(x,y,z)"
std::string kernel_function_name(const void* kernel);           // from the symbol table; "" if unknown

}  // namespace skv_emu
