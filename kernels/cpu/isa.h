// Runtime ISA dispatch for the CPU kernels that are ours (the library picks its own): each such kernel is compiled
// once per level with GCC target attributes and the level is chosen at load, so one build runs on AVX2-only and
// AVX-512 machines alike and never executes an instruction the CPU lacks. SCALEKV_CPU_ISA (avx512, avx2 or
// generic) caps the level: to compare the paths, or to step around a bad one.
#pragma once

namespace scalekv::cpu {

enum class IsaLevel { generic = 0, avx2 = 1, avx512 = 2 };

// The level in use: the highest this CPU has, capped by SCALEKV_CPU_ISA (read once).
IsaLevel isa_level();
const char* isa_name(IsaLevel level);

// The variant of a kernel compiled for the level in use.
template <class Fn>
Fn for_isa(Fn avx512, Fn avx2, Fn generic) {
  const IsaLevel level = isa_level();
  return level == IsaLevel::avx512 ? avx512 : level == IsaLevel::avx2 ? avx2 : generic;
}

}  // namespace scalekv::cpu

// Target attributes of the levels (the functions compiled for them are selected by isa_level()).
#define SKV_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#define SKV_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SKV_ALWAYS_INLINE inline __attribute__((always_inline))
