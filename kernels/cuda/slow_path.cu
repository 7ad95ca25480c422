// note_slow_path / take_slow_path_label (ops.cuh): the last slower-than-possible kernel choice of this host
// thread, for the backend's profile labels. Host code only.
#include <mutex>
#include <set>
#include <string>

#include "ops.cuh"

namespace scalekv::cuda_ops {
namespace {
thread_local const char* slow_op = nullptr;  // string literals: nothing is copied on the launch path
thread_local const char* slow_reason = nullptr;
}  // namespace

void note_slow_path(const char* op, const char* reason) {
  slow_op = op;
  slow_reason = reason;
}

SlowPath take_slow_path() {
  const SlowPath note{slow_op, slow_reason};
  slow_op = slow_reason = nullptr;
  return note;
}

const char* take_slow_path_label() {
  const SlowPath note = take_slow_path();
  if (!note.op) return nullptr;
  const std::string label = std::string(note.op) + ":simt (" + note.reason + ")";
  // Profile labels must outlive the profile: one copy of each distinct label for the life of the process.
  static std::mutex mutex;
  static std::set<std::string> labels;
  std::lock_guard<std::mutex> lock(mutex);
  return labels.insert(label).first->c_str();
}

}  // namespace scalekv::cuda_ops
