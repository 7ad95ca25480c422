#include "isa.h"

#include <cstdlib>
#include <cstring>

namespace scalekv::cpu {

IsaLevel isa_level() {
  static const IsaLevel level = [] {
    IsaLevel have = IsaLevel::generic;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) have = IsaLevel::avx2;
    if (have == IsaLevel::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      have = IsaLevel::avx512;
    const char* cap = std::getenv("SCALEKV_CPU_ISA");
    IsaLevel limit = IsaLevel::avx512;
    if (cap && std::strcmp(cap, "avx2") == 0) limit = IsaLevel::avx2;
    if (cap && std::strcmp(cap, "generic") == 0) limit = IsaLevel::generic;
    return have < limit ? have : limit;
  }();
  return level;
}

const char* isa_name(IsaLevel level) {
  switch (level) {
    case IsaLevel::avx512: return "avx512";
    case IsaLevel::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace scalekv::cpu
