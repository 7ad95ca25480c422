#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <boost/context/detail/fcontext.hpp>
#include <cstdio>
#include <cstdlib>

#include "sanitizer_hooks.h"

namespace skv_emu {

namespace ctx = boost::context::detail;

// First code run on a new fiber's stack: `t.fctx` is the scheduler that resumed it, `t.data` the Fiber.
struct FiberEntry {
  static void run(ctx::transfer_t t) {
    Fiber* self = static_cast<Fiber*>(t.data);
    if (__sanitizer_finish_switch_fiber)
      __sanitizer_finish_switch_fiber(nullptr, &self->caller_stack_lo_, &self->caller_stack_bytes_);
    self->caller_ = t.fctx;
    self->entry_(self->arg_);
    std::fprintf(stderr, "skv_emu: fiber entry returned\n");
    std::abort();
  }
};

static constexpr size_t kGuardBytes = 64 * 1024;

static size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

size_t Fiber::default_stack_bytes() {
  static const size_t bytes = [] {
    if (const char* kb = std::getenv("SKV_EMU_STACK_KB")) return static_cast<size_t>(std::atol(kb)) * 1024;
    return size_t(san::asan_active() ? 256 : 64) * 1024;
  }();
  return bytes;
}

Fiber::Fiber(size_t stack_bytes, Entry entry, void* arg) : entry_(entry), arg_(arg) {
  const size_t page = page_size();
  stack_bytes_ = (stack_bytes + page - 1) / page * page;
  mapping_bytes_ = stack_bytes_ + kGuardBytes;
  mapping_ = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                  -1, 0);
  if (mapping_ == MAP_FAILED) {
    std::fprintf(stderr, "skv_emu: cannot map a %zu-byte fiber stack\n", mapping_bytes_);
    std::abort();
  }
  // Stacks grow down: the guard below turns an overflow into a SIGSEGV, not silent corruption of the next
  // fiber's stack. It costs address space only, so it is wide enough for a large local array to land in it.
  mprotect(mapping_, kGuardBytes, PROT_NONE);
  stack_lo_ = static_cast<char*>(mapping_) + kGuardBytes;
  context_ = ctx::make_fcontext(stack_lo_ + stack_bytes_, stack_bytes_, &FiberEntry::run);
  if (__tsan_create_fiber) tsan_fiber_ = __tsan_create_fiber(0);
}

Fiber::~Fiber() {
  // A parked fiber leaves ASan redzones in its frames; clear them so a later mapping at this address is clean.
  if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(stack_lo_, stack_bytes_);
  if (tsan_fiber_) __tsan_destroy_fiber(tsan_fiber_);
  munmap(mapping_, mapping_bytes_);
}

void Fiber::set_name(const char* name) {
  if (tsan_fiber_ && __tsan_set_fiber_name) __tsan_set_fiber_name(tsan_fiber_, name);
}

void Fiber::resume() {
  void* fake_stack = nullptr;
  if (__sanitizer_start_switch_fiber) __sanitizer_start_switch_fiber(&fake_stack, stack_lo_, stack_bytes_);
  if (tsan_fiber_) {
    tsan_caller_ = __tsan_get_current_fiber();
    __tsan_switch_to_fiber(tsan_fiber_, 1 /* no_sync: only barriers order simulated threads */);
  }
  ctx::transfer_t t = ctx::jump_fcontext(context_, this);
  if (__sanitizer_finish_switch_fiber) __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
  context_ = t.fctx;
}

void Fiber::yield() {
  if (__sanitizer_start_switch_fiber)
    __sanitizer_start_switch_fiber(&fake_stack_, caller_stack_lo_, caller_stack_bytes_);
  if (tsan_fiber_) __tsan_switch_to_fiber(tsan_caller_, 1);
  ctx::transfer_t t = ctx::jump_fcontext(caller_, nullptr);
  if (__sanitizer_finish_switch_fiber)
    __sanitizer_finish_switch_fiber(fake_stack_, &caller_stack_lo_, &caller_stack_bytes_);
  caller_ = t.fctx;
}

}  // namespace skv_emu
