// The cost counters (kernels/emu/emu_profile.h) on planted kernels whose counts are known by construction:
// coalesced and strided global accesses, conflict-free, broadcast and bank-conflicting shared accesses,
// ldmatrix rows with and without the swizzle, cp.async, mma, barriers, divergence, compulsory DRAM bytes.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <vector>

#include "../../kernels/emu/emu_profile.h"
#include "selftest.h"

namespace prof = skv_emu::profile;

namespace {

// An array that counts as device memory while it lives, 256-byte aligned as cudaMalloc's (sector counts depend
// on alignment).
template <class T>
struct DeviceVector {
  T* v;
  explicit DeviceVector(size_t n, T fill = T{}) : v(static_cast<T*>(std::aligned_alloc(256, (n * sizeof(T) + 255) / 256 * 256))) {
    std::fill(v, v + n, fill);
    prof::register_global(v, n * sizeof(T));
  }
  ~DeviceVector() {
    prof::unregister_global(v);
    std::free(v);
  }
  T* data() { return v; }
};

// Runs `launch` with counting on and returns its one launch's counters.
template <class F>
prof::Counters counted(F&& launch) {
  CHECK(prof::start());
  launch();
  prof::stop();
  const std::vector<prof::Launch> launches = prof::take();
  CHECK(launches.size() == 1);
  return launches.empty() ? prof::Counters{} : launches[0].counters;
}

// out[i] = in[i * stride] for one warp-sized block per 32 elements.
__global__ void strided_copy(const float* in, float* out, int stride) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[static_cast<size_t>(i) * stride];
}

// Each lane writes then reads shared word (lane * stride) % words, and stores what it read.
__global__ void shared_stride(float* out, int stride, int words) {
  SKV_DYNAMIC_SMEM(raw);
  float* s = reinterpret_cast<float*>(raw);
  const int w = (threadIdx.x * stride) % words;
  s[w] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[w];
}

// One warp: ldmatrix.x4 over 32 rows of 64 bytes (32 bf16), with or without the XOR swizzle of 16-byte chunks.
__global__ void ldmatrix_rows(uint32_t* out, int swizzle) {
  SKV_DYNAMIC_SMEM(raw);
  const unsigned lane = threadIdx.x;
  for (int i = 0; i < 16; ++i) reinterpret_cast<uint32_t*>(raw)[lane * 16 + i] = lane;  // 32 rows x 64 B
  __syncwarp();
  const int row = lane, chunk = 0;
  const int c = swizzle ? chunk ^ ((row >> 1) & 3) : chunk;
  uint32_t r[4];
  skv::ldmatrix_x4(r, raw + row * 64 + c * 16);
  out[lane] = r[0] + r[1] + r[2] + r[3];
}

// One warp: each lane copies 16 bytes by cp.async, then three mma.
__global__ void copy_and_multiply(const uint4* in, float* out) {
  SKV_DYNAMIC_SMEM(raw);
  const unsigned lane = threadIdx.x;
  skv::cp_async_16(raw + lane * 16, in + lane);
  skv::cp_async_commit();
  skv::cp_async_wait<0>();
  __syncwarp();
  uint32_t a[4], b[2];
  for (int i = 0; i < 4; ++i) a[i] = reinterpret_cast<const uint32_t*>(raw)[lane * 4 + i] & 0x3f803f80u;
  b[0] = b[1] = 0x3f803f80u;  // bf16 ones
  float acc[4] = {0, 0, 0, 0};
  for (int k = 0; k < 3; ++k) skv::mma_m16n8k16_bf16(acc, a, b, acc);
  out[lane] = acc[0];
}

// Lanes below `active` load one float each; everyone passes two barriers.
__global__ void divergent_load(const float* in, float* out, int active) {
  float v = 0;
  if (static_cast<int>(threadIdx.x) < active) v = in[threadIdx.x];
  __syncthreads();
  __syncthreads();
  out[threadIdx.x] = v;
}

// Each lane reads four consecutive floats one by one, as g++ may compile a float4 load; then two floats 32 apart.
__global__ void split_vector_load(const float* in, float* out) {
  const int lane = threadIdx.x;
  const volatile float* v = in + 4 * lane;
  float s = v[0];
  s += v[1];
  s += v[2];
  s += v[3];
  const volatile float* w = in;
  s += w[lane];
  s += w[lane + 32];
  out[lane] = s;
}

EMU_TEST(counters_merge_a_lanes_split_vector_access) {
  if (!prof::available()) return;
  DeviceVector<float> in(128, 1.0f), out(32);
  const prof::Counters c = counted([&] { SKV_LAUNCH(split_vector_load, 1, 32, 0, nullptr, in.data(), out.data()); });
  // One 16-byte request (512 bytes, 16 sectors) for the four scalar loads; two 4-byte requests (4 sectors each).
  CHECK(c.global_load_requests == 3);
  CHECK(c.global_load_sectors == 16 + 4 + 4 && c.global_load_bytes == 512 + 128 + 128);
}

EMU_TEST(counters_global_coalescing) {
  if (!prof::available()) { std::printf("NOTICE: cost counters not built in this flavour; skipped\n"); return; }
  DeviceVector<float> in(32 * 64, 1.0f), out(64);
  // Contiguous: each warp's 32 floats are 4 sectors, every byte used.
  prof::Counters c = counted([&] { SKV_LAUNCH(strided_copy, 2, 32, 0, nullptr, in.data(), out.data(), 1); });
  CHECK(c.global_load_requests == 2 && c.global_load_sectors == 8 && c.global_load_bytes == 256);
  CHECK(c.global_store_requests == 2 && c.global_store_sectors == 8);
  CHECK(c.dram_read_bytes == 256 && c.dram_write_bytes == 256);
  // A 32-float stride: one sector per lane, 4 of its 32 bytes used.
  c = counted([&] { SKV_LAUNCH(strided_copy, 2, 32, 0, nullptr, in.data(), out.data(), 32); });
  CHECK(c.global_load_requests == 2 && c.global_load_sectors == 64 && c.global_load_bytes == 256);
  CHECK(c.dram_read_bytes == 64 * 32);
  // The same 32 floats read by two blocks: twice the sectors, once the DRAM bytes.
  c = counted([&] { SKV_LAUNCH(strided_copy, 2, 32, 0, nullptr, in.data(), out.data(), 0); });
  CHECK(c.global_load_sectors == 2 && c.dram_read_bytes == 32);
}

EMU_TEST(counters_shared_bank_conflicts) {
  if (!prof::available()) return;
  DeviceVector<float> out(32);
  const size_t smem = 32 * 33 * sizeof(float);
  // lane -> word lane: 32 banks once each. Stride 32: every lane in bank 0, 32 distinct words.
  // Stride 33 (padded): conflict-free again. Stride 0: one word broadcast.
  const int strides[4] = {1, 32, 33, 0};
  const uint64_t wavefronts[4] = {1, 32, 1, 1};
  for (int i = 0; i < 4; ++i) {
    const prof::Counters c =
        counted([&] { SKV_LAUNCH(shared_stride, 1, 32, smem, nullptr, out.data(), strides[i], 32 * 33); });
    CHECK(c.shared_store_requests == 1 && c.shared_load_requests == 1);
    CHECK(c.shared_load_wavefronts == wavefronts[i] && c.shared_load_ideal == 1);
    CHECK(c.shared_store_wavefronts == wavefronts[i]);
    CHECK(c.barriers == 1 && c.blocks == 1);
  }
}

EMU_TEST(counters_ldmatrix_swizzle) {
  if (!prof::available()) return;
  DeviceVector<uint32_t> out(32);
  // 64-byte rows: rows r and r + 2 start in the same 16-byte bank group, so each 8-row matrix needs 4 passes;
  // the swizzle spreads the 8 rows over the 8 groups. (The fill only stores: the loads are the ldmatrix alone.)
  prof::Counters plain = counted([&] { SKV_LAUNCH(ldmatrix_rows, 1, 32, 32 * 64, nullptr, out.data(), 0); });
  prof::Counters swizzled = counted([&] { SKV_LAUNCH(ldmatrix_rows, 1, 32, 32 * 64, nullptr, out.data(), 1); });
  CHECK(plain.shared_load_requests == 1 && plain.shared_load_ideal == 4);
  CHECK(plain.shared_load_wavefronts == 16);
  CHECK(swizzled.shared_load_wavefronts == 4);
}

EMU_TEST(counters_cp_async_and_mma) {
  if (!prof::available()) return;
  DeviceVector<uint4> in(32, uint4{0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u});
  DeviceVector<float> out(32);
  const prof::Counters c = counted([&] { SKV_LAUNCH(copy_and_multiply, 1, 32, 512, nullptr, in.data(), out.data()); });
  CHECK(c.global_load_requests == 1 && c.global_load_sectors == 16 && c.global_load_bytes == 512);
  CHECK(c.shared_store_requests == 1 && c.shared_store_wavefronts == 4 && c.shared_store_ideal == 4);
  CHECK(c.tensor_flops == 3u * 2 * 16 * 8 * 16);
  CHECK(out.v[0] == 48.0f);  // 16 products of ones, accumulated three times
}

EMU_TEST(counters_divergence_barriers_declared_flops) {
  if (!prof::available()) return;
  DeviceVector<float> in(64, 2.0f), out(64);
  CHECK(prof::start());
  skv::declare_simt_flops(1234.0);
  SKV_LAUNCH(divergent_load, 1, 64, 0, nullptr, in.data(), out.data(), 16);
  SKV_LAUNCH(divergent_load, 1, 64, 0, nullptr, in.data(), out.data(), 40);
  prof::stop();
  const std::vector<prof::Launch> l = prof::take();
  CHECK(l.size() == 2);
  if (l.size() != 2) return;
  CHECK(l[0].simt_flops == 1234.0 && l[1].simt_flops == 0.0);
  CHECK(l[0].kernel.find("divergent_load") != std::string::npos);
  // 16 lanes of warp 0: one request, 64 bytes, 2 sectors. 40 lanes: a full warp 0 and 8 lanes of warp 1.
  CHECK(l[0].counters.global_load_requests == 1 && l[0].counters.global_load_sectors == 2);
  CHECK(l[1].counters.global_load_requests == 2 && l[1].counters.global_load_sectors == 5);
  CHECK(l[0].counters.barriers == 2 && l[0].counters.global_store_requests == 2);
}

EMU_TEST(counters_sampled_grid_scales_to_the_whole) {
  if (!prof::available()) return;
  DeviceVector<float> in(32 * 64, 1.0f), out(32 * 64);
  CHECK(prof::start(8));
  SKV_LAUNCH(strided_copy, 64, 32, 0, nullptr, in.data(), out.data(), 1);
  SKV_LAUNCH(strided_copy, 4, 32, 0, nullptr, in.data(), out.data(), 1);  // under the sample size: all blocks
  prof::stop();
  const std::vector<prof::Launch> l = prof::take();
  CHECK(l.size() == 2);
  if (l.size() != 2) return;
  CHECK(l[0].blocks_run == 8 && l[0].counters.blocks == 64);
  CHECK(l[0].counters.global_load_requests == 64 && l[0].counters.global_load_sectors == 256);
  CHECK(l[0].counters.dram_read_bytes == 64 * 128);
  CHECK(l[1].blocks_run == 4 && l[1].counters.global_load_requests == 4);
  CHECK(out.v[32 * 63] == 1.0f);  // the last block is always in the sample
}

EMU_TEST(counters_one_thread_at_a_time) {
  if (!prof::available()) return;
  CHECK(prof::start());
  bool other = true;
  std::thread([&] { other = prof::start(); }).join();
  CHECK(!other);
  prof::stop();
  bool after = false;
  std::thread([&] { after = prof::start(); prof::stop(); }).join();
  CHECK(after);
  CHECK(prof::take().empty());
}

}  // namespace
