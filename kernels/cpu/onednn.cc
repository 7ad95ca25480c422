// The CPU backend's GEMM and convolution through oneDNN (Debian's libdnnl), when the build found it
// (SCALEKV_ONEDNN): its JIT kernels run the machine's widest FMA (AVX-512, AMX/bf16 where present) at a large
// fraction of peak, which a handwritten kernel here would have to re-derive per ISA. Primitives are created
// once per shape and kept in a small LRU cache (creation JITs code: milliseconds). f32 activations with bf16
// weights run as PyTorch's autocast does: x rounded to bf16, then the bf16 x bf16 product (oneDNN 2.x has no
// mixed matmul). Anything oneDNN does not take (K = 0, bf16 convolutions) returns false and runs the builtin kernel.
#include "onednn.h"

#ifdef SCALEKV_ONEDNN
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <unordered_map>
#include <utility>

#include "isa.h"
#endif

namespace scalekv::cpu::onednn {

#ifndef SCALEKV_ONEDNN

bool available() { return false; }
std::string version() { return ""; }
bool gemm(const GemmArgs&, int) { return false; }
bool conv2d(const Conv2dArgs&, int) { return false; }

#else

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine& cpu_engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

dt to_dnnl(DType d) { return d == DType::bf16 ? dt::bf16 : dt::f32; }

// Primitives by a key of their shape and types, the least recently used dropped past kCapacity (varlen T5
// batches and every scale's token count make new M values; a few hundred primitives would be megabytes of JIT code).
// Entries are shared: a caller keeps its entry alive while it runs even if another engine's thread evicts it.
template <class Value>
class LruCache {
 public:
  template <class Make>
  std::shared_ptr<const Value> get(const std::string& key, Make make) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      order_.splice(order_.begin(), order_, it->second);
      return it->second->second;
    }
    order_.emplace_front(key, std::make_shared<const Value>(make()));
    index_[key] = order_.begin();
    if (order_.size() > kCapacity) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
    return order_.front().second;
  }

 private:
  static constexpr size_t kCapacity = 96;
  std::mutex mu_;
  std::list<std::pair<std::string, std::shared_ptr<const Value>>> order_;
  std::unordered_map<std::string, typename std::list<std::pair<std::string, std::shared_ptr<const Value>>>::iterator> index_;
};

// A buffer kept by one thread across calls and grown as needed (never shrunk): the blocked copies, packed weights
// and scratchpads of the big shapes are tens of megabytes, and a fresh allocation per call paid its page faults on
// every call (two thirds of the VAE convolution at 128 x 512 x 512). Per thread, so engines on several threads
// never share one. Transparent huge pages where the kernel offers them: at 4 KiB pages the big convolutions ran
// 10-40 % slower (TLB misses over the blocked copies).
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() { std::free(data_); }

  void* get(size_t bytes) {
    if (bytes <= size_) return data_;
    std::free(data_);
    size_ = 0;
    const size_t align = bytes >= kHugePage ? kHugePage : 64;
    const size_t rounded = (bytes + align - 1) / align * align;
    data_ = std::aligned_alloc(align, rounded);
    if (!data_) throw BackendError(StatusCode::out_of_memory, "cpu (oneDNN): cannot allocate a " + std::to_string(bytes) + "-byte workspace");
#ifdef MADV_HUGEPAGE
    if (align == kHugePage) madvise(data_, rounded, MADV_HUGEPAGE);
#endif
    size_ = rounded;
    return data_;
  }

 private:
  static constexpr size_t kHugePage = size_t(2) << 20;
  void* data_ = nullptr;
  size_t size_ = 0;
};

// The calling thread's workspaces, one per role within a call (a call takes every one before it runs anything).
struct Workspaces {
  Workspace src, weights, dst, scratchpad;
};
Workspaces& thread_workspaces() {
  thread_local Workspaces w;
  return w;
}

memory in_workspace(const memory::desc& d, Workspace& w) { return memory(d, cpu_engine(), w.get(d.get_size())); }

dnnl::primitive_attr epilogue_attr(Epilogue e) {
  dnnl::primitive_attr attr;
  dnnl::post_ops ops;
  if (e == Epilogue::gelu_tanh) ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_gelu_tanh, 0.0f, 0.0f);
  if (e == Epilogue::silu) ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_swish, 1.0f, 0.0f);
  attr.set_post_ops(ops);
  // Scratchpads come from the calling thread's workspace: engines on several threads may run one cached primitive at once.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// A reorder from `from` to `to`, cached with the op that uses it (creation JITs too), its scratchpad the caller's.
struct Reorder {
  dnnl::reorder prim;
  memory::desc scratchpad;
  bool needed = false;

  Reorder() = default;
  Reorder(const memory::desc& from, const memory::desc& to) : needed(from != to) {
    if (!needed) return;
    const dnnl::reorder::primitive_desc pd(cpu_engine(), from, cpu_engine(), to, epilogue_attr(Epilogue::none));
    prim = dnnl::reorder(pd);
    scratchpad = pd.scratchpad_desc();
  }
  void run(dnnl::stream& s, const memory& from, const memory& to, void* scratch) const {
    prim.execute(s, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, memory(scratchpad, cpu_engine(), scratch)}});
  }
};

// `supported` false: oneDNN declined the case at creation (remembered, so the builtin runs without asking again).
struct Matmul {
  bool supported = true;
  dnnl::matmul prim;
  memory::desc src, weights, bias, dst, scratchpad;
  memory::desc user_weights;  // w [N, K] as stored
  Reorder pack_weights;
  size_t scratch_bytes = 0;  // the largest of the matmul's and the reorder's scratchpads (they run one after the other)
};

struct Convolution {
  bool supported = true;
  dnnl::convolution_forward prim;
  memory::desc src, weights, bias, dst, scratchpad;  // the primitive's own (blocked) layouts
  memory::desc user_src, user_weights, user_dst;  // NCHW / OIHW as the tensors are stored
  Reorder to_src, to_weights, from_dst;
  size_t scratch_bytes = 0;
};

// SCALEKV_ONEDNN=0 in the environment at load keeps the builtin kernels (comparisons, and a way around a bad library).
bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("SCALEKV_ONEDNN");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

// oneDNN's OpenMP team size is the calling thread's; the engine's queue thread runs every op.
void use_threads(int threads) {
  if (omp_get_max_threads() != threads) omp_set_num_threads(threads);
}

// oneDNN reports failures (out of memory for a scratchpad or a reorder) as dnnl::error: coded like the backend's own.
template <class Run>
void run_checked(const char* op, Run run) {
  try {
    run();
  } catch (const dnnl::error& e) {
    throw BackendError(e.status == dnnl_out_of_memory ? StatusCode::out_of_memory : StatusCode::internal,
                       std::string(op) + " (oneDNN): " + e.what());
  }
}

// oneDNN's reference implementations ("ref:any") are what it falls back to where no JIT kernel takes the case (bf16
// on a CPU without AVX-512, say): slower than the builtin kernels, so such a case is declined.
bool reference_impl(const dnnl::primitive_desc_base& pd) { return std::string(pd.impl_info_str()).rfind("ref", 0) == 0; }

// f32 -> bf16, round to nearest even (NaN stays a quiet NaN), as f32_to_bf16 in numeric.h and torch's autocast;
// branch-free so the compiler vectorises it at each ISA level (not vcvtneps2bf16: it flushes subnormals).
SKV_ALWAYS_INLINE void round_to_bf16_impl(const float* x, uint16_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    const uint32_t rounded = (bits & 0x7fffffffu) > 0x7f800000u ? bits | 0x00400000u : bits + 0x7fffu + ((bits >> 16) & 1u);
    y[i] = static_cast<uint16_t>(rounded >> 16);
  }
}
SKV_TARGET_AVX512 void round_to_bf16_avx512(const float* x, uint16_t* y, int64_t n) { round_to_bf16_impl(x, y, n); }
SKV_TARGET_AVX2 void round_to_bf16_avx2(const float* x, uint16_t* y, int64_t n) { round_to_bf16_impl(x, y, n); }
void round_to_bf16_generic(const float* x, uint16_t* y, int64_t n) { round_to_bf16_impl(x, y, n); }

void round_to_bf16(const float* x, uint16_t* y, int64_t n, int threads) {
  const auto round = for_isa(round_to_bf16_avx512, round_to_bf16_avx2, round_to_bf16_generic);
  constexpr int64_t kChunk = int64_t(1) << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) round(x + c * kChunk, y + c * kChunk, std::min(kChunk, n - c * kChunk));
}

}  // namespace

bool available() { return enabled(); }

std::string version() {
  const dnnl_version_t* v = dnnl_version();
  const char* isa = "";
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::avx512_core_amx: isa = "avx512_core_amx"; break;
    case dnnl::cpu_isa::avx512_core_bf16: isa = "avx512_core_bf16"; break;
    case dnnl::cpu_isa::avx512_core_vnni: isa = "avx512_core_vnni"; break;
    case dnnl::cpu_isa::avx512_core: isa = "avx512_core"; break;
    case dnnl::cpu_isa::avx2_vnni: isa = "avx2_vnni"; break;
    case dnnl::cpu_isa::avx2: isa = "avx2"; break;
    default: isa = "sse41/avx"; break;
  }
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch) + " (" + isa + ")";
}

bool gemm(const GemmArgs& a, int threads) {
  // f32 x with bf16 w: x is rounded to bf16 first (below). A product over K = 0 is just the bias (the builtin handles it).
  const bool round_x = a.x_dtype == DType::f32 && a.w_dtype == DType::bf16;
  if (!enabled() || (a.x_dtype != a.w_dtype && !round_x) || a.m <= 0 || a.n <= 0 || a.k <= 0) return false;
  static LruCache<Matmul> cache;
  const std::string key = std::to_string(a.m) + "x" + std::to_string(a.n) + "x" + std::to_string(a.k) + "/" +
                          std::to_string(int(a.w_dtype)) + std::to_string(int(a.y_dtype)) +
                          std::to_string(a.bias ? int(a.bias_dtype) : -1) + std::to_string(int(a.epilogue));
  const std::shared_ptr<const Matmul> entry = cache.get(key, [&] {
    Matmul m;
    try {
      const dt w_dt = to_dnnl(a.w_dtype);
      m.src = memory::desc({a.m, a.k}, w_dt, tag::ab);
      m.user_weights = memory::desc({a.k, a.n}, w_dt, tag::ba);  // w [N, K] row-major is K x N column-major
      m.dst = memory::desc({a.m, a.n}, to_dnnl(a.y_dtype), tag::ab);
      if (a.bias) m.bias = memory::desc({1, a.n}, to_dnnl(a.bias_dtype), tag::ab);
      // From a few thousand rows up, packing the weights into the kernel's blocked layout (a reorder per call: a
      // cache by address could serve a freed tensor's successor) beats the kernel's own copies of K x N
      // column-major panels, which it redoes per block of rows: 3-9 % at M = 4096. Below, the reorder costs more
      // than it saves (bf16 at M = 2048: -5 %, its pack into pairs of K is the slower one).
      const int64_t pack_rows = a.w_dtype == DType::bf16 ? 4096 : 1024;
      const memory::desc w = a.m >= pack_rows ? memory::desc({a.k, a.n}, w_dt, tag::any) : m.user_weights;
      const dnnl::matmul::desc d = a.bias ? dnnl::matmul::desc(m.src, w, m.bias, m.dst) : dnnl::matmul::desc(m.src, w, m.dst);
      const dnnl::matmul::primitive_desc pd(d, epilogue_attr(a.epilogue), cpu_engine());
      if (reference_impl(pd)) throw dnnl::error(dnnl_unimplemented, "reference implementation only");
      m.prim = dnnl::matmul(pd);
      m.weights = pd.weights_desc();
      m.scratchpad = pd.scratchpad_desc();
      m.pack_weights = Reorder(m.user_weights, m.weights);
      m.scratch_bytes = std::max(m.scratchpad.get_size(), m.pack_weights.scratchpad.get_size());
    } catch (const dnnl::error&) {
      m.supported = false;
    }
    return m;
  });
  const Matmul& mm = *entry;
  if (!mm.supported) return false;
  use_threads(threads);
  run_checked("gemm", [&] {
    dnnl::engine& eng = cpu_engine();
    dnnl::stream s(eng);
    Workspaces& ws = thread_workspaces();
    const memory user_w(mm.user_weights, eng, const_cast<void*>(a.w));
    const memory src = round_x ? in_workspace(mm.src, ws.src) : memory(mm.src, eng, const_cast<void*>(a.x));
    const memory w = mm.pack_weights.needed ? in_workspace(mm.weights, ws.weights) : user_w;
    void* scratch = ws.scratchpad.get(mm.scratch_bytes);
    if (round_x) round_to_bf16(static_cast<const float*>(a.x), static_cast<uint16_t*>(src.get_data_handle()), int64_t(a.m) * a.k, threads);
    if (mm.pack_weights.needed) mm.pack_weights.run(s, user_w, w, scratch);
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, memory(mm.dst, eng, a.y)},
                                         {DNNL_ARG_SCRATCHPAD, memory(mm.scratchpad, eng, scratch)}};
    if (a.bias) args.emplace(DNNL_ARG_BIAS, memory(mm.bias, eng, const_cast<void*>(a.bias)));
    mm.prim.execute(s, args);
    s.wait();
  });
  return true;
}

bool conv2d(const Conv2dArgs& a, int threads) {
  if (!enabled() || a.dtype != DType::f32 || a.weight_dtype != DType::f32 || a.batch <= 0 || a.out_channels <= 0) return false;
  static LruCache<Convolution> cache;
  const int p = (a.kernel - 1) / 2;
  const memory::dims src_dims{a.batch, a.in_channels, a.height, a.width};
  const memory::dims w_dims{a.out_channels, a.in_channels, a.kernel, a.kernel};
  const memory::dims dst_dims{a.batch, a.out_channels, a.height, a.width};
  const std::string key = std::to_string(a.batch) + "," + std::to_string(a.in_channels) + "," + std::to_string(a.out_channels) +
                          "," + std::to_string(a.height) + "," + std::to_string(a.width) + "," + std::to_string(a.kernel) +
                          (a.bias ? "b" : "");
  const std::shared_ptr<const Convolution> entry = cache.get(key, [&] {
    Convolution c;
    try {
      c.user_src = memory::desc(src_dims, dt::f32, tag::nchw);
      c.user_weights = memory::desc(w_dims, dt::f32, tag::oihw);
      c.user_dst = memory::desc(dst_dims, dt::f32, tag::nchw);
      // Layouts left to oneDNN: its blocked formats are where its kernels are fast; reorders convert at the edges.
      // (Forcing nChw16c, or plain NCHW with no reorders, was no faster at the VAE shapes and slower at some.)
      const memory::desc any_src(src_dims, dt::f32, tag::any), any_w(w_dims, dt::f32, tag::any), any_dst(dst_dims, dt::f32, tag::any);
      const memory::desc bias(memory::dims{a.out_channels}, dt::f32, tag::a);
      const memory::dims stride{1, 1}, pad{p, p};
      const auto d = a.bias ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
                                                              any_src, any_w, bias, any_dst, stride, pad, pad)
                            : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
                                                              any_src, any_w, any_dst, stride, pad, pad);
      const dnnl::convolution_forward::primitive_desc pd(d, epilogue_attr(Epilogue::none), cpu_engine());
      if (reference_impl(pd)) throw dnnl::error(dnnl_unimplemented, "reference implementation only");
      c.prim = dnnl::convolution_forward(pd);
      c.src = pd.src_desc();
      c.weights = pd.weights_desc();
      c.bias = bias;
      c.dst = pd.dst_desc();
      c.scratchpad = pd.scratchpad_desc();
      c.to_src = Reorder(c.user_src, c.src);
      c.to_weights = Reorder(c.user_weights, c.weights);
      c.from_dst = Reorder(c.dst, c.user_dst);
      c.scratch_bytes = std::max({c.scratchpad.get_size(), c.to_src.scratchpad.get_size(), c.to_weights.scratchpad.get_size(),
                                  c.from_dst.scratchpad.get_size()});
    } catch (const dnnl::error&) {
      c.supported = false;
    }
    return c;
  });
  const Convolution& cv = *entry;
  if (!cv.supported) return false;
  use_threads(threads);
  run_checked("conv2d", [&] {
    dnnl::engine& eng = cpu_engine();
    dnnl::stream s(eng);
    Workspaces& ws = thread_workspaces();
    const memory user_src(cv.user_src, eng, const_cast<void*>(a.x)), user_w(cv.user_weights, eng, const_cast<void*>(a.weight));
    const memory user_dst(cv.user_dst, eng, a.out);
    const memory src = cv.to_src.needed ? in_workspace(cv.src, ws.src) : user_src;
    const memory w = cv.to_weights.needed ? in_workspace(cv.weights, ws.weights) : user_w;
    const memory dst = cv.from_dst.needed ? in_workspace(cv.dst, ws.dst) : user_dst;
    void* scratch = ws.scratchpad.get(cv.scratch_bytes);
    if (cv.to_src.needed) cv.to_src.run(s, user_src, src, scratch);
    // Weights are reordered on every call (1-2 % of the call at the VAE shapes): a cache keyed by address could
    // serve a freed tensor's successor.
    if (cv.to_weights.needed) cv.to_weights.run(s, user_w, w, scratch);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, memory(cv.scratchpad, eng, scratch)}};
    if (a.bias) args.emplace(DNNL_ARG_BIAS, memory(cv.bias, eng, const_cast<void*>(a.bias)));
    cv.prim.execute(s, args);
    if (cv.from_dst.needed) cv.from_dst.run(s, dst, user_dst, scratch);
    s.wait();
  });
  return true;
}

#endif

}  // namespace scalekv::cpu::onednn
