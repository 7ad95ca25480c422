// The backend interface: every op with its shapes and dtypes. `cpu`, `cuda` and `emu` implement all of it.
// Kernels know nothing of N-API; the binding (csrc/) validates shapes and dtypes before calling in, so the
// checks here are the ones only the data can answer (index contents), reported through `Status`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace scalekv {

enum class DType : int32_t { f32 = 0, bf16 = 1, f16 = 2, i32 = 3, u8 = 4 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::f16: return 2;
    case DType::i32: return 4;
    case DType::u8: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i32: return "i32";
    case DType::u8: return "u8";
  }
  return "?";
}

// Errors that depend on tensor contents are detected where the data lives (on the device for cuda), so they
// surface at the next synchronisation. Codes are stable: they become the JS Error's `code`.
enum class StatusCode : int32_t {
  ok = 0,
  index_out_of_range = 1,  // ERR_INDEX_RANGE
  index_not_sorted = 2,    // ERR_INDEX_ORDER: keep indices must be strictly increasing per (row, head)
  budget_invalid = 3,      // ERR_BUDGET
  device = 4,              // ERR_DEVICE: runtime/driver failure
  out_of_memory = 5,       // ERR_OUT_OF_MEMORY
  internal = 6,            // ERR_INTERNAL
};

inline const char* status_code_name(StatusCode c) {
  switch (c) {
    case StatusCode::ok: return "OK";
    case StatusCode::index_out_of_range: return "ERR_INDEX_RANGE";
    case StatusCode::index_not_sorted: return "ERR_INDEX_ORDER";
    case StatusCode::budget_invalid: return "ERR_BUDGET";
    case StatusCode::device: return "ERR_DEVICE";
    case StatusCode::out_of_memory: return "ERR_OUT_OF_MEMORY";
    case StatusCode::internal: return "ERR_INTERNAL";
  }
  return "ERR_INTERNAL";
}

struct BackendError : std::runtime_error {
  StatusCode code;
  BackendError(StatusCode c, const std::string& msg) : std::runtime_error(msg), code(c) {}
};

// ---------------------------------------------------------------------------------------------------------
// attention: out[r,h,i,:] = softmax_j(scale * q[r,h,i,:] . key_j) . value_j over the keys
//   key_j, j <  n_hist : history row  hist[r,h, g(j), :]   with g(j) = gather ? gather[r,h,j] : j
//   key_j, j >= n_hist : current row  cur[r,h, j - n_hist, :]
// where n_hist = gather ? n_gather : hist_len. No mask. f32 accumulation; q/k/v/out share `dtype`.
// Optional window output: for each window query row w (an index into [0, lq)),
//   window_logits[r,h,w,j] = scale * q[r,h,window_rows[w],:] . key_j    (f32, j over all n_hist + lc keys)
//   window_lse[r,h,w]      = log sum_j exp(window_logits[r,h,w,j])      (so probabilities = exp(logit - lse))
// `out` may be null when only the window output is wanted.
struct AttentionArgs {
  int rows = 0, heads = 0, head_dim = 0;
  int lq = 0;
  int hist_cap = 0, hist_len = 0;
  int n_gather = 0;            // number of gathered history entries per (row, head); used when gather != null
  int lc = 0;
  DType dtype = DType::f32;    // f32 or bf16
  float scale = 1.0f;
  const void* q = nullptr;     // [rows, heads, lq, head_dim]
  const void* hist_k = nullptr;
  const void* hist_v = nullptr;   // [rows, heads, hist_cap, head_dim]
  const int32_t* gather = nullptr;  // [rows, heads, n_gather], values in [0, hist_len)
  const void* cur_k = nullptr;
  const void* cur_v = nullptr;    // [rows, heads, lc, head_dim]
  void* out = nullptr;            // [rows, heads, lq, head_dim]
  int n_window = 0;
  const int32_t* window_rows = nullptr;  // [n_window], values in [0, lq)
  float* window_logits = nullptr;        // [rows, heads, n_window, n_hist + lc]
  float* window_lse = nullptr;           // [rows, heads, n_window] (optional)

  int n_keys() const { return (gather ? n_gather : hist_len) + lc; }
};

// evictCompact: for every (r, h) independently, with the union U = [hist[r,h,0:hist_len) ‖ cur[r,h,0:lc)],
//   hist[r,h,i,:] <- U[keep[r,h,i]]  for i in [0, n_keep), for K and V, in place.
// keep must be strictly increasing per (r, h) and inside [0, hist_len + lc); n_keep <= hist_cap. Every list
// is validated before anything moves: on a bad list nothing changes and the op reports the status.
struct EvictCompactArgs {
  int rows = 0, heads = 0, head_dim = 0;
  int hist_cap = 0, hist_len = 0, lc = 0, n_keep = 0;
  DType dtype = DType::f32;    // f32 or bf16 (K and V share it)
  void* hist_k = nullptr;
  void* hist_v = nullptr;      // [rows, heads, hist_cap, head_dim]
  const void* cur_k = nullptr;
  const void* cur_v = nullptr; // [rows, heads, lc, head_dim]; may be null when lc == 0
  const int32_t* keep = nullptr;  // [rows, heads, n_keep]
};

enum class ScoreMode : int32_t { logits = 0, probs = 1 };
enum class Pooling : int32_t { none = 0, max = 1, avg = 2 };

// selection, per (r, h):
//   s[j] = sum_w (mode == logits ? L[r,h,w,j] : exp(L[r,h,w,j] - lse[r,h,w]))   (summed in window order)
//   s[window_keys[*]] = -inf      (in both modes, so pooling spreads the mask as the reference does)
//   s    = pool1d(s, kernel, stride 1, padding kernel/2; max pads with -inf, avg divides by kernel always)
//   s[window_keys[*]] = -inf
//   top  = the (budget - n_window) largest of s, ties to the lowest index (-inf entries are eligible)
//   out[r,h,:] = sort_ascending(top ++ window_keys)   (a concatenation: duplicates are kept, as the reference)
// pooled_scores (optional) receives s before the second masking, [rows, heads, n_keys].
struct SelectionArgs {
  int rows = 0, heads = 0, n_window = 0, n_keys = 0;
  int budget = 0;              // n_window <= budget <= n_keys
  ScoreMode mode = ScoreMode::logits;
  Pooling pooling = Pooling::max;
  int kernel = 1;              // odd, >= 1
  const float* logits = nullptr;      // [rows, heads, n_window, n_keys]
  const float* lse = nullptr;         // [rows, heads, n_window], required for probs
  const int32_t* window_keys = nullptr;  // [n_window], values in [0, n_keys)
  int32_t* out = nullptr;             // [rows, heads, budget]
  float* pooled_scores = nullptr;     // [rows, heads, n_keys] (optional)
};

// A device: memory, copies and the ops. Every call is ordered on the backend's single queue (the CUDA
// stream, or the calling worker thread on CPU); `synchronize` waits and reports the first pending error.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual std::string device_description() const = 0;

  virtual void* alloc(size_t bytes) = 0;   // throws BackendError(out_of_memory)
  virtual void free(void* ptr) = 0;
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;    // host -> device, ordered
  virtual void download(void* dst, const void* src, size_t bytes) = 0;  // device -> host, ordered, completes
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;      // device -> device, ordered
  virtual void fill_u8(void* dst, uint8_t value, size_t bytes) = 0;

  virtual void attention(const AttentionArgs& a) = 0;
  virtual void evict_compact(const EvictCompactArgs& a) = 0;
  virtual void selection(const SelectionArgs& a) = 0;

  // Waits for all queued work and throws the first error raised by it (then clears it).
  virtual void synchronize() = 0;

  // --- Model ops (Infinity). A backend overrides what it implements; the rest report themselves as
  // unavailable there rather than failing to build, so backends can gain ops one at a time.

 protected:
  [[noreturn]] void unavailable(const char* op) const {
    throw BackendError(StatusCode::internal, std::string(op) + " is not available on the " + name() + " backend");
  }
};

std::unique_ptr<Backend> make_cpu_backend(int threads);

// Defined only when built with CUDA (SCALEKV_WITH_CUDA). `cuda_probe` says why not when no device is usable.
bool cuda_probe(std::string* reason);
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace scalekv
