// N-API binding: argument checks (shapes, dtypes, aliasing) happen here, synchronously, so bad input throws
// at the call with a coded Error; valid calls are enqueued on the engine's ordered queue. Completions
// (sync, read) come back to the JS thread through one thread-safe function per engine.
#include <napi.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "../kernels/backend.h"
#include "../kernels/cpu/numeric.h"
#include "engine_core.h"

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

struct TensorState {
  std::shared_ptr<Buffer> buffer;
  DType dtype;
  std::vector<int64_t> shape;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

class JsTensor : public Napi::ObjectWrap<JsTensor> {
 public:
  static Napi::FunctionReference* constructor;
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
  Napi::Value GetShape(const Napi::CallbackInfo& info);
  Napi::Value GetDtype(const Napi::CallbackInfo& info);
  Napi::Value GetBytes(const Napi::CallbackInfo& info);
  Napi::Value GetDisposed(const Napi::CallbackInfo& info);
};
Napi::FunctionReference* JsTensor::constructor = nullptr;

struct Completion {
  uint64_t id;
  std::optional<QueuedError> error;
  std::vector<uint8_t> data;
  bool has_data = false;
};

class JsEngine : public Napi::ObjectWrap<JsEngine> {
 public:
  static Napi::FunctionReference* constructor;
  static Napi::Function Init(Napi::Env env);
  explicit JsEngine(const Napi::CallbackInfo& info);
  ~JsEngine() override;

  std::shared_ptr<EngineCore> core;  // null after dispose
  std::string backend_name;

  EngineCore& live(Napi::Env env) {
    if (!core) throw_coded(env, "ERR_DISPOSED", "engine was disposed");
    return *core;
  }
  Napi::Value NewPending(Napi::Env env, std::function<void()> op, std::vector<uint8_t>* staging_out,
                         std::shared_ptr<std::vector<uint8_t>> staging);
  JsTensor* unwrap_tensor(Napi::Env env, Napi::Value v, const char* what, bool optional);

 private:
  Napi::Value Tensor(const Napi::CallbackInfo& info);
  Napi::Value Sync(const Napi::CallbackInfo& info);
  Napi::Value Memory(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value Attention(const Napi::CallbackInfo& info);
  Napi::Value EvictCompact(const Napi::CallbackInfo& info);
  Napi::Value Selection(const Napi::CallbackInfo& info);
  Napi::Value GetBackend(const Napi::CallbackInfo& info);
  Napi::Value GetDevice(const Napi::CallbackInfo& info);

  void ref_pending(Napi::Env env);
  void unref_pending(Napi::Env env);
  static void on_completion(Napi::Env env, Napi::Function, JsEngine* self, Completion* c);

  using Tsfn = Napi::TypedThreadSafeFunction<JsEngine, Completion, &JsEngine::on_completion>;
  Tsfn tsfn_;
  bool tsfn_live_ = false;
  uint64_t next_id_ = 1;
  int pending_ = 0;
  std::unordered_map<uint64_t, Napi::Promise::Deferred> deferreds_;
  std::string device_;

  void shutdown();
};
Napi::FunctionReference* JsEngine::constructor = nullptr;

// ------------------------------------------------------------------------------------------------ Engine

Napi::Function JsEngine::Init(Napi::Env env) {
  Napi::Function f = DefineClass(env, "NativeEngine",
                                 {
                                     InstanceMethod("tensor", &JsEngine::Tensor),
                                     InstanceMethod("sync", &JsEngine::Sync),
                                     InstanceMethod("memory", &JsEngine::Memory),
                                     InstanceMethod("dispose", &JsEngine::Dispose),
                                     InstanceMethod("attention", &JsEngine::Attention),
                                     InstanceMethod("evictCompact", &JsEngine::EvictCompact),
                                     InstanceMethod("selection", &JsEngine::Selection),
                                     InstanceAccessor("backend", &JsEngine::GetBackend, nullptr),
                                     InstanceAccessor("device", &JsEngine::GetDevice, nullptr),
                                 });
  constructor = new Napi::FunctionReference(Napi::Persistent(f));
  return f;
}

// new NativeEngine(backend: 'cpu' | 'cuda' | 'emu', threads: number)
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

Napi::Value JsEngine::NewPending(Napi::Env env, std::function<void()> op, std::vector<uint8_t>*,
                                 std::shared_ptr<std::vector<uint8_t>> staging) {
  EngineCore& c = live(env);
  const uint64_t id = next_id_++;
  Napi::Promise::Deferred deferred = Napi::Promise::Deferred::New(env);
  deferreds_.emplace(id, deferred);
  ref_pending(env);
  Tsfn tsfn = tsfn_;
  const bool queued = c.enqueue_completion(std::move(op), [tsfn, id, staging](std::optional<QueuedError> err) mutable {
    auto* completion = new Completion{id, std::move(err), {}, false};
    if (staging && !completion->error) {
      completion->data = std::move(*staging);
      completion->has_data = true;
    }
    if (tsfn.BlockingCall(completion) != napi_ok) delete completion;
  });
  if (!queued) {
    deferreds_.erase(id);
    unref_pending(env);
    throw_coded(env, "ERR_DISPOSED", "engine was disposed");
  }
  return deferred.Promise();
}

Napi::Value JsEngine::Sync(const Napi::CallbackInfo& info) {
  return NewPending(info.Env(), nullptr, nullptr, nullptr);
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

Napi::Value JsEngine::GetBackend(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), backend_name); }
Napi::Value JsEngine::GetDevice(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), device_); }

JsTensor* JsEngine::unwrap_tensor(Napi::Env env, Napi::Value v, const char* what, bool optional) {
  if (v.IsUndefined() || v.IsNull()) {
    if (optional) return nullptr;
    throw_coded(env, "ERR_INVALID_ARG", std::string(what) + " is required");
  }
  if (!v.IsObject() || !v.As<Napi::Object>().InstanceOf(JsTensor::constructor->Value()))
    throw_coded(env, "ERR_INVALID_ARG", std::string(what) + " must be a Tensor");
  JsTensor* t = JsTensor::Unwrap(v.As<Napi::Object>());
  t->live(env, what);
  if (t->engine != this) throw_coded(env, "ERR_INVALID_ARG", std::string(what) + " belongs to another engine");
  return t;
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
  switch (dtype) {
    case DType::f32:
      if (t != napi_float32_array) mismatch();
      std::memcpy(out.data(), src, bytes);
      break;
    case DType::bf16:
    case DType::f16:
      if (t == napi_uint16_array) {
        std::memcpy(out.data(), src, bytes);
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
      std::memcpy(out.data(), src, bytes);
      break;
    case DType::u8:
      if (t != napi_uint8_array && t != napi_uint8_clamped_array)
        throw_coded(env, "ERR_DTYPE", "a u8 tensor takes a Uint8Array");
      std::memcpy(out.data(), src, bytes);
      break;
  }
  return bytes;
}

// tensor(dtype, shape: number[], data?: TypedArray, category?: string, fillByte?: number)
Napi::Value JsEngine::Tensor(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsArray())
    throw_coded(env, "ERR_INVALID_ARG", "tensor(dtype, shape, data?, category?)");
  auto dtype = parse_dtype(info[0].As<Napi::String>().Utf8Value());
  if (!dtype) throw_coded(env, "ERR_DTYPE", "unknown dtype '" + info[0].As<Napi::String>().Utf8Value() + "' (f32, bf16, f16, i32, u8)");
  Napi::Array js_shape = info[1].As<Napi::Array>();
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
    c.enqueue([backend, buffer, host] { backend->upload(buffer->data(), host->data(), host->size()); });
  } else if (info.Length() > 4 && info[4].IsNumber()) {
    const uint8_t byte = uint8_t(info[4].As<Napi::Number>().Uint32Value());
    c.enqueue([backend, buffer, bytes, byte] { backend->fill_u8(buffer->data(), byte, bytes); });
  }
  Napi::Object obj = JsTensor::constructor->New({});
  JsTensor* t = JsTensor::Unwrap(obj);
  t->state = std::make_shared<TensorState>(TensorState{buffer, *dtype, shape});
  t->engine = this;
  t->engine_ref = Napi::Persistent(Value());
  return obj;
}

// --------------------------------------------------------------------------------------------- op checks

struct Shape4 {
  int64_t a, b, c, d;
};

void expect_rank(Napi::Env env, const TensorState& t, size_t rank, const char* what, const char* layout) {
  if (t.shape.size() != rank)
    throw_coded(env, "ERR_SHAPE", std::string(what) + " must be " + layout + ", got " + shape_string(t.shape));
}

void expect_dtype(Napi::Env env, const TensorState& t, DType d, const char* what) {
  if (t.dtype != d)
    throw_coded(env, "ERR_DTYPE", std::string(what) + " must be " + dtype_name(d) + ", got " + dtype_name(t.dtype));
}

void expect_dim(Napi::Env env, const TensorState& t, size_t axis, int64_t want, const char* what, const char* name) {
  if (t.shape[axis] != want)
    throw_coded(env, "ERR_SHAPE", std::string(what) + " has " + name + " = " + std::to_string(t.shape[axis]) +
                                      " where " + std::to_string(want) + " is needed (shape " +
                                      shape_string(t.shape) + ")");
}

int get_int(Napi::Env env, Napi::Object o, const char* key, std::optional<int> fallback = std::nullopt) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) {
    if (fallback) return *fallback;
    throw_coded(env, "ERR_INVALID_ARG", std::string(key) + " is required");
  }
  if (!v.IsNumber()) throw_coded(env, "ERR_INVALID_ARG", std::string(key) + " must be an integer");
  const double x = v.As<Napi::Number>().DoubleValue();
  if (x != double(int64_t(x)) || x < -2147483648.0 || x > 2147483647.0)
    throw_coded(env, "ERR_INVALID_ARG", std::string(key) + " must be an integer, got " + std::to_string(x));
  return int(x);
}

void check_not_alias(Napi::Env env, const TensorState* out, std::initializer_list<const TensorState*> ins,
                     const char* what) {
  for (const TensorState* in : ins) {
    if (out && in && out->buffer == in->buffer)
      throw_coded(env, "ERR_INVALID_ARG", std::string(what) + " must not alias an input");
  }
}

// attention({ q, histK?, histV?, histLen?, gather?, curK?, curV?, out?, scale, windowRows?, windowLogits?, windowLse? })
Napi::Value JsEngine::Attention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  if (info.Length() < 1 || !info[0].IsObject()) throw_coded(env, "ERR_INVALID_ARG", "attention(args: object)");
  Napi::Object o = info[0].As<Napi::Object>();
  JsTensor* q = unwrap_tensor(env, o.Get("q"), "q", false);
  JsTensor* hk = unwrap_tensor(env, o.Get("histK"), "histK", true);
  JsTensor* hv = unwrap_tensor(env, o.Get("histV"), "histV", true);
  JsTensor* gather = unwrap_tensor(env, o.Get("gather"), "gather", true);
  JsTensor* ck = unwrap_tensor(env, o.Get("curK"), "curK", true);
  JsTensor* cv = unwrap_tensor(env, o.Get("curV"), "curV", true);
  JsTensor* out = unwrap_tensor(env, o.Get("out"), "out", true);
  JsTensor* wrows = unwrap_tensor(env, o.Get("windowRows"), "windowRows", true);
  JsTensor* wlogits = unwrap_tensor(env, o.Get("windowLogits"), "windowLogits", true);
  JsTensor* wlse = unwrap_tensor(env, o.Get("windowLse"), "windowLse", true);

  const TensorState& Q = *q->state;
  expect_rank(env, Q, 4, "q", "[rows, heads, Lq, headDim]");
  if (Q.dtype != DType::f32 && Q.dtype != DType::bf16)
    throw_coded(env, "ERR_DTYPE", std::string("attention takes f32 or bf16 tensors, q is ") + dtype_name(Q.dtype));
  AttentionArgs a;
  a.rows = int(Q.shape[0]);
  a.heads = int(Q.shape[1]);
  a.lq = int(Q.shape[2]);
  a.head_dim = int(Q.shape[3]);
  a.dtype = Q.dtype;
  if (a.head_dim <= 0 || a.head_dim % 8 != 0 || a.head_dim > 256)
    throw_coded(env, "ERR_SHAPE", "headDim must be a multiple of 8 in [8, 256], got " + std::to_string(a.head_dim));
  if (a.rows <= 0 || a.heads <= 0) throw_coded(env, "ERR_SHAPE", "q has an empty rows or heads axis");
  Napi::Value scale = o.Get("scale");
  if (!scale.IsNumber()) throw_coded(env, "ERR_INVALID_ARG", "scale must be a number");
  a.scale = scale.As<Napi::Number>().FloatValue();

  if ((hk == nullptr) != (hv == nullptr)) throw_coded(env, "ERR_INVALID_ARG", "histK and histV go together");
  if (hk) {
    for (JsTensor* t : {hk, hv}) {
      expect_rank(env, *t->state, 4, "history K/V", "[rows, heads, capacity, headDim]");
      expect_dtype(env, *t->state, a.dtype, "history K/V");
      expect_dim(env, *t->state, 0, a.rows, "history K/V", "rows");
      expect_dim(env, *t->state, 1, a.heads, "history K/V", "heads");
      expect_dim(env, *t->state, 3, a.head_dim, "history K/V", "headDim");
    }
    expect_dim(env, *hv->state, 2, hk->state->shape[2], "histV", "capacity");
    a.hist_cap = int(hk->state->shape[2]);
    a.hist_len = get_int(env, o, "histLen", a.hist_cap);
    if (a.hist_len < 0 || a.hist_len > a.hist_cap)
      throw_coded(env, "ERR_SHAPE", "histLen " + std::to_string(a.hist_len) + " is outside [0, capacity " +
                                        std::to_string(a.hist_cap) + "]");
  }
  if (gather) {
    if (!hk) throw_coded(env, "ERR_INVALID_ARG", "gather needs a history");
    expect_rank(env, *gather->state, 3, "gather", "[rows, heads, n]");
    expect_dtype(env, *gather->state, DType::i32, "gather");
    expect_dim(env, *gather->state, 0, a.rows, "gather", "rows");
    expect_dim(env, *gather->state, 1, a.heads, "gather", "heads");
    a.n_gather = int(gather->state->shape[2]);
  }
  if ((ck == nullptr) != (cv == nullptr)) throw_coded(env, "ERR_INVALID_ARG", "curK and curV go together");
  if (ck) {
    for (JsTensor* t : {ck, cv}) {
      expect_rank(env, *t->state, 4, "current K/V", "[rows, heads, Lc, headDim]");
      expect_dtype(env, *t->state, a.dtype, "current K/V");
      expect_dim(env, *t->state, 0, a.rows, "current K/V", "rows");
      expect_dim(env, *t->state, 1, a.heads, "current K/V", "heads");
      expect_dim(env, *t->state, 3, a.head_dim, "current K/V", "headDim");
    }
    expect_dim(env, *cv->state, 2, ck->state->shape[2], "curV", "Lc");
    a.lc = int(ck->state->shape[2]);
  }
  const int n_keys = (gather ? a.n_gather : a.hist_len) + a.lc;  // a.gather is set only at enqueue
  if (n_keys <= 0) throw_coded(env, "ERR_SHAPE", "attention needs at least one key (history or current)");
  if (out) {
    expect_rank(env, *out->state, 4, "out", "[rows, heads, Lq, headDim]");
    expect_dtype(env, *out->state, a.dtype, "out");
    for (size_t i = 0; i < 4; ++i) expect_dim(env, *out->state, i, Q.shape[i], "out", "a dimension of q");
  }
  if (wrows) {
    expect_rank(env, *wrows->state, 1, "windowRows", "[nWindow]");
    expect_dtype(env, *wrows->state, DType::i32, "windowRows");
    a.n_window = int(wrows->state->shape[0]);
    if (!wlogits) throw_coded(env, "ERR_INVALID_ARG", "windowRows needs windowLogits");
    expect_rank(env, *wlogits->state, 4, "windowLogits", "[rows, heads, nWindow, nKeys]");
    expect_dtype(env, *wlogits->state, DType::f32, "windowLogits");
    const int64_t want[4] = {a.rows, a.heads, a.n_window, n_keys};
    for (size_t i = 0; i < 4; ++i) expect_dim(env, *wlogits->state, i, want[i], "windowLogits", "an axis");
    if (wlse) {
      expect_rank(env, *wlse->state, 3, "windowLse", "[rows, heads, nWindow]");
      expect_dtype(env, *wlse->state, DType::f32, "windowLse");
      for (size_t i = 0; i < 3; ++i) expect_dim(env, *wlse->state, i, want[i], "windowLse", "an axis");
    }
  } else if (wlogits || wlse) {
    throw_coded(env, "ERR_INVALID_ARG", "windowLogits/windowLse need windowRows");
  }
  if (!out && a.n_window == 0) throw_coded(env, "ERR_INVALID_ARG", "attention needs out, a window output, or both");
  auto st = [](JsTensor* t) -> const TensorState* { return t ? t->state.get() : nullptr; };
  for (JsTensor* o2 : {out, wlogits, wlse})
    check_not_alias(env, st(o2), {st(q), st(hk), st(hv), st(ck), st(cv), st(gather), st(wrows)}, "an attention output");
  if (out && wlogits && out->state->buffer == wlogits->state->buffer)
    throw_coded(env, "ERR_INVALID_ARG", "out and windowLogits must differ");

  std::vector<std::shared_ptr<Buffer>> hold;
  auto ptr = [&](JsTensor* t) -> void* {
    if (!t) return nullptr;
    hold.push_back(t->state->buffer);
    return t->state->buffer->data();
  };
  a.q = ptr(q);
  a.hist_k = ptr(hk);
  a.hist_v = ptr(hv);
  a.gather = static_cast<const int32_t*>(ptr(gather));
  a.cur_k = ptr(ck);
  a.cur_v = ptr(cv);
  a.out = ptr(out);
  a.window_rows = static_cast<const int32_t*>(ptr(wrows));
  a.window_logits = static_cast<float*>(ptr(wlogits));
  a.window_lse = static_cast<float*>(ptr(wlse));
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold] { backend->attention(a); });
  return env.Undefined();
}

// evictCompact({ histK, histV, histLen, curK?, curV?, keep })
Napi::Value JsEngine::EvictCompact(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  if (info.Length() < 1 || !info[0].IsObject()) throw_coded(env, "ERR_INVALID_ARG", "evictCompact(args: object)");
  Napi::Object o = info[0].As<Napi::Object>();
  JsTensor* hk = unwrap_tensor(env, o.Get("histK"), "histK", false);
  JsTensor* hv = unwrap_tensor(env, o.Get("histV"), "histV", false);
  JsTensor* ck = unwrap_tensor(env, o.Get("curK"), "curK", true);
  JsTensor* cv = unwrap_tensor(env, o.Get("curV"), "curV", true);
  JsTensor* keep = unwrap_tensor(env, o.Get("keep"), "keep", false);
  const TensorState& K = *hk->state;
  expect_rank(env, K, 4, "histK", "[rows, heads, capacity, headDim]");
  if (K.dtype != DType::f32 && K.dtype != DType::bf16)
    throw_coded(env, "ERR_DTYPE", std::string("evictCompact takes f32 or bf16 K/V, got ") + dtype_name(K.dtype));
  EvictCompactArgs a;
  a.rows = int(K.shape[0]);
  a.heads = int(K.shape[1]);
  a.hist_cap = int(K.shape[2]);
  a.head_dim = int(K.shape[3]);
  a.dtype = K.dtype;
  expect_rank(env, *hv->state, 4, "histV", "[rows, heads, capacity, headDim]");
  expect_dtype(env, *hv->state, a.dtype, "histV");
  for (size_t i = 0; i < 4; ++i) expect_dim(env, *hv->state, i, K.shape[i], "histV", "an axis of histK");
  if (hk->state->buffer == hv->state->buffer) throw_coded(env, "ERR_INVALID_ARG", "histK and histV must differ");
  a.hist_len = get_int(env, o, "histLen");
  if (a.hist_len < 0 || a.hist_len > a.hist_cap)
    throw_coded(env, "ERR_SHAPE", "histLen " + std::to_string(a.hist_len) + " is outside [0, capacity " +
                                      std::to_string(a.hist_cap) + "]");
  if ((ck == nullptr) != (cv == nullptr)) throw_coded(env, "ERR_INVALID_ARG", "curK and curV go together");
  if (ck) {
    for (JsTensor* t : {ck, cv}) {
      expect_rank(env, *t->state, 4, "current K/V", "[rows, heads, Lc, headDim]");
      expect_dtype(env, *t->state, a.dtype, "current K/V");
      expect_dim(env, *t->state, 0, a.rows, "current K/V", "rows");
      expect_dim(env, *t->state, 1, a.heads, "current K/V", "heads");
      expect_dim(env, *t->state, 3, a.head_dim, "current K/V", "headDim");
      if (t->state->buffer == hk->state->buffer || t->state->buffer == hv->state->buffer)
        throw_coded(env, "ERR_INVALID_ARG", "current K/V must not alias the history");
    }
    expect_dim(env, *cv->state, 2, ck->state->shape[2], "curV", "Lc");
    a.lc = int(ck->state->shape[2]);
  }
  const TensorState& I = *keep->state;
  expect_rank(env, I, 3, "keep", "[rows, heads, nKeep]");
  expect_dtype(env, I, DType::i32, "keep");
  expect_dim(env, I, 0, a.rows, "keep", "rows");
  expect_dim(env, I, 1, a.heads, "keep", "heads");
  a.n_keep = int(I.shape[2]);
  if (a.n_keep > a.hist_cap)
    throw_coded(env, "ERR_SHAPE", "keep has " + std::to_string(a.n_keep) + " entries per (row, head) but the history holds " +
                                      std::to_string(a.hist_cap));
  std::vector<std::shared_ptr<Buffer>> hold{hk->state->buffer, hv->state->buffer, keep->state->buffer};
  a.hist_k = hk->state->buffer->data();
  a.hist_v = hv->state->buffer->data();
  if (ck) {
    hold.push_back(ck->state->buffer);
    hold.push_back(cv->state->buffer);
    a.cur_k = ck->state->buffer->data();
    a.cur_v = cv->state->buffer->data();
  }
  a.keep = static_cast<const int32_t*>(keep->state->buffer->data());
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold] { backend->evict_compact(a); });
  return env.Undefined();
}

// selection({ logits, lse?, windowKeys, out, budget, mode: 'logits'|'probs', pooling: 'none'|'max'|'avg', kernel, pooledScores? })
Napi::Value JsEngine::Selection(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  if (info.Length() < 1 || !info[0].IsObject()) throw_coded(env, "ERR_INVALID_ARG", "selection(args: object)");
  Napi::Object o = info[0].As<Napi::Object>();
  JsTensor* logits = unwrap_tensor(env, o.Get("logits"), "logits", false);
  JsTensor* lse = unwrap_tensor(env, o.Get("lse"), "lse", true);
  JsTensor* wkeys = unwrap_tensor(env, o.Get("windowKeys"), "windowKeys", false);
  JsTensor* out = unwrap_tensor(env, o.Get("out"), "out", false);
  JsTensor* pooled = unwrap_tensor(env, o.Get("pooledScores"), "pooledScores", true);
  const TensorState& L = *logits->state;
  expect_rank(env, L, 4, "logits", "[rows, heads, nWindow, nKeys]");
  expect_dtype(env, L, DType::f32, "logits");
  SelectionArgs a;
  a.rows = int(L.shape[0]);
  a.heads = int(L.shape[1]);
  a.n_window = int(L.shape[2]);
  a.n_keys = int(L.shape[3]);
  expect_rank(env, *wkeys->state, 1, "windowKeys", "[nWindow]");
  expect_dtype(env, *wkeys->state, DType::i32, "windowKeys");
  expect_dim(env, *wkeys->state, 0, a.n_window, "windowKeys", "nWindow");
  a.budget = get_int(env, o, "budget");
  if (a.budget < a.n_window || a.budget > a.n_keys)
    throw_coded(env, "ERR_BUDGET", "budget " + std::to_string(a.budget) + " must lie in [window " +
                                       std::to_string(a.n_window) + ", keys " + std::to_string(a.n_keys) + "]");
  const std::string mode = o.Get("mode").IsString() ? o.Get("mode").ToString().Utf8Value() : "logits";
  if (mode == "logits") a.mode = ScoreMode::logits;
  else if (mode == "probs") a.mode = ScoreMode::probs;
  else throw_coded(env, "ERR_INVALID_ARG", "mode must be 'logits' or 'probs'");
  const std::string pooling = o.Get("pooling").IsString() ? o.Get("pooling").ToString().Utf8Value() : "max";
  if (pooling == "none") a.pooling = Pooling::none;
  else if (pooling == "max") a.pooling = Pooling::max;
  else if (pooling == "avg") a.pooling = Pooling::avg;
  else throw_coded(env, "ERR_INVALID_ARG", "pooling must be 'none', 'max' or 'avg'");
  a.kernel = get_int(env, o, "kernel", 1);
  if (a.kernel < 1 || a.kernel % 2 == 0 || a.kernel > 63)
    throw_coded(env, "ERR_INVALID_ARG", "kernel must be odd and in [1, 63], got " + std::to_string(a.kernel));
  if (a.mode == ScoreMode::probs) {
    if (!lse) throw_coded(env, "ERR_INVALID_ARG", "mode 'probs' needs lse");
    expect_rank(env, *lse->state, 3, "lse", "[rows, heads, nWindow]");
    expect_dtype(env, *lse->state, DType::f32, "lse");
    for (size_t i = 0; i < 3; ++i) expect_dim(env, *lse->state, i, L.shape[i], "lse", "an axis of logits");
  }
  expect_rank(env, *out->state, 3, "out", "[rows, heads, budget]");
  expect_dtype(env, *out->state, DType::i32, "out");
  expect_dim(env, *out->state, 0, a.rows, "out", "rows");
  expect_dim(env, *out->state, 1, a.heads, "out", "heads");
  expect_dim(env, *out->state, 2, a.budget, "out", "budget");
  if (pooled) {
    expect_rank(env, *pooled->state, 3, "pooledScores", "[rows, heads, nKeys]");
    expect_dtype(env, *pooled->state, DType::f32, "pooledScores");
    expect_dim(env, *pooled->state, 0, a.rows, "pooledScores", "rows");
    expect_dim(env, *pooled->state, 1, a.heads, "pooledScores", "heads");
    expect_dim(env, *pooled->state, 2, a.n_keys, "pooledScores", "nKeys");
  }
  auto st = [](JsTensor* t) -> const TensorState* { return t ? t->state.get() : nullptr; };
  for (JsTensor* o2 : {out, pooled}) check_not_alias(env, st(o2), {st(logits), st(lse), st(wkeys)}, "a selection output");
  std::vector<std::shared_ptr<Buffer>> hold{logits->state->buffer, wkeys->state->buffer, out->state->buffer};
  a.logits = static_cast<const float*>(logits->state->buffer->data());
  a.window_keys = static_cast<const int32_t*>(wkeys->state->buffer->data());
  a.out = static_cast<int32_t*>(out->state->buffer->data());
  if (lse && a.mode == ScoreMode::probs) {
    hold.push_back(lse->state->buffer);
    a.lse = static_cast<const float*>(lse->state->buffer->data());
  }
  if (pooled) {
    hold.push_back(pooled->state->buffer);
    a.pooled_scores = static_cast<float*>(pooled->state->buffer->data());
  }
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold] { backend->selection(a); });
  return env.Undefined();
}

// ------------------------------------------------------------------------------------------------ Tensor

Napi::Function JsTensor::Init(Napi::Env env) {
  Napi::Function f = DefineClass(env, "NativeTensor",
                                 {
                                     InstanceMethod("dispose", &JsTensor::Dispose),
                                     InstanceMethod("read", &JsTensor::Read),
                                     InstanceMethod("write", &JsTensor::Write),
                                     InstanceAccessor("shape", &JsTensor::GetShape, nullptr),
                                     InstanceAccessor("dtype", &JsTensor::GetDtype, nullptr),
                                     InstanceAccessor("bytes", &JsTensor::GetBytes, nullptr),
                                     InstanceAccessor("disposed", &JsTensor::GetDisposed, nullptr),
                                 });
  constructor = new Napi::FunctionReference(Napi::Persistent(f));
  return f;
}

JsTensor::JsTensor(const Napi::CallbackInfo& info) : Napi::ObjectWrap<JsTensor>(info) {}

Napi::Value JsTensor::Dispose(const Napi::CallbackInfo& info) {
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
      nullptr, staging);
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
  core.enqueue([backend, buffer, host] { backend->upload(buffer->data(), host->data(), host->size()); });
  return env.Undefined();
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

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeEngine", JsEngine::Init(env));
  exports.Set("NativeTensor", JsTensor::Init(env));
  exports.Set("backends", Napi::Function::New(env, Backends));
  exports.Set("cudaProbe", Napi::Function::New(env, CudaProbe));
  return exports;
}

}  // namespace
}  // namespace scalekv

static Napi::Object InitScalekv(Napi::Env env, Napi::Object exports) { return scalekv::Init(env, exports); }
NODE_API_MODULE(scalekv, InitScalekv)
