// The machine's measured f32 FMA peak (fma_peak.cc), the yardstick of the CPU benchmarks.
#pragma once

#include <string>

namespace scalekv::cpu {

struct FmaPeak {
  double gflops = 0;  // all threads together; 0 without a vector FMA ISA
  std::string isa;    // "avx512f", "avx2+fma" or "none"
};

// Runs `threads` threads of independent vector FMA chains for `seconds`.
FmaPeak measure_fma_peak(int threads, double seconds);

}  // namespace scalekv::cpu
