// A fiber: a small mmap'd stack with a 64 KiB guard below it and a Boost.Context fcontext. The scheduler resumes a
// fiber, which runs until it calls Fiber::yield(); switching is a register save/restore in user space
// (no syscall, unlike swapcontext), which is what makes one fiber per simulated CUDA thread affordable.
#pragma once

#include <cstddef>

namespace skv_emu {

class Fiber {
 public:
  using Entry = void (*)(void* arg);

  // `entry(arg)` runs on the first resume and must never return (fibers are parked, then unmapped).
  Fiber(size_t stack_bytes, Entry entry, void* arg);
  ~Fiber();
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // From the scheduler's stack: run this fiber until it yields.
  void resume();
  // From inside this fiber: return to the scheduler that resumed it.
  void yield();

  // Names the fiber in ThreadSanitizer reports ("block (0,0,0) thread (5,0,0)").
  void set_name(const char* name);

  // Default stack size: 64 KiB, 256 KiB under AddressSanitizer (redzones triple a kernel's frame);
  // SKV_EMU_STACK_KB overrides.
  static size_t default_stack_bytes();

 private:
  friend struct FiberEntry;  // the fcontext entry point (fiber.cc)

  void* mapping_ = nullptr;     // guard page + stack
  size_t mapping_bytes_ = 0;
  char* stack_lo_ = nullptr;    // lowest usable stack byte (just above the guard page)
  size_t stack_bytes_ = 0;
  void* context_ = nullptr;     // this fiber's suspended fcontext
  void* caller_ = nullptr;      // the scheduler's suspended fcontext while this fiber runs
  Entry entry_;
  void* arg_;
  // AddressSanitizer bookkeeping: the fiber's fake stack while suspended, the scheduler's stack bounds.
  void* fake_stack_ = nullptr;
  const void* caller_stack_lo_ = nullptr;
  size_t caller_stack_bytes_ = 0;
  // ThreadSanitizer fiber handles (null without TSan).
  void* tsan_fiber_ = nullptr;
  void* tsan_caller_ = nullptr;
};

}  // namespace skv_emu
