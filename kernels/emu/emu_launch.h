// SKV_LAUNCH on the CPU: the arguments are converted to the kernel's parameter types once, then every
// simulated thread of every block calls the kernel with them.
#pragma once

#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emu_cuda_types.h"
#include "emu_host_api.h"

namespace skv_emu {

struct LaunchSpec {
  const char* kernel_name;  // the text of SKV_LAUNCH's first argument, for error messages
  const void* kernel_id;    // the kernel's address, the key of cudaFuncSetAttribute
  dim3 grid, block;
  size_t smem_bytes;
  cudaStream_t stream;
  void (*invoke)(const void* bound);  // calls the kernel with the bound arguments
  const void* bound;
};

// Runs every block to completion (blocks spread over stream->workers OS threads); aborts with the kernel,
// block and thread on any strictness violation.
void launch(const LaunchSpec& spec);

template <class... Params, class... Args>
void launch_kernel(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "SKV_LAUNCH: wrong number of kernel arguments");
  struct Bound {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> args;
  };
  const Bound bound{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  LaunchSpec spec{name, reinterpret_cast<const void*>(kernel), grid, block, smem_bytes, stream,
                  [](const void* p) {
                    const Bound* b = static_cast<const Bound*>(p);
                    std::apply(b->kernel, b->args);
                  },
                  &bound};
  launch(spec);
}

}  // namespace skv_emu

namespace skv {
// The FLOPs outside the tensor cores that the next launch from this thread performs, for the cost counters
// (emu_profile.h), which cannot count arithmetic; launchers of compute-bound SIMT kernels declare them.
void declare_simt_flops(double flops);
// The next launch from this thread writes what later kernels take as addresses (a list of rows, say): the cost
// counters run all of its blocks even when they sample the others' (a sampled producer would leave its consumers
// wild pointers).
void declare_every_block();
}  // namespace skv

#define SKV_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                                       \
  ::skv_emu::launch_kernel(#kernel, kernel, ::dim3(grid), ::dim3(block), static_cast<size_t>(smem_bytes), \
                           (stream), ##__VA_ARGS__)
