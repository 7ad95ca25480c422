// The emulator backend: the CUDA kernels (kernels/cuda, compiled with g++ -DSCALEKV_EMU) run on the CPU
// through kernels/emu, with host memory standing in for device memory. For tests: it is slow and strict
// (barrier and warp divergence abort; under ASan, out-of-bounds accesses abort).
#pragma once

#include <memory>

#include "../backend.h"

namespace scalekv {

// `threads`: OS threads that run blocks in parallel (<= 0: all hardware threads).
std::unique_ptr<Backend> make_emu_backend(int threads);

}  // namespace scalekv
