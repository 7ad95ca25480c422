// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the Random123
// constants) as a pure function of (key, counter), shared by the CPU and CUDA sample_bits kernels so both
// draw bit-identical uniforms. Only 32/64-bit integer arithmetic: no intrinsics, no state.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SKV_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SKV_HOST_DEVICE inline
#endif

namespace scalekv {

struct Philox4 {
  uint32_t v[4];
};

SKV_HOST_DEVICE Philox4 philox4x32_10(uint32_t k0, uint32_t k1, Philox4 c) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c.v[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c.v[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c = Philox4{{hi1 ^ c.v[1] ^ k0, lo1, hi0 ^ c.v[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// The sampling uniform of pair `t` of image `b` at scale `scale`: the top 24 bits of the first Philox word
// of counter (t_lo, t_hi, b, scale) under key = seed, scaled to [0, 1) exactly (a multiple of 2^-24).
SKV_HOST_DEVICE double philox_uniform(uint64_t seed, uint32_t b, uint32_t scale, uint64_t t) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                                  Philox4{{static_cast<uint32_t>(t), static_cast<uint32_t>(t >> 32), b, scale}});
  return static_cast<double>(r.v[0] >> 8) * (1.0 / 16777216.0);
}

}  // namespace scalekv
