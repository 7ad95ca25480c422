// Sanitizer entry points the fiber switch and the scheduler call, declared weak so that one build of the
// runtime works with AddressSanitizer, ThreadSanitizer or neither: each hook is null unless its sanitizer's
// runtime is linked into the process, and the helpers below are no-ops then.
#pragma once

#include <cstddef>

extern "C" {
// AddressSanitizer: without these, ASan sees the stack pointer jump between fiber stacks and reports
// false stack-buffer-overflows (or misses real ones).
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old)
    __attribute__((weak));
void __asan_unpoison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));
void __asan_poison_memory_region(void const volatile* addr, size_t size) __attribute__((weak));

// ThreadSanitizer: each simulated thread is a TSan fiber; switches carry no happens-before edge, so only
// the barriers and warp collectives (explicit release/acquire) order the simulated threads' accesses.
void* __tsan_get_current_fiber(void) __attribute__((weak));
void* __tsan_create_fiber(unsigned flags) __attribute__((weak));
void __tsan_destroy_fiber(void* fiber) __attribute__((weak));
void __tsan_switch_to_fiber(void* fiber, unsigned flags) __attribute__((weak));
void __tsan_set_fiber_name(void* fiber, const char* name) __attribute__((weak));
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
}

namespace skv_emu::san {

inline bool asan_active() { return __sanitizer_start_switch_fiber != nullptr; }
inline bool tsan_active() { return __tsan_create_fiber != nullptr; }

// Happens-before edges for the race detector (ThreadSanitizer builds only).
inline void release(void* sync_object) {
  if (__tsan_release) __tsan_release(sync_object);
}
inline void acquire(void* sync_object) {
  if (__tsan_acquire) __tsan_acquire(sync_object);
}

}  // namespace skv_emu::san
