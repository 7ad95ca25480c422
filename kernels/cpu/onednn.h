// The CPU backend's library path (onednn.cc): GEMM and convolution through oneDNN when the build found it.
#pragma once

#include <string>

#include "../backend.h"

namespace scalekv::cpu::onednn {

// Whether the library is compiled in, and its version and the ISA its kernels use ("" when not compiled in).
bool available();
std::string version();

// Run the op through oneDNN on `threads` threads when it takes the case; false: the caller runs the builtin kernel.
bool gemm(const GemmArgs& a, int threads);
bool conv2d(const Conv2dArgs& a, int threads);

}  // namespace scalekv::cpu::onednn
