// note_slow_path (ops.cuh): the last slower-than-possible kernel choice of this host thread, for profiling and
// tests. Host code only; both pointers are string literals, so nothing is copied.
#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {
thread_local const char* slow_op = nullptr;
thread_local const char* slow_reason = nullptr;
}  // namespace

void note_slow_path(const char* op, const char* reason) {
  slow_op = op;
  slow_reason = reason;
}

}  // namespace scalekv::cuda_ops
