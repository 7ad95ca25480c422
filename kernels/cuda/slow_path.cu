// note_slow_path (ops.cuh): the last slow path an op of this thread took, for the backend's profile.
#include "ops.cuh"

namespace scalekv::cuda_ops {

thread_local const char* g_slow_op = nullptr;
thread_local const char* g_slow_reason = nullptr;

void note_slow_path(const char* op, const char* reason) {
  g_slow_op = op;
  g_slow_reason = reason;
}

}  // namespace scalekv::cuda_ops
