// The CPU backend's GEMM and convolution through oneDNN (Debian's libdnnl), when the build found it
// (SCALEKV_ONEDNN): its JIT kernels run the machine's widest FMA (AVX-512, AMX/bf16 where present) at a large
// fraction of peak, which a handwritten kernel here would have to re-derive per ISA. Primitives are created
// once per shape and kept in a small LRU cache (creation JITs code: milliseconds). Anything oneDNN does not
// take (f32 activations with bf16 weights, K = 0, bf16 convolutions) returns false and runs the builtin kernel.
#include "onednn.h"

#ifdef SCALEKV_ONEDNN
#include <omp.h>

#include <cstdlib>

#include <list>
#include <mutex>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <unordered_map>
#include <utility>
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
template <class Value>
class LruCache {
 public:
  template <class Make>
  Value& get(const std::string& key, Make make) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it != index_.end()) {
      order_.splice(order_.begin(), order_, it->second);
      return it->second->second;
    }
    order_.emplace_front(key, make());
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
  std::list<std::pair<std::string, Value>> order_;
  std::unordered_map<std::string, typename std::list<std::pair<std::string, Value>>::iterator> index_;
};

dnnl::primitive_attr epilogue_attr(Epilogue e) {
  dnnl::primitive_attr attr;
  dnnl::post_ops ops;
  if (e == Epilogue::gelu_tanh) ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_gelu_tanh, 0.0f, 0.0f);
  if (e == Epilogue::silu) ops.append_eltwise(1.0f, dnnl::algorithm::eltwise_swish, 1.0f, 0.0f);
  attr.set_post_ops(ops);
  // Each call brings its own scratchpad: engines on several threads may run one cached primitive at once.
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// `supported` false: oneDNN declined the case at creation (remembered, so the builtin runs without asking again).
struct Matmul {
  bool supported = true;
  dnnl::matmul prim;
  memory::desc src, weights, bias, dst, scratchpad;
};

struct Convolution {
  bool supported = true;
  dnnl::convolution_forward prim;
  memory::desc src, weights, bias, dst, scratchpad;  // the primitive's own (blocked) layouts
  memory::desc user_src, user_weights, user_dst;  // NCHW / OIHW as the tensors are stored
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
  // oneDNN 2.x has no f32 x bf16 matmul; and a product over K = 0 is just the bias (the builtin handles it).
  if (!enabled() || a.x_dtype != a.w_dtype || a.m <= 0 || a.n <= 0 || a.k <= 0) return false;
  static LruCache<Matmul> cache;
  const std::string key = std::to_string(a.m) + "x" + std::to_string(a.n) + "x" + std::to_string(a.k) + "/" +
                          std::to_string(int(a.x_dtype)) + std::to_string(int(a.y_dtype)) +
                          std::to_string(a.bias ? int(a.bias_dtype) : -1) + std::to_string(int(a.epilogue));
  Matmul& mm = cache.get(key, [&] {
    Matmul m;
    try {
      m.src = memory::desc({a.m, a.k}, to_dnnl(a.x_dtype), tag::ab);
      m.weights = memory::desc({a.k, a.n}, to_dnnl(a.w_dtype), tag::ba);  // w [N, K] row-major is K x N column-major
      m.dst = memory::desc({a.m, a.n}, to_dnnl(a.y_dtype), tag::ab);
      if (a.bias) m.bias = memory::desc({1, a.n}, to_dnnl(a.bias_dtype), tag::ab);
      const dnnl::matmul::desc d = a.bias ? dnnl::matmul::desc(m.src, m.weights, m.bias, m.dst) : dnnl::matmul::desc(m.src, m.weights, m.dst);
      const dnnl::matmul::primitive_desc pd(d, epilogue_attr(a.epilogue), cpu_engine());
      m.prim = dnnl::matmul(pd);
      m.scratchpad = pd.scratchpad_desc();
    } catch (const dnnl::error&) {
      m.supported = false;
    }
    return m;
  });
  if (!mm.supported) return false;
  use_threads(threads);
  run_checked("gemm", [&] {
    dnnl::engine& eng = cpu_engine();
    dnnl::stream s(eng);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(mm.src, eng, const_cast<void*>(a.x))},
        {DNNL_ARG_WEIGHTS, memory(mm.weights, eng, const_cast<void*>(a.w))},
        {DNNL_ARG_DST, memory(mm.dst, eng, a.y)},
        {DNNL_ARG_SCRATCHPAD, memory(mm.scratchpad, eng)}};
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
  Convolution& cv = cache.get(key, [&] {
    Convolution c;
    try {
      c.user_src = memory::desc(src_dims, dt::f32, tag::nchw);
      c.user_weights = memory::desc(w_dims, dt::f32, tag::oihw);
      c.user_dst = memory::desc(dst_dims, dt::f32, tag::nchw);
      // Layouts left to oneDNN: its blocked formats are where its kernels are fast; reorders convert at the edges.
      const memory::desc any_src(src_dims, dt::f32, tag::any), any_w(w_dims, dt::f32, tag::any), any_dst(dst_dims, dt::f32, tag::any);
      const memory::desc bias(memory::dims{a.out_channels}, dt::f32, tag::a);
      const memory::dims stride{1, 1}, pad{p, p};
      const auto d = a.bias ? dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
                                                              any_src, any_w, bias, any_dst, stride, pad, pad)
                            : dnnl::convolution_forward::desc(dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct,
                                                              any_src, any_w, any_dst, stride, pad, pad);
      const dnnl::convolution_forward::primitive_desc pd(d, epilogue_attr(Epilogue::none), cpu_engine());
      c.prim = dnnl::convolution_forward(pd);
      c.src = pd.src_desc();
      c.weights = pd.weights_desc();
      c.bias = bias;
      c.dst = pd.dst_desc();
      c.scratchpad = pd.scratchpad_desc();
    } catch (const dnnl::error&) {
      c.supported = false;
    }
    return c;
  });
  if (!cv.supported) return false;
  use_threads(threads);
  run_checked("conv2d", [&] {
    dnnl::engine& eng = cpu_engine();
    dnnl::stream s(eng);
    memory user_src(cv.user_src, eng, const_cast<void*>(a.x)), user_w(cv.user_weights, eng, const_cast<void*>(a.weight));
    memory user_dst(cv.user_dst, eng, a.out);
    // Weights are reordered on every call: a cache keyed by address could serve a freed tensor's successor.
    memory src = cv.src == cv.user_src ? user_src : memory(cv.src, eng);
    memory w = cv.weights == cv.user_weights ? user_w : memory(cv.weights, eng);
    memory dst = cv.dst == cv.user_dst ? user_dst : memory(cv.dst, eng);
    if (src != user_src) dnnl::reorder(user_src, src).execute(s, user_src, src);
    if (w != user_w) dnnl::reorder(user_w, w).execute(s, user_w, w);
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, memory(cv.scratchpad, eng)}};
    if (a.bias) args.emplace(DNNL_ARG_BIAS, memory(cv.bias, eng, const_cast<void*>(a.bias)));
    cv.prim.execute(s, args);
    if (dst != user_dst) dnnl::reorder(dst, user_dst).execute(s, dst, user_dst);
    s.wait();
  });
  return true;
}

#endif

}  // namespace scalekv::cpu::onednn
