// N-API binding: tensors, the engine and one generic method per op of the op table (op_table.h), which
// checks every call synchronously, so bad input throws at the call with a coded Error; valid calls are
// enqueued on the engine's ordered queue. Completions (sync, read) come back to the JS thread through one
// thread-safe function per engine.
#include <napi.h>

#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "../kernels/backend.h"
#include "../kernels/cpu/fma_peak.h"
#include "../kernels/cpu/isa.h"
#include "../kernels/cpu/onednn.h"
#include "../kernels/cpu/numeric.h"
#include "engine_core.h"
#include "op_table.h"

#if defined(SCALEKV_WITH_EMU)
#include "../kernels/emu/emu_backend.h"
#endif

namespace scalekv {
namespace {

[[noreturn]] void throw_coded(Napi::Env env, const std::string& code, const std::string& message) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  throw err;
}

Napi::Error make_coded(Napi::Env env, const std::string& code, const std::string& message) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  return err;
}

std::optional<DType> parse_dtype(const std::string& s) {
  if (s == "f32") return DType::f32;
  if (s == "bf16") return DType::bf16;
  if (s == "f16") return DType::f16;
  if (s == "i32") return DType::i32;
  if (s == "u8") return DType::u8;
  return std::nullopt;
}

std::optional<Category> parse_category(const std::string& s) {
  if (s == "weights") return Category::weights;
  if (s == "kv") return Category::kv;
  if (s == "activations") return Category::activations;
  if (s == "scratch") return Category::scratch;
  return std::nullopt;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

class JsEngine;

// Marks the objects that wrap a JsTensor made by this addon: a cheaper test than instanceof, and one a
// look-alike object or another wrapped class cannot pass.
constexpr napi_type_tag kTensorTag = {0x7363616c656b7674ULL, 0x54656e736f720001ULL};

// A tensor's memory goes back to the engine when the last handle on it (the tensor or one of its views) is
// disposed or collected; queued ops hold the Buffer itself, so they never delay that (stream order).
struct Lease {
  explicit Lease(std::shared_ptr<Buffer> b) : buffer(std::move(b)) {}
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;
  ~Lease() { buffer->release(); }
  const std::shared_ptr<Buffer> buffer;
};

struct TensorState {
  std::shared_ptr<Buffer> buffer;
  DType dtype;
  std::vector<int64_t> shape;
  std::shared_ptr<Lease> lease;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

// The classes of one Node environment: the main thread and every worker thread that loads the addon get their own
// (napi instance data, freed with the environment), so an environment never constructs through another one's
// references, which die with it.
struct AddonClasses {
  Napi::FunctionReference engine, tensor;
};

Napi::Object new_tensor_object(Napi::Env env) { return env.GetInstanceData<AddonClasses>()->tensor.New({}); }

class JsTensor : public Napi::ObjectWrap<JsTensor> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit JsTensor(const Napi::CallbackInfo& info);

  std::shared_ptr<TensorState> state;  // null after dispose
  JsEngine* engine = nullptr;
  Napi::ObjectReference engine_ref;   // keeps the engine object alive while tensors exist

  const TensorState& live(Napi::Env env, const char* what) const {
    if (!state) throw_coded(env, "ERR_DISPOSED", std::string(what) + ": tensor was disposed");
    return *state;
  }

 private:
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value Read(const Napi::CallbackInfo& info);
  Napi::Value Write(const Napi::CallbackInfo& info);
  Napi::Value View(const Napi::CallbackInfo& info);
  Napi::Value GetShape(const Napi::CallbackInfo& info);
  Napi::Value GetDtype(const Napi::CallbackInfo& info);
  Napi::Value GetBytes(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
};

struct Completion {
  uint64_t id;
  std::optional<QueuedError> error;
  std::vector<uint8_t> data;
  bool has_data = false;
};

class JsEngine : public Napi::ObjectWrap<JsEngine> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit JsEngine(const Napi::CallbackInfo& info);
  ~JsEngine() override;

  std::shared_ptr<EngineCore> core;  // null after dispose
  std::string backend_name;

  EngineCore& live(Napi::Env env) {
    if (!core) throw_coded(env, "ERR_DISPOSED", "engine was disposed");
    return *core;
  }
  // A promise of the completion of `op` (sync, read): it settles after everything queued before it, with the
  // pending error or the `staging` bytes.
  Napi::Value NewPending(Napi::Env env, std::function<void()> op, std::shared_ptr<std::vector<uint8_t>> staging);
  [[noreturn]] void reject_tensor(Napi::Env env, Napi::Value v, const std::string& what);

 private:
  Napi::Value Tensor(const Napi::CallbackInfo& info);
  Napi::Value Sync(const Napi::CallbackInfo& info);
  Napi::Value Marker(const Napi::CallbackInfo& info);
  Napi::Value Memory(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value SetProfiling(const Napi::CallbackInfo& info);
  Napi::Value TrimCache(const Napi::CallbackInfo& info);
  Napi::Value SetMemoryLimit(const Napi::CallbackInfo& info);
  Napi::Value BeginMemoryPlan(const Napi::CallbackInfo& info);
  Napi::Value EndMemoryPlan(const Napi::CallbackInfo& info);
  Napi::Value Profile(const Napi::CallbackInfo& info);
  Napi::Value KernelCounters(const Napi::CallbackInfo& info);
  // Every op of the table (op_table.h): info.Data() is its declaration.
  Napi::Value RunOp(const Napi::CallbackInfo& info);
  Napi::Value Enqueued(const Napi::CallbackInfo& info);
  Napi::Value GetBackend(const Napi::CallbackInfo& info);
  Napi::Value GetDevice(const Napi::CallbackInfo& info);

  void ref_pending(Napi::Env env);
  void unref_pending(Napi::Env env);
  static void on_completion(Napi::Env env, Napi::Function, JsEngine* self, Completion* c);

  using Tsfn = Napi::TypedThreadSafeFunction<JsEngine, Completion, &JsEngine::on_completion>;
  // A promise that the Completion with its id settles: `enqueue` queues what delivers it through the
  // thread-safe function (false: the engine was shut down, and the call throws ERR_DISPOSED).
  Napi::Value Track(Napi::Env env, const std::function<bool(EngineCore&, Tsfn, uint64_t)>& enqueue);
  static void deliver(Tsfn& tsfn, Completion* completion) {
    if (tsfn.BlockingCall(completion) != napi_ok) delete completion;
  }
  Tsfn tsfn_;
  bool tsfn_live_ = false;
  uint64_t next_id_ = 1;
  int pending_ = 0;
  std::unordered_map<uint64_t, Napi::Promise::Deferred> deferreds_;
  std::string device_;

  void shutdown();
};

// ------------------------------------------------------------------------------------------------ Engine

Napi::Function JsEngine::Init(Napi::Env env) {
  std::vector<PropertyDescriptor> members = {
      InstanceMethod("tensor", &JsEngine::Tensor),
      InstanceMethod("sync", &JsEngine::Sync),
      InstanceMethod("marker", &JsEngine::Marker),
      InstanceMethod("memory", &JsEngine::Memory),
      InstanceMethod("dispose", &JsEngine::Dispose),
      InstanceMethod("setProfiling", &JsEngine::SetProfiling),
      InstanceMethod("trimCache", &JsEngine::TrimCache),
      InstanceMethod("setMemoryLimit", &JsEngine::SetMemoryLimit),
      InstanceMethod("beginMemoryPlan", &JsEngine::BeginMemoryPlan),
      InstanceMethod("endMemoryPlan", &JsEngine::EndMemoryPlan),
      InstanceMethod("profile", &JsEngine::Profile),
      InstanceMethod("kernelCounters", &JsEngine::KernelCounters),
      InstanceMethod("enqueued", &JsEngine::Enqueued),
      InstanceAccessor("backend", &JsEngine::GetBackend, nullptr),
      InstanceAccessor("device", &JsEngine::GetDevice, nullptr),
  };
  for (const OpDecl& op : op_table())
    members.push_back(InstanceMethod(op.name, &JsEngine::RunOp, napi_default, const_cast<OpDecl*>(&op)));
  return DefineClass(env, "NativeEngine", members);
}

// new NativeEngine(backend: 'cpu' | 'cuda' | 'emu', threads: number, memoryLimit?: number)
JsEngine::JsEngine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsEngine>(info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber())
    throw_coded(env, "ERR_INVALID_ARG", "NativeEngine(backend: string, threads: number)");
  backend_name = info[0].As<Napi::String>().Utf8Value();
  const int threads = info[1].As<Napi::Number>().Int32Value();
  std::unique_ptr<Backend> backend;
  try {
    if (backend_name == "cpu") {
      backend = make_cpu_backend(threads);
    } else if (backend_name == "cuda") {
#if defined(SCALEKV_WITH_CUDA)
      std::string reason;
      if (!cuda_probe(&reason)) throw_coded(env, "ERR_BACKEND_UNAVAILABLE", "cuda backend unavailable: " + reason);
      backend = make_cuda_backend(0);
#else
      throw_coded(env, "ERR_BACKEND_UNAVAILABLE", "cuda backend unavailable: this addon was built without CUDA");
#endif
    } else if (backend_name == "emu") {
#if defined(SCALEKV_WITH_EMU)
      backend = make_emu_backend(threads);
#else
      throw_coded(env, "ERR_BACKEND_UNAVAILABLE",
                  "emu backend unavailable: this addon was built without the SIMT emulator (SCALEKV_EMU=ON)");
#endif
    } else {
      throw_coded(env, "ERR_INVALID_ARG", "unknown backend '" + backend_name + "' (cpu, cuda, emu)");
    }
  } catch (const BackendError& e) {
    throw_coded(env, status_code_name(e.code), e.what());
  }
  device_ = backend->device_description();
  core = EngineCore::create(std::move(backend));
  if (info.Length() > 2 && info[2].IsNumber()) core->set_memory_limit(int64_t(info[2].As<Napi::Number>().DoubleValue()));
  tsfn_ = Tsfn::New(env, "scalekv-completions", 0, 1, this);
  tsfn_.Unref(env);
  tsfn_live_ = true;
}

JsEngine::~JsEngine() { shutdown(); }

void JsEngine::shutdown() {
  if (core) {
    core->shutdown();
    core.reset();
  }
}

void JsEngine::ref_pending(Napi::Env env) {
  if (pending_++ == 0) tsfn_.Ref(env);
}
void JsEngine::unref_pending(Napi::Env env) {
  if (--pending_ == 0) tsfn_.Unref(env);
}

void JsEngine::on_completion(Napi::Env env, Napi::Function, JsEngine* self, Completion* c) {
  std::unique_ptr<Completion> owned(c);
  if (env == nullptr || self == nullptr) return;  // environment is being torn down
  auto it = self->deferreds_.find(c->id);
  if (it == self->deferreds_.end()) return;
  Napi::Promise::Deferred deferred = it->second;
  self->deferreds_.erase(it);
  self->unref_pending(env);
  Napi::HandleScope scope(env);
  if (c->error) {
    deferred.Reject(make_coded(env, c->error->code, c->error->message).Value());
  } else if (c->has_data) {
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, c->data.size());
    if (!c->data.empty()) std::memcpy(ab.Data(), c->data.data(), c->data.size());
    deferred.Resolve(ab);
  } else {
    deferred.Resolve(env.Undefined());
  }
}

Napi::Value JsEngine::Track(Napi::Env env, const std::function<bool(EngineCore&, Tsfn, uint64_t)>& enqueue) {
  EngineCore& c = live(env);
  const uint64_t id = next_id_++;
  Napi::Promise::Deferred deferred = Napi::Promise::Deferred::New(env);
  deferreds_.emplace(id, deferred);
  ref_pending(env);
  if (!enqueue(c, tsfn_, id)) {
    deferreds_.erase(id);
    unref_pending(env);
    throw_coded(env, "ERR_DISPOSED", "engine was disposed");
  }
  return deferred.Promise();
}

Napi::Value JsEngine::NewPending(Napi::Env env, std::function<void()> op, std::shared_ptr<std::vector<uint8_t>> staging) {
  return Track(env, [&](EngineCore& c, Tsfn tsfn, uint64_t id) {
    return c.enqueue_completion(std::move(op), [tsfn, id, staging](std::optional<QueuedError> err) mutable {
      auto* completion = new Completion{id, std::move(err), {}, false};
      if (staging && !completion->error) {
        completion->data = std::move(*staging);
        completion->has_data = true;
      }
      deliver(tsfn, completion);
    });
  });
}

Napi::Value JsEngine::Sync(const Napi::CallbackInfo& info) { return NewPending(info.Env(), nullptr, nullptr); }

// marker(): resolves once the device has finished everything queued before it, without a synchronisation
// (EngineCore::enqueue_marker); errors stay pending for the next sync or read.
Napi::Value JsEngine::Marker(const Napi::CallbackInfo& info) {
  return Track(info.Env(), [](EngineCore& c, Tsfn tsfn, uint64_t id) {
    return c.enqueue_marker([tsfn, id]() mutable { deliver(tsfn, new Completion{id, std::nullopt, {}, false}); });
  });
}

Napi::Value JsEngine::Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  MemoryCounters m = live(env).memory();
  Napi::Object out = Napi::Object::New(env);
  Napi::Object in_use = Napi::Object::New(env), peak = Napi::Object::New(env);
  for (int c = 0; c < kCategories; ++c) {
    in_use.Set(category_name(Category(c)), Napi::Number::New(env, double(m.in_use[c])));
    peak.Set(category_name(Category(c)), Napi::Number::New(env, double(m.peak[c])));
  }
  out.Set("inUse", in_use);
  out.Set("peak", peak);
  out.Set("totalInUse", Napi::Number::New(env, double(m.total_in_use)));
  out.Set("totalPeak", Napi::Number::New(env, double(m.total_peak)));
  out.Set("reserved", Napi::Number::New(env, double(m.reserved)));
  out.Set("reservedPeak", Napi::Number::New(env, double(m.reserved_peak)));
  return out;
}

Napi::Value JsEngine::Dispose(const Napi::CallbackInfo& info) {
  shutdown();
  if (tsfn_live_ && pending_ == 0) {
    // Pending completions still need the function; it is released with the engine object otherwise.
    tsfn_.Release();
    tsfn_live_ = false;
  }
  return info.Env().Undefined();
}

// setMemoryLimit(bytes): caps the bytes the backend holds (0: none), EngineCore::set_memory_limit.
Napi::Value JsEngine::SetMemoryLimit(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw_coded(env, "ERR_INVALID_ARG", "setMemoryLimit(bytes: number)");
  live(env).set_memory_limit(int64_t(info[0].As<Napi::Number>().DoubleValue()));
  return env.Undefined();
}

// trimCache(): frees the cached blocks of released tensors (in queue order).
Napi::Value JsEngine::TrimCache(const Napi::CallbackInfo& info) {
  live(info.Env()).trim_cache();
  return info.Env().Undefined();
}

// beginMemoryPlan(sizes: number[], offsets: number[], total: number): allocates the plan's arena and places the
// allocations that follow (EngineCore::begin_plan). lib/memory-plan.ts computes the plan.
Napi::Value JsEngine::BeginMemoryPlan(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto integers = [&](const Napi::Value& v, const char* what) {
    if (!v.IsArray()) throw_coded(env, "ERR_INVALID_ARG", std::string("beginMemoryPlan: ") + what + " must be an array of integers");
    Napi::Array a = v.As<Napi::Array>();
    std::vector<int64_t> out(a.Length());
    for (uint32_t i = 0; i < a.Length(); ++i) {
      Napi::Value x = a[i];
      const double d = x.IsNumber() ? x.As<Napi::Number>().DoubleValue() : -1;
      if (!(d >= 0 && d <= 9007199254740991.0) || d != double(int64_t(d)))
        throw_coded(env, "ERR_INVALID_ARG", std::string("beginMemoryPlan: ") + what + " must hold non-negative integers");
      out[i] = int64_t(d);
    }
    return out;
  };
  MemoryPlanSpec plan;
  plan.sizes = integers(info[0], "sizes");
  plan.offsets = integers(info[1], "offsets");
  if (plan.sizes.size() != plan.offsets.size()) throw_coded(env, "ERR_INVALID_ARG", "beginMemoryPlan: one offset per size");
  const double total = info[2].IsNumber() ? info[2].As<Napi::Number>().DoubleValue() : -1;
  if (!(total > 0 && total <= 9007199254740991.0)) throw_coded(env, "ERR_INVALID_ARG", "beginMemoryPlan: total must be a positive byte count");
  plan.total = int64_t(total);
  for (size_t i = 0; i < plan.sizes.size(); ++i)
    if (plan.sizes[i] == 0 || plan.offsets[i] % 512 != 0 || plan.offsets[i] + plan.sizes[i] > plan.total)
      throw_coded(env, "ERR_INVALID_ARG", "beginMemoryPlan: allocation " + std::to_string(i) +
                                               " must be non-empty, 512-byte aligned and inside the arena");
  try {
    live(env).begin_plan(std::move(plan));
  } catch (const BackendError& e) {
    throw_coded(env, status_code_name(e.code), e.what());
  }
  return env.Undefined();
}

// endMemoryPlan(): { placed, diverged } of the plan being placed (zeros when none).
Napi::Value JsEngine::EndMemoryPlan(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const MemoryPlanReport r = live(env).end_plan();
  Napi::Object out = Napi::Object::New(env);
  out.Set("placed", Napi::Number::New(env, double(r.placed)));
  out.Set("diverged", Napi::Boolean::New(env, r.diverged));
  return out;
}

// setProfiling(on: boolean, kernelCounters?: boolean, sampleBlocks?: number): turning it on clears the previous
// profile.
Napi::Value JsEngine::SetProfiling(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const bool sample_ok = info.Length() < 3 || (info[2].IsNumber() && info[2].As<Napi::Number>().DoubleValue() >= 0 &&
                                              info[2].As<Napi::Number>().DoubleValue() <= 1e9);
  if (info.Length() < 1 || !info[0].IsBoolean() || (info.Length() > 1 && !info[1].IsBoolean()) || !sample_ok)
    throw_coded(env, "ERR_INVALID_ARG", "setProfiling(on: boolean, kernelCounters?: boolean, sampleBlocks?: number)");
  const uint64_t sample = info.Length() > 2 ? static_cast<uint64_t>(info[2].As<Napi::Number>().DoubleValue()) : 0;
  live(env).set_profiling(info[0].As<Napi::Boolean>().Value(), info.Length() > 1 && info[1].As<Napi::Boolean>().Value(),
                          sample);
  return env.Undefined();
}

// kernelCounters(): [{ op, kernel, grid, block, smemBytes, simtFlops, counters: { name: count } }] of the kernel
// launches recorded since the last call (await sync() first).
Napi::Value JsEngine::KernelCounters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto records = live(env).take_kernel_records();
  Napi::Array out = Napi::Array::New(env, records.size());
  const auto dims = [&](const unsigned (&d)[3]) {
    Napi::Array a = Napi::Array::New(env, 3);
    for (uint32_t i = 0; i < 3; ++i) a.Set(i, Napi::Number::New(env, d[i]));
    return a;
  };
  for (uint32_t i = 0; i < records.size(); ++i) {
    const auto& r = records[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("op", r.op);
    o.Set("kernel", r.launch.kernel);
    o.Set("grid", dims(r.launch.grid));
    o.Set("block", dims(r.launch.block));
    o.Set("smemBytes", Napi::Number::New(env, double(r.launch.smem_bytes)));
    o.Set("simtFlops", Napi::Number::New(env, r.launch.simt_flops));
    o.Set("blocksRun", Napi::Number::New(env, double(r.launch.blocks_run)));
    Napi::Object c = Napi::Object::New(env);
    for (const auto& [name, value] : r.launch.counters) c.Set(name, Napi::Number::New(env, value));
    o.Set("counters", c);
    out.Set(i, o);
  }
  return out;
}

// profile(): { [op]: { count, ms } } of the ops finished so far (await sync() first for a complete one).
Napi::Value JsEngine::Profile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
  for (const auto& [name, p] : live(env).profile()) {
    Napi::Object entry = Napi::Object::New(env);
    entry.Set("count", Napi::Number::New(env, double(p.count)));
    entry.Set("ms", Napi::Number::New(env, p.ms));
    out.Set(name, entry);
  }
  return out;
}

Napi::Value JsEngine::GetBackend(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), backend_name); }
Napi::Value JsEngine::GetDevice(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), device_); }

// The coded error for an argument that is not a live tensor of this engine (the check itself is in RunOp).
void JsEngine::reject_tensor(Napi::Env env, Napi::Value v, const std::string& what) {
  if (!v.IsObject() || !v.As<Napi::Object>().CheckTypeTag(&kTensorTag))
    throw_coded(env, "ERR_INVALID_ARG", what + " must be a Tensor");
  JsTensor::Unwrap(v.As<Napi::Object>())->live(env, what.c_str());
  throw_coded(env, "ERR_INVALID_ARG", what + " belongs to another engine");
}

size_t copy_typed_array(Napi::Env env, Napi::Value v, DType dtype, int64_t numel, std::vector<uint8_t>& out) {
  if (!v.IsTypedArray()) throw_coded(env, "ERR_INVALID_ARG", "tensor data must be a TypedArray");
  Napi::TypedArray ta = v.As<Napi::TypedArray>();
  if (int64_t(ta.ElementLength()) != numel)
    throw_coded(env, "ERR_SHAPE", "tensor data has " + std::to_string(ta.ElementLength()) +
                                      " elements but the shape needs " + std::to_string(numel));
  const napi_typedarray_type t = ta.TypedArrayType();
  const uint8_t* src = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
  const size_t bytes = size_t(numel) * dtype_size(dtype);
  out.resize(bytes);
  auto mismatch = [&]() {
    throw_coded(env, "ERR_DTYPE", std::string("a ") + dtype_name(dtype) +
                                      " tensor takes a Float32Array" +
                                      (dtype == DType::bf16 || dtype == DType::f16 ? " or Uint16Array (raw bits)" : "") +
                                      ", not this TypedArray");
  };
  // An empty TypedArray may have no data pointer, and memcpy's arguments must never be null, even for 0 bytes.
  const auto copy = [&] {
    if (bytes) std::memcpy(out.data(), src, bytes);
  };
  switch (dtype) {
    case DType::f32:
      if (t != napi_float32_array) mismatch();
      copy();
      break;
    case DType::bf16:
    case DType::f16:
      if (t == napi_uint16_array) {
        copy();
      } else if (t == napi_float32_array) {
        const float* f = reinterpret_cast<const float*>(src);
        uint16_t* o = reinterpret_cast<uint16_t*>(out.data());
        for (int64_t i = 0; i < numel; ++i) o[i] = dtype == DType::bf16 ? cpu::f32_to_bf16(f[i]) : cpu::f32_to_f16(f[i]);
      } else {
        mismatch();
      }
      break;
    case DType::i32:
      if (t != napi_int32_array) throw_coded(env, "ERR_DTYPE", "an i32 tensor takes an Int32Array");
      copy();
      break;
    case DType::u8:
      if (t != napi_uint8_array && t != napi_uint8_clamped_array)
        throw_coded(env, "ERR_DTYPE", "a u8 tensor takes a Uint8Array");
      copy();
      break;
  }
  return bytes;
}

std::vector<int64_t> parse_shape(Napi::Env env, Napi::Array js_shape) {
  std::vector<int64_t> shape;
  int64_t numel = 1;
  for (uint32_t i = 0; i < js_shape.Length(); ++i) {
    Napi::Value d = js_shape.Get(i);
    if (!d.IsNumber()) throw_coded(env, "ERR_SHAPE", "shape entries must be integers");
    const double x = d.As<Napi::Number>().DoubleValue();
    if (!(x >= 0) || x != double(int64_t(x)) || x > double(1LL << 40))
      throw_coded(env, "ERR_SHAPE", "shape entries must be non-negative integers, got " + std::to_string(x));
    shape.push_back(int64_t(x));
    numel *= int64_t(x);
    if (numel > (1LL << 40)) throw_coded(env, "ERR_SHAPE", "tensor too large");
  }
  return shape;
}

// tensor(dtype, shape: number[], data?: TypedArray, category?: string, fillByte?: number)
Napi::Value JsEngine::Tensor(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsArray())
    throw_coded(env, "ERR_INVALID_ARG", "tensor(dtype, shape, data?, category?)");
  auto dtype = parse_dtype(info[0].As<Napi::String>().Utf8Value());
  if (!dtype) throw_coded(env, "ERR_DTYPE", "unknown dtype '" + info[0].As<Napi::String>().Utf8Value() + "' (f32, bf16, f16, i32, u8)");
  const std::vector<int64_t> shape = parse_shape(env, info[1].As<Napi::Array>());
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  Category category = Category::activations;
  if (info.Length() > 3 && !info[3].IsUndefined()) {
    auto cat = parse_category(info[3].ToString().Utf8Value());
    if (!cat) throw_coded(env, "ERR_INVALID_ARG", "unknown memory category (weights, kv, activations, scratch)");
    category = *cat;
  }
  auto host = std::make_shared<std::vector<uint8_t>>();
  const bool has_data = info.Length() > 2 && !info[2].IsUndefined() && !info[2].IsNull();
  if (has_data) copy_typed_array(env, info[2], *dtype, numel, *host);
  const size_t bytes = size_t(numel) * dtype_size(*dtype);
  std::shared_ptr<Buffer> buffer;
  try {
    buffer = c.allocate(bytes, category);
  } catch (const BackendError& e) {
    throw_coded(env, status_code_name(e.code), e.what());
  }
  Backend* backend = &c.backend();
  if (has_data) {
    c.enqueue([backend, buffer, host] { backend->upload(buffer->data(), host->data(), host->size()); }, "upload");
  } else if (info.Length() > 4 && info[4].IsNumber()) {
    const uint8_t byte = uint8_t(info[4].As<Napi::Number>().Uint32Value());
    c.enqueue([backend, buffer, bytes, byte] { backend->fill_u8(buffer->data(), byte, bytes); }, "fill");
  }
  Napi::Object obj = new_tensor_object(env);
  obj.TypeTag(&kTensorTag);
  JsTensor* t = JsTensor::Unwrap(obj);
  t->state = std::make_shared<TensorState>(TensorState{buffer, *dtype, shape, std::make_shared<Lease>(buffer)});
  t->engine = this;
  t->engine_ref = Napi::Persistent(Value());
  return obj;
}

// ------------------------------------------------------------------------------------------------ ops

// The one binding of every op: JS values become OpInputs in declaration order, the op table checks them and
// builds the backend call, which is enqueued holding every operand's buffer. A rejected call enqueues nothing.
Napi::Value JsEngine::RunOp(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const OpDecl& op = *static_cast<const OpDecl*>(info.Data());
  live(env);
  if (info.Length() < 1 || !info[0].IsObject()) throw_coded(env, "ERR_INVALID_ARG", std::string(op.name) + "(args: object)");
  Napi::Object o = info[0].As<Napi::Object>();
  // Reading an argument can run JS (a getter, a Proxy), which may call another op or dispose a tensor. So every
  // JS value is read before any tensor is looked at, and each nesting level has its own inputs, reused between
  // calls so that reading arguments allocates nothing once warm.
  thread_local std::vector<std::unique_ptr<OpInputs>> scratch;
  thread_local size_t depth = 0;
  if (scratch.size() <= depth) scratch.push_back(std::make_unique<OpInputs>());
  OpInputs& in = *scratch[depth];
  struct Nesting {
    size_t& depth;
    ~Nesting() { --depth; }
  } nesting{++depth};
  std::array<napi_value, 32> operands;
  if (op.operands.size() > operands.size()) throw_coded(env, "ERR_INTERNAL", std::string(op.name) + ": too many operands");
  for (size_t i = 0; i < op.operands.size(); ++i) operands[i] = o.Get(op.operands[i].name);
  std::array<napi_value, OpCall::kMaxAttrs> attrs;
  for (size_t i = 0; i < op.attrs.size(); ++i) attrs[i] = o.Get(op.attrs[i].name);
  in.attrs.resize(op.attrs.size());
  for (size_t i = 0; i < op.attrs.size(); ++i) {
    const Napi::Value v(env, attrs[i]);
    AttrValue& a = in.attrs[i];
    a.kind = AttrValue::absent;
    a.items.clear();
    // One typeof per value: each Is*() test is a call into the engine.
    switch (v.Type()) {
      case napi_undefined:
      case napi_null:
        break;
      case napi_number:
        a.kind = AttrValue::number;
        a.num = v.As<Napi::Number>().DoubleValue();
        break;
      case napi_boolean:
        a.kind = AttrValue::boolean;
        a.flag = v.As<Napi::Boolean>().Value();
        break;
      case napi_string:
        a.kind = AttrValue::text;
        a.str = v.As<Napi::String>().Utf8Value();
        break;
      default:
        if (v.IsArray()) {
          a.kind = AttrValue::list;
          const Napi::Array list = v.As<Napi::Array>();
          for (uint32_t k = 0; k < list.Length(); ++k) {
            const Napi::Value x = list.Get(k);
            a.items.push_back(x.IsNumber() ? x.As<Napi::Number>().DoubleValue() : std::nan(""));
          }
        } else {
          a.kind = AttrValue::other;
        }
    }
  }
  // From here on no JS runs until the op is enqueued. The states are held for the call, so a shape the checker
  // reads stays alive; the queued op holds only the buffers (a disposal still counts at once).
  in.operands.assign(op.operands.size(), TensorRef{});
  std::array<std::shared_ptr<TensorState>, 32> states;
  std::vector<std::shared_ptr<Buffer>> hold;
  hold.reserve(op.operands.size());
  for (size_t i = 0; i < op.operands.size(); ++i) {
    const Napi::Value v(env, operands[i]);
    const napi_valuetype type = v.Type();
    if (type == napi_undefined || type == napi_null) continue;
    JsTensor* t = type == napi_object && v.As<Napi::Object>().CheckTypeTag(&kTensorTag) ? JsTensor::Unwrap(v.As<Napi::Object>()) : nullptr;
    if (!t || !t->state || t->engine != this) reject_tensor(env, v, std::string(op.name) + ": " + op.operands[i].name);
    states[i] = t->state;
    in.operands[i] = TensorRef{true, t->state->dtype, &t->state->shape, t->state->buffer.get(), t->state->buffer->data()};
    hold.push_back(t->state->buffer);
  }
  Launch launch;
  try {
    launch = check_and_bind(op, in);
  } catch (const OpError& e) {
    throw_coded(env, e.code, e.what());
  } catch (const std::exception& e) {
    throw_coded(env, "ERR_INTERNAL", std::string(op.name) + ": " + e.what());
  }
  if (!live(env).enqueue(std::move(launch), std::move(hold), op.kernel)) throw_coded(env, "ERR_DISPOSED", "engine was disposed");
  return env.Undefined();
}

Napi::Value JsEngine::Enqueued(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), double(live(info.Env()).enqueued()));
}

// ------------------------------------------------------------------------------------------------ Tensor

Napi::Function JsTensor::Init(Napi::Env env) {
  Napi::Function f = DefineClass(env, "NativeTensor",
                                 {
                                     InstanceMethod("dispose", &JsTensor::Dispose),
                                     InstanceMethod("read", &JsTensor::Read),
                                     InstanceMethod("write", &JsTensor::Write),
                                     InstanceMethod("view", &JsTensor::View),
                                     InstanceAccessor("shape", &JsTensor::GetShape, nullptr),
                                     InstanceAccessor("dtype", &JsTensor::GetDtype, nullptr),
                                     InstanceAccessor("bytes", &JsTensor::GetBytes, nullptr),
                                     InstanceAccessor("disposed", &JsTensor::GetDisposed, nullptr),
                                 });
  return f;
}

JsTensor::JsTensor(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsTensor>(info) {}

Napi::Value JsTensor::Dispose(const Napi::CallbackInfo& info) {
  // With the last lease the block goes back to the engine's cache; queued ops that use it run first.
  state.reset();
  if (!engine_ref.IsEmpty()) engine_ref.Reset();
  return info.Env().Undefined();
}

// read(): Promise<ArrayBuffer> of the raw contents, after all work queued before it.
Napi::Value JsTensor::Read(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const TensorState& s = live(env, "read");
  auto staging = std::make_shared<std::vector<uint8_t>>(s.buffer->bytes());
  auto buffer = s.buffer;
  EngineCore& core = engine->live(env);
  Backend* backend = &core.backend();
  return engine->NewPending(
      env, [backend, buffer, staging] { backend->download(staging->data(), buffer->data(), staging->size()); },
      staging);
}

// write(data: TypedArray): replaces the contents, in queue order.
Napi::Value JsTensor::Write(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const TensorState& s = live(env, "write");
  if (info.Length() < 1) throw_coded(env, "ERR_INVALID_ARG", "write(data: TypedArray)");
  auto host = std::make_shared<std::vector<uint8_t>>();
  copy_typed_array(env, info[0], s.dtype, s.numel(), *host);
  auto buffer = s.buffer;
  EngineCore& core = engine->live(env);
  Backend* backend = &core.backend();
  core.enqueue([backend, buffer, host] { backend->upload(buffer->data(), host->data(), host->size()); }, "upload");
  return env.Undefined();
}

// view(shape: number[]): the same memory under another shape with as many elements (no copy).
Napi::Value JsTensor::View(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const TensorState& s = live(env, "view");
  if (info.Length() < 1 || !info[0].IsArray()) throw_coded(env, "ERR_INVALID_ARG", "view(shape: number[])");
  std::vector<int64_t> shape = parse_shape(env, info[0].As<Napi::Array>());
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (numel != s.numel())
    throw_coded(env, "ERR_SHAPE", "view " + shape_string(shape) + " has " + std::to_string(numel) + " elements, the tensor " +
                                      shape_string(s.shape) + " has " + std::to_string(s.numel()));
  Napi::Object obj = new_tensor_object(env);
  obj.TypeTag(&kTensorTag);
  JsTensor* t = Unwrap(obj);
  t->state = std::make_shared<TensorState>(TensorState{s.buffer, s.dtype, std::move(shape), s.lease});
  t->engine = engine;
  t->engine_ref = Napi::Persistent(engine_ref.Value());
  return obj;
}

Napi::Value JsTensor::GetShape(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const TensorState& s = live(env, "shape");
  Napi::Array a = Napi::Array::New(env, s.shape.size());
  for (size_t i = 0; i < s.shape.size(); ++i) a.Set(uint32_t(i), Napi::Number::New(env, double(s.shape[i])));
  return a;
}
Napi::Value JsTensor::GetDtype(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), dtype_name(live(info.Env(), "dtype").dtype));
}
Napi::Value JsTensor::GetBytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), double(live(info.Env(), "bytes").buffer->bytes()));
}
Napi::Value JsTensor::GetDisposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !state); }

// ------------------------------------------------------------------------------------------------ module

// The library the CPU backend's GEMM and convolution run on ("" for the builtin kernels).
Napi::Value CpuLibrary(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), cpu::onednn::available() ? "oneDNN " + cpu::onednn::version() : std::string());
}

// measureFmaPeak(threads, seconds): the machine's f32 FMA peak in GFLOP/s (benchmarks only: blocks the caller).
Napi::Value MeasureFmaPeak(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int threads = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1;
  const double seconds = info.Length() > 1 && info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : 0.5;
  if (threads < 1 || threads > 1024 || !(seconds > 0 && seconds <= 60))
    throw_coded(env, "ERR_INVALID_ARG", "measureFmaPeak: threads must be in [1, 1024] and seconds in (0, 60]");
  const cpu::FmaPeak p = cpu::measure_fma_peak(threads, seconds);
  Napi::Object o = Napi::Object::New(env);
  o.Set("gflops", p.gflops);
  o.Set("isa", p.isa);
  return o;
}

// The instruction-set level the CPU backend's own kernels run at (avx512, avx2 or generic; SCALEKV_CPU_ISA caps it).
Napi::Value CpuIsa(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), cpu::isa_name(cpu::isa_level())); }

Napi::Value Backends(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array a = Napi::Array::New(env);
  uint32_t n = 0;
  a.Set(n++, "cpu");
#if defined(SCALEKV_WITH_CUDA)
  a.Set(n++, "cuda");
#endif
#if defined(SCALEKV_WITH_EMU)
  a.Set(n++, "emu");
#endif
  return a;
}

Napi::Value CudaProbe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
#if defined(SCALEKV_WITH_CUDA)
  std::string reason;
  const bool ok = cuda_probe(&reason);
  o.Set("available", Napi::Boolean::New(env, ok));
  o.Set("reason", Napi::String::New(env, ok ? "" : reason));
#else
  o.Set("available", Napi::Boolean::New(env, false));
  o.Set("reason", Napi::String::New(env, "this addon was built without CUDA"));
#endif
  return o;
}

// opTable(): the declarations, for the TS argument types (scripts/gen-op-types.mjs) and the op-table test.
Napi::Value OpTable(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const Napi::Object json = env.Global().Get("JSON").As<Napi::Object>();
  return json.Get("parse").As<Napi::Function>().Call(json, {Napi::String::New(env, op_table_json())});
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* classes = new AddonClasses;
  const Napi::Function engine = JsEngine::Init(env), tensor = JsTensor::Init(env);
  classes->engine = Napi::Persistent(engine);
  classes->tensor = Napi::Persistent(tensor);
  env.SetInstanceData(classes);
  exports.Set("NativeEngine", engine);
  exports.Set("NativeTensor", tensor);
  exports.Set("backends", Napi::Function::New(env, Backends));
  exports.Set("cpuLibrary", Napi::Function::New(env, CpuLibrary));
  exports.Set("cpuIsa", Napi::Function::New(env, CpuIsa));
  exports.Set("measureFmaPeak", Napi::Function::New(env, MeasureFmaPeak));
  exports.Set("cudaProbe", Napi::Function::New(env, CudaProbe));
  exports.Set("opTable", Napi::Function::New(env, OpTable));
  return exports;
}

}  // namespace
}  // namespace scalekv

static Napi::Object InitScalekv(Napi::Env env, Napi::Object exports) { return scalekv::Init(env, exports); }
NODE_API_MODULE(scalekv, InitScalekv)
