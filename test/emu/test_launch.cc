// Launch mechanics: 3-D grids and blocks over several workers, atomics across blocks, shared memory
// poisoned at every block start, the launch-configuration and shared-memory opt-in checks, __trap.
#include <cstdint>
#include <vector>

#include "selftest.h"

namespace {

__global__ void coordinates(uint32_t* out) {
  const unsigned bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  uint32_t* o = out + (bx * n + tx) * 6;
  o[0] = blockIdx.x; o[1] = blockIdx.y; o[2] = blockIdx.z;
  o[3] = threadIdx.x; o[4] = threadIdx.y; o[5] = threadIdx.z;
}

__global__ void atomics(int* counter, unsigned* max_seen, float* fsum, int* first) {
  const int id = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(counter, 1);
  atomicMax(max_seen, static_cast<unsigned>(id));
  atomicAdd(fsum, 0.5f);
  if (id == 77) atomicCAS(first, 0, 77);  // the status-word pattern: first code wins
  if (id == 99) atomicCAS(first, 0, 99);
}

// Reads its shared-memory slot before writing it: must see the poison in every block.
__global__ void read_then_write_smem(uint32_t* out) {
  SKV_DYNAMIC_SMEM(smem_raw);
  uint32_t* smem = reinterpret_cast<uint32_t*>(smem_raw);
  out[blockIdx.x * blockDim.x + threadIdx.x] = smem[threadIdx.x];
  smem[threadIdx.x] = 0;
}

__global__ void big_smem(uint8_t* out) {
  SKV_DYNAMIC_SMEM(smem);
  smem[threadIdx.x] = 1;
  out[threadIdx.x] = smem[threadIdx.x];
}

__global__ void traps(int* out) {
  if (threadIdx.x == 5) __trap();
  out[threadIdx.x] = 1;
}

template <int Scale, bool Negate>
__global__ void templated(int* out) {
  out[threadIdx.x] = (Negate ? -1 : 1) * Scale * static_cast<int>(threadIdx.x);
}

}  // namespace

EMU_TEST(grid_and_block_coordinates_on_several_workers) {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  std::vector<uint32_t> out(3 * 2 * 2 * 4 * 3 * 2 * 6, 0xffffffffu);
  skv_emu_stream stream;
  stream.workers = 3;
  SKV_LAUNCH(coordinates, grid, block, 0, &stream, out.data());
  size_t i = 0;
  for (unsigned bz = 0; bz < 2; ++bz)
    for (unsigned by = 0; by < 2; ++by)
      for (unsigned bx = 0; bx < 3; ++bx)
        for (unsigned tz = 0; tz < 2; ++tz)
          for (unsigned ty = 0; ty < 3; ++ty)
            for (unsigned tx = 0; tx < 4; ++tx, i += 6)
              CHECK(out[i] == bx && out[i + 1] == by && out[i + 2] == bz && out[i + 3] == tx && out[i + 4] == ty &&
                    out[i + 5] == tz);
}

EMU_TEST(atomics_across_blocks_and_workers) {
  int counter = 0, first = 0;
  unsigned max_seen = 0;
  float fsum = 0;
  skv_emu_stream stream;
  stream.workers = 4;
  SKV_LAUNCH(atomics, 64, 128, 0, &stream, &counter, &max_seen, &fsum, &first);
  CHECK(counter == 64 * 128);
  CHECK(max_seen == 64 * 128 - 1);
  CHECK(fsum == 0.5f * 64 * 128);
  CHECK(first == 77 || first == 99);
}

EMU_TEST(shared_memory_is_poisoned_at_every_block_start) {
  std::vector<uint32_t> out(8 * 64, 0);
  SKV_LAUNCH(read_then_write_smem, 8, 64, 64 * 4, nullptr, out.data());
  for (uint32_t v : out) CHECK(v == 0xffffffffu);
}

EMU_TEST(templated_kernel_in_parentheses) {
  std::vector<int> out(8);
  SKV_LAUNCH((templated<3, true>), 1, 8, 0, nullptr, out.data());
  for (int i = 0; i < 8; ++i) CHECK(out[static_cast<size_t>(i)] == -3 * i);
}

EMU_TEST(large_shared_memory_needs_opt_in) {
  std::vector<uint8_t> out(32);
  EXPECT_DEATH(SKV_LAUNCH(big_smem, 1, 32, 64 * 1024, nullptr, out.data()), "kernel 'big_smem'",
               "cudaFuncAttributeMaxDynamicSharedMemorySize");
  CHECK(cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024) ==
        cudaErrorInvalidValue);  // above sm_80's 163 KiB
  CHECK(cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess);
  SKV_LAUNCH(big_smem, 1, 32, 64 * 1024, nullptr, out.data());
  for (uint8_t v : out) CHECK(v == 1);
}

EMU_TEST(invalid_launch_configurations_abort) {
  std::vector<uint32_t> out(4096 * 6);
  EXPECT_DEATH(SKV_LAUNCH(coordinates, 1, 1025, 0, nullptr, out.data()), "more than 1024 threads");
  EXPECT_DEATH(SKV_LAUNCH(coordinates, dim3(1, 1, 1), dim3(32, 32, 2), 0, nullptr, out.data()),
               "more than 1024 threads");
  EXPECT_DEATH(SKV_LAUNCH(coordinates, 0, 32, 0, nullptr, out.data()), "zero grid or block dimension");
}

EMU_TEST(trap_names_kernel_and_thread) {
  std::vector<int> out(32);
  EXPECT_DEATH(SKV_LAUNCH(traps, 2, 32, 0, nullptr, out.data()), "kernel 'traps' block (", "thread (5,0,0)",
               "__trap() at");
}

EMU_TEST(device_intrinsic_outside_kernel_aborts) {
  EXPECT_DEATH((void)threadIdx.x, "outside a kernel");
}

EMU_TEST(host_api) {
  std::vector<uint8_t> buf(100, 0);
  CHECK(cudaMemsetAsync(buf.data(), 7, 50, nullptr) == cudaSuccess);
  CHECK(buf[49] == 7 && buf[50] == 0);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(cudaMemsetAsync(nullptr, 0, 4, nullptr) == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaSuccess);
}

namespace {
// Planted bug: unbounded recursion overflows the fiber's stack into its guard.
__device__ int deep(volatile char* sink, int n) {
  volatile char frame[512];
  frame[0] = static_cast<char>(n);
  *sink = frame[0];
  return n > 0 ? deep(sink, n - 1) + frame[0] : 0;
}
__global__ void stack_overflow(int* out) {
  char sink;
  out[threadIdx.x] = deep(&sink, 1 << 20);
}
__global__ void block_order(int* order, int* next) { order[atomicAdd(next, 1)] = static_cast<int>(blockIdx.x); }
}  // namespace

EMU_TEST(fiber_stack_overflow_names_the_thread) {
  std::vector<int> out(32);
  if (selftest::tsan_active())  // TSan's own report; it has no hook for the emulator's context line
    EXPECT_DEATH(SKV_LAUNCH(stack_overflow, 1, 32, 0, nullptr, out.data()), "stack-overflow", "deep");
  else
    EXPECT_DEATH(SKV_LAUNCH(stack_overflow, 1, 32, 0, nullptr, out.data()), "kernel 'stack_overflow' block (0,0,0)");
}

EMU_TEST(blocks_run_in_scrambled_order) {
  if (!selftest::random_schedule()) return;
  std::vector<int> order(64, -1);
  int next = 0;
  SKV_LAUNCH(block_order, 64, 1, 0, nullptr, order.data(), &next);
  int in_place = 0;
  std::vector<int> seen(64, 0);
  for (int i = 0; i < 64; ++i) {
    in_place += order[static_cast<size_t>(i)] == i;
    seen[static_cast<size_t>(order[static_cast<size_t>(i)])]++;
  }
  for (int s : seen) CHECK(s == 1);  // every block exactly once
  CHECK(in_place < 8);
}
