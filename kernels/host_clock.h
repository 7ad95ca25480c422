// Timing marks from the host clock, for backends whose ops have finished by the time the queue reaches the next
// mark (the CPU backend and the emulator), so the clock at the call is the time the queue reached it.
#pragma once

#include <chrono>
#include <memory>

#include "backend.h"

namespace scalekv {

inline Backend::TimingMark host_clock_mark() {
  return std::make_shared<std::chrono::steady_clock::time_point>(std::chrono::steady_clock::now());
}

inline double host_clock_elapsed_ms(const Backend::TimingMark& start, const Backend::TimingMark& end) {
  using Clock = std::chrono::steady_clock;
  return std::chrono::duration<double, std::milli>(*static_cast<Clock::time_point*>(end.get()) -
                                                   *static_cast<Clock::time_point*>(start.get()))
      .count();
}

}  // namespace scalekv
