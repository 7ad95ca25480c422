// The machine's f32 FMA peak, measured: each thread runs independent chains of vector FMAs (enough of them to
// cover the FMA latency on two ports) at the widest ISA the CPU has, for a fixed time. The benchmarks divide every
// CPU kernel's GFLOP/s by it, so "fraction of peak" is of this machine, measured in the same run.
#include "fma_peak.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

namespace scalekv::cpu {
namespace {

constexpr int kChains = 12;        // independent accumulators: latency 4 x 2 ports = 8, with margin
constexpr int64_t kInner = 1 << 16;  // FMAs per chain between clock reads

__attribute__((target("avx512f"))) double run_avx512(double seconds) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(float(i) * 1e-3f);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  int64_t rounds = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    for (int64_t r = 0; r < kInner; ++r)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
    ++rounds;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  float lanes[16], sink = 0;
  for (int i = 0; i < kChains; ++i) {
    _mm512_storeu_ps(lanes, acc[i]);
    for (float v : lanes) sink += v;
  }
  volatile float keep = sink;
  (void)keep;
  return double(rounds) * kInner * kChains * 16 * 2 / elapsed;
}

__attribute__((target("avx2,fma"))) double run_avx2(double seconds) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(float(i) * 1e-3f);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  int64_t rounds = 0;
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0;
  do {
    for (int64_t r = 0; r < kInner; ++r)
      for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
    ++rounds;
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } while (elapsed < seconds);
  float lanes[8], sink = 0;
  for (int i = 0; i < kChains; ++i) {
    _mm256_storeu_ps(lanes, acc[i]);
    for (float v : lanes) sink += v;
  }
  volatile float keep = sink;
  (void)keep;
  return double(rounds) * kInner * kChains * 8 * 2 / elapsed;
}

}  // namespace

FmaPeak measure_fma_peak(int threads, double seconds) {
  threads = std::max(1, threads);
  FmaPeak peak;
  double (*run)(double) = nullptr;
  if (__builtin_cpu_supports("avx512f")) {
    run = run_avx512;
    peak.isa = "avx512f";
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    run = run_avx2;
    peak.isa = "avx2+fma";
  } else {
    peak.isa = "none";
    return peak;
  }
  std::vector<double> rates(size_t(threads), 0.0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { rates[size_t(t)] = run(seconds); });
  for (auto& t : pool) t.join();
  for (double r : rates) peak.gflops += r / 1e9;
  return peak;
}

}  // namespace scalekv::cpu
