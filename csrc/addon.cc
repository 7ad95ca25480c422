// N-API binding: argument checks (shapes, dtypes, aliasing) happen here, synchronously, so bad input throws
// at the call with a coded Error; valid calls are enqueued on the engine's ordered queue. Completions
// (sync, read) come back to the JS thread through one thread-safe function per engine.
#include <napi.h>

#include <cmath>
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
  Napi::Value View(const Napi::CallbackInfo& info);
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
  Napi::Value SetProfiling(const Napi::CallbackInfo& info);
  Napi::Value TrimCache(const Napi::CallbackInfo& info);
  Napi::Value Profile(const Napi::CallbackInfo& info);
  Napi::Value Attention(const Napi::CallbackInfo& info);
  Napi::Value EvictCompact(const Napi::CallbackInfo& info);
  Napi::Value Selection(const Napi::CallbackInfo& info);
  Napi::Value Gemm(const Napi::CallbackInfo& info);
  Napi::Value LayerNorm(const Napi::CallbackInfo& info);
  Napi::Value GatedResidual(const Napi::CallbackInfo& info);
  Napi::Value Activation(const Napi::CallbackInfo& info);
  Napi::Value QkNormRope(const Napi::CallbackInfo& info);
  Napi::Value CrossAttention(const Napi::CallbackInfo& info);
  Napi::Value CfgTau(const Napi::CallbackInfo& info);
  Napi::Value TopkTopPMask(const Napi::CallbackInfo& info);
  Napi::Value SampleBits(const Napi::CallbackInfo& info);
  // Latent and VAE-decoder ops (latent_ops.inc).
  Napi::Value BitsToCodes(const Napi::CallbackInfo& info);
  Napi::Value ResizeBilinear(const Napi::CallbackInfo& info);
  Napi::Value Conv2d(const Napi::CallbackInfo& info);
  Napi::Value GroupNorm(const Napi::CallbackInfo& info);
  Napi::Value UpsampleNearest2x(const Napi::CallbackInfo& info);
  Napi::Value PixelShuffle2x(const Napi::CallbackInfo& info);
  Napi::Value PixelUnshuffle2x(const Napi::CallbackInfo& info);
  Napi::Value Add(const Napi::CallbackInfo& info);
  Napi::Value Transpose12(const Napi::CallbackInfo& info);
  Napi::Value ImageToU8(const Napi::CallbackInfo& info);
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
                                     InstanceMethod("setProfiling", &JsEngine::SetProfiling),
                                     InstanceMethod("trimCache", &JsEngine::TrimCache),
                                     InstanceMethod("profile", &JsEngine::Profile),
                                     InstanceMethod("attention", &JsEngine::Attention),
                                     InstanceMethod("evictCompact", &JsEngine::EvictCompact),
                                     InstanceMethod("selection", &JsEngine::Selection),
                                     InstanceMethod("gemm", &JsEngine::Gemm),
                                     InstanceMethod("layerNorm", &JsEngine::LayerNorm),
                                     InstanceMethod("gatedResidual", &JsEngine::GatedResidual),
                                     InstanceMethod("activation", &JsEngine::Activation),
                                     InstanceMethod("qkNormRope", &JsEngine::QkNormRope),
                                     InstanceMethod("crossAttention", &JsEngine::CrossAttention),
                                     InstanceMethod("cfgTau", &JsEngine::CfgTau),
                                     InstanceMethod("topkTopPMask", &JsEngine::TopkTopPMask),
                                     InstanceMethod("sampleBits", &JsEngine::SampleBits),
                                     InstanceMethod("bitsToCodes", &JsEngine::BitsToCodes),
                                     InstanceMethod("resizeBilinear", &JsEngine::ResizeBilinear),
                                     InstanceMethod("conv2d", &JsEngine::Conv2d),
                                     InstanceMethod("groupNorm", &JsEngine::GroupNorm),
                                     InstanceMethod("upsampleNearest2x", &JsEngine::UpsampleNearest2x),
                                     InstanceMethod("pixelShuffle2x", &JsEngine::PixelShuffle2x),
                                     InstanceMethod("pixelUnshuffle2x", &JsEngine::PixelUnshuffle2x),
                                     InstanceMethod("add", &JsEngine::Add),
                                     InstanceMethod("transpose12", &JsEngine::Transpose12),
                                     InstanceMethod("imageToU8", &JsEngine::ImageToU8),
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

// trimCache(): frees the cached blocks of released tensors (in queue order).
Napi::Value JsEngine::TrimCache(const Napi::CallbackInfo& info) {
  live(info.Env()).trim_cache();
  return info.Env().Undefined();
}

// setProfiling(on: boolean): turning it on clears the previous profile.
Napi::Value JsEngine::SetProfiling(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean()) throw_coded(env, "ERR_INVALID_ARG", "setProfiling(on: boolean)");
  live(env).set_profiling(info[0].As<Napi::Boolean>().Value());
  return env.Undefined();
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
  Napi::Object obj = JsTensor::constructor->New({});
  JsTensor* t = JsTensor::Unwrap(obj);
  t->state = std::make_shared<TensorState>(TensorState{buffer, *dtype, shape, std::make_shared<Lease>(buffer)});
  t->engine = this;
  t->engine_ref = Napi::Persistent(Value());
  return obj;
}

// --------------------------------------------------------------------------------------------- op checks

// Every op takes one arguments object.
Napi::Object args_object(Napi::Env env, const Napi::CallbackInfo& info, const char* signature) {
  if (info.Length() < 1 || !info[0].IsObject()) throw_coded(env, "ERR_INVALID_ARG", signature);
  return info[0].As<Napi::Object>();
}

// The operands of one op call: buffers are held until it has run.
struct Holder {
  std::vector<std::shared_ptr<Buffer>> hold;
  void* ptr(JsTensor* t) {
    if (!t) return nullptr;
    hold.push_back(t->state->buffer);
    return t->state->buffer->data();
  }
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

// An optional boolean: absent is false.
bool get_bool(Napi::Env env, Napi::Object o, const char* key) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return false;
  if (!v.IsBoolean()) throw_coded(env, "ERR_INVALID_ARG", std::string(key) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
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
  Napi::Object o = args_object(env, info, "attention(args: object)");
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

  Holder h;
  auto ptr = [&](JsTensor* t) { return h.ptr(t); };
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
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->attention(a); }, "attention");
  return env.Undefined();
}

// evictCompact({ histK, histV, histLen, curK?, curV?, keep, repeats? })
Napi::Value JsEngine::EvictCompact(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "evictCompact(args: object)");
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
  a.repeats = get_bool(env, o, "repeats");
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
  c.enqueue([backend, a, hold] { backend->evict_compact(a); }, "evict_compact");
  return env.Undefined();
}

// selection({ logits, lse?, windowKeys, out, budget, mode: 'logits'|'probs', pooling: 'none'|'max'|'avg', kernel, pooledScores? })
Napi::Value JsEngine::Selection(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "selection(args: object)");
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
  c.enqueue([backend, a, hold] { backend->selection(a); }, "selection");
  return env.Undefined();
}

#include "latent_ops.inc"

// ------------------------------------------------------------------------------------- transformer ops

double get_number(Napi::Env env, Napi::Object o, const char* key, std::optional<double> fallback = std::nullopt) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) {
    if (fallback) return *fallback;
    throw_coded(env, "ERR_INVALID_ARG", std::string(key) + " is required");
  }
  if (!v.IsNumber() || !std::isfinite(v.As<Napi::Number>().DoubleValue()))
    throw_coded(env, "ERR_INVALID_ARG", std::string(key) + " must be a finite number");
  return v.As<Napi::Number>().DoubleValue();
}

void expect_float(Napi::Env env, const TensorState& t, const char* what) {
  if (t.dtype != DType::f32 && t.dtype != DType::bf16)
    throw_coded(env, "ERR_DTYPE", std::string(what) + " must be f32 or bf16, got " + dtype_name(t.dtype));
}

void expect_same_shape(Napi::Env env, const TensorState& t, const std::vector<int64_t>& shape, const char* what,
                       const char* other) {
  if (t.shape != shape)
    throw_coded(env, "ERR_SHAPE", std::string(what) + " must have the shape of " + other + " " + shape_string(shape) +
                                      ", got " + shape_string(t.shape));
}

const TensorState* state_of(JsTensor* t) { return t ? t->state.get() : nullptr; }

// A per-batch-row f32 vector: `key` is [B, C], or [B, S, C] with `slotKey` picking the slot.
struct RowVectors {
  JsTensor* tensor = nullptr;
  int64_t offset = 0, stride = 0;
};

RowVectors row_vectors(Napi::Env env, JsEngine* engine, Napi::Object o, const char* key, const char* slot_key,
                       int64_t batch, int64_t channels) {
  RowVectors r;
  r.tensor = engine->unwrap_tensor(env, o.Get(key), key, true);
  if (!r.tensor) return r;
  const TensorState& t = *r.tensor->state;
  expect_dtype(env, t, DType::f32, key);
  if (t.shape.size() == 2) {
    expect_dim(env, t, 0, batch, key, "batch");
    expect_dim(env, t, 1, channels, key, "channels");
    r.stride = channels;
  } else if (t.shape.size() == 3) {
    expect_dim(env, t, 0, batch, key, "batch");
    expect_dim(env, t, 2, channels, key, "channels");
    const int slot = get_int(env, o, slot_key);
    if (slot < 0 || slot >= t.shape[1])
      throw_coded(env, "ERR_SHAPE", std::string(slot_key) + " " + std::to_string(slot) + " is outside [0, " +
                                        std::to_string(t.shape[1]) + ")");
    r.offset = int64_t(slot) * channels;
    r.stride = t.shape[1] * channels;
  } else {
    throw_coded(env, "ERR_SHAPE", std::string(key) + " must be [batch, channels] or [batch, slots, channels], got " +
                                      shape_string(t.shape));
  }
  return r;
}

const float* row_vectors_ptr(Holder& h, const RowVectors& r) {
  return r.tensor ? static_cast<const float*>(h.ptr(r.tensor)) + r.offset : nullptr;
}

// [batch, tokens, C] from a rank-3 tensor, or [rows, C] read as rows batches of one token.
void batch_tokens_channels(Napi::Env env, const TensorState& t, const char* what, int* batch, int* tokens,
                           int* channels) {
  if (t.shape.size() == 3) {
    *batch = int(t.shape[0]);
    *tokens = int(t.shape[1]);
    *channels = int(t.shape[2]);
  } else if (t.shape.size() == 2) {
    *batch = int(t.shape[0]);
    *tokens = 1;
    *channels = int(t.shape[1]);
  } else {
    throw_coded(env, "ERR_SHAPE", std::string(what) + " must be [batch, tokens, channels] or [rows, channels], got " +
                                      shape_string(t.shape));
  }
  if (*channels <= 0) throw_coded(env, "ERR_SHAPE", std::string(what) + " has no channels");
}

// An output that may be the input itself (an in-place call) but must not overlap any other operand.
void check_output(Napi::Env env, JsTensor* out, JsTensor* in, std::initializer_list<const TensorState*> others,
                  const char* what) {
  if (out->state->buffer == in->state->buffer) {
    if (out->state->dtype != in->state->dtype)
      throw_coded(env, "ERR_INVALID_ARG", std::string(what) + " may be the input itself only with the same dtype");
  }
  check_not_alias(env, out->state.get(), others, what);
}

// gemm({ x, w, bias?, y, epilogue?: 'none'|'gelu_tanh'|'silu' })
Napi::Value JsEngine::Gemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "gemm(args: object)");
  JsTensor* x = unwrap_tensor(env, o.Get("x"), "x", false);
  JsTensor* w = unwrap_tensor(env, o.Get("w"), "w", false);
  JsTensor* bias = unwrap_tensor(env, o.Get("bias"), "bias", true);
  JsTensor* y = unwrap_tensor(env, o.Get("y"), "y", false);
  const TensorState& X = *x->state;
  const TensorState& W = *w->state;
  if (X.shape.empty()) throw_coded(env, "ERR_SHAPE", "x must be [..., K], got a scalar");
  expect_rank(env, W, 2, "w", "[N, K]");
  expect_float(env, X, "x");
  expect_float(env, W, "w");
  if (X.dtype == DType::bf16 && W.dtype != DType::bf16)
    throw_coded(env, "ERR_DTYPE", "gemm takes x/w as f32/f32, bf16/bf16 or f32/bf16, not bf16 x with f32 w");
  GemmArgs a;
  a.k = int(W.shape[1]);
  a.n = int(W.shape[0]);
  expect_dim(env, X, X.shape.size() - 1, a.k, "x", "K (the last axis)");
  int64_t m = 1;
  for (size_t i = 0; i + 1 < X.shape.size(); ++i) m *= X.shape[i];
  if (m > INT32_MAX || W.shape[0] > INT32_MAX || W.shape[1] > INT32_MAX)
    throw_coded(env, "ERR_SHAPE", "gemm dimensions must each be below 2^31");
  a.m = int(m);
  std::vector<int64_t> y_shape = X.shape;
  y_shape.back() = a.n;
  expect_float(env, *y->state, "y");
  expect_same_shape(env, *y->state, y_shape, "y", "x with N as the last axis");
  if (bias) {
    expect_rank(env, *bias->state, 1, "bias", "[N]");
    expect_float(env, *bias->state, "bias");
    expect_dim(env, *bias->state, 0, a.n, "bias", "N");
    a.bias_dtype = bias->state->dtype;
  }
  const std::string ep = o.Get("epilogue").IsString() ? o.Get("epilogue").ToString().Utf8Value() : "none";
  if (ep == "none") a.epilogue = Epilogue::none;
  else if (ep == "gelu_tanh") a.epilogue = Epilogue::gelu_tanh;
  else if (ep == "silu") a.epilogue = Epilogue::silu;
  else throw_coded(env, "ERR_INVALID_ARG", "epilogue must be 'none', 'gelu_tanh' or 'silu'");
  check_not_alias(env, y->state.get(), {&X, &W, state_of(bias)}, "gemm output y");
  a.x_dtype = X.dtype;
  a.w_dtype = W.dtype;
  a.y_dtype = y->state->dtype;
  Holder h;
  a.x = h.ptr(x);
  a.w = h.ptr(w);
  a.bias = h.ptr(bias);
  a.y = h.ptr(y);
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->gemm(a); }, "gemm");
  return env.Undefined();
}

// layerNorm({ x, y, eps?, scale?, scaleSlot?, shift?, shiftSlot?, weight?, bias? })
Napi::Value JsEngine::LayerNorm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "layerNorm(args: object)");
  JsTensor* x = unwrap_tensor(env, o.Get("x"), "x", false);
  JsTensor* y = unwrap_tensor(env, o.Get("y"), "y", false);
  JsTensor* weight = unwrap_tensor(env, o.Get("weight"), "weight", true);
  JsTensor* bias = unwrap_tensor(env, o.Get("bias"), "bias", true);
  const TensorState& X = *x->state;
  LayerNormArgs a;
  batch_tokens_channels(env, X, "x", &a.batch, &a.tokens, &a.channels);
  expect_float(env, X, "x");
  expect_float(env, *y->state, "y");
  expect_same_shape(env, *y->state, X.shape, "y", "x");
  a.eps = float(get_number(env, o, "eps", 1e-6));
  const RowVectors scale = row_vectors(env, this, o, "scale", "scaleSlot", a.batch, a.channels);
  const RowVectors shift = row_vectors(env, this, o, "shift", "shiftSlot", a.batch, a.channels);
  if ((scale.tensor == nullptr) != (shift.tensor == nullptr))
    throw_coded(env, "ERR_INVALID_ARG", "scale and shift go together");
  if ((weight == nullptr) != (bias == nullptr)) throw_coded(env, "ERR_INVALID_ARG", "weight and bias go together");
  if (scale.tensor && weight) throw_coded(env, "ERR_INVALID_ARG", "give scale/shift (AdaLN) or weight/bias, not both");
  for (JsTensor* t : {weight, bias}) {
    if (!t) continue;
    expect_rank(env, *t->state, 1, "weight/bias", "[channels]");
    expect_dtype(env, *t->state, DType::f32, "weight/bias");
    expect_dim(env, *t->state, 0, a.channels, "weight/bias", "channels");
  }
  a.mode = scale.tensor ? NormMode::modulate : weight ? NormMode::affine : NormMode::plain;
  check_output(env, y, x, {state_of(scale.tensor), state_of(shift.tensor), state_of(weight), state_of(bias)},
               "layerNorm output y");
  a.x_dtype = X.dtype;
  a.y_dtype = y->state->dtype;
  a.scale_stride = scale.stride;
  a.shift_stride = shift.stride;
  Holder h;
  a.x = h.ptr(x);
  a.y = h.ptr(y);
  a.scale = row_vectors_ptr(h, scale);
  a.shift = row_vectors_ptr(h, shift);
  a.weight = static_cast<const float*>(h.ptr(weight));
  a.bias = static_cast<const float*>(h.ptr(bias));
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->layer_norm(a); }, "layer_norm");
  return env.Undefined();
}

// gatedResidual({ x, y, gate?, gateSlot? })
Napi::Value JsEngine::GatedResidual(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "gatedResidual(args: object)");
  JsTensor* x = unwrap_tensor(env, o.Get("x"), "x", false);
  JsTensor* y = unwrap_tensor(env, o.Get("y"), "y", false);
  const TensorState& X = *x->state;
  GatedResidualArgs a;
  batch_tokens_channels(env, X, "x", &a.batch, &a.tokens, &a.channels);
  expect_float(env, X, "x");
  expect_float(env, *y->state, "y");
  expect_same_shape(env, *y->state, X.shape, "y", "x");
  const RowVectors gate = row_vectors(env, this, o, "gate", "gateSlot", a.batch, a.channels);
  check_not_alias(env, &X, {y->state.get(), state_of(gate.tensor)}, "gatedResidual's x (updated in place)");
  a.x_dtype = X.dtype;
  a.y_dtype = y->state->dtype;
  a.gate_stride = gate.stride;
  Holder h;
  a.x = h.ptr(x);
  a.y = h.ptr(y);
  a.gate = row_vectors_ptr(h, gate);
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->gated_residual(a); }, "gated_residual");
  return env.Undefined();
}

// activation({ x, out, fn: 'silu'|'gelu_tanh' })
Napi::Value JsEngine::Activation(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "activation(args: object)");
  JsTensor* x = unwrap_tensor(env, o.Get("x"), "x", false);
  JsTensor* out = unwrap_tensor(env, o.Get("out"), "out", false);
  expect_float(env, *x->state, "x");
  expect_float(env, *out->state, "out");
  expect_same_shape(env, *out->state, x->state->shape, "out", "x");
  ActivationArgs a;
  const std::string fn = o.Get("fn").IsString() ? o.Get("fn").ToString().Utf8Value() : "";
  if (fn == "silu") a.fn = Epilogue::silu;
  else if (fn == "gelu_tanh") a.fn = Epilogue::gelu_tanh;
  else throw_coded(env, "ERR_INVALID_ARG", "fn must be 'silu' or 'gelu_tanh'");
  check_output(env, out, x, {}, "activation output");
  a.count = x->state->numel();
  a.x_dtype = x->state->dtype;
  a.y_dtype = out->state->dtype;
  Holder h;
  a.x = h.ptr(x);
  a.y = h.ptr(out);
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->activation(a); }, "activation");
  return env.Undefined();
}

// qkNormRope({ qkv, qBias?, vBias?, scaleMul?, normalize?, positions?, q, k?, v?, kvOffset? })
Napi::Value JsEngine::QkNormRope(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "qkNormRope(args: object)");
  JsTensor* qkv = unwrap_tensor(env, o.Get("qkv"), "qkv", false);
  JsTensor* q_bias = unwrap_tensor(env, o.Get("qBias"), "qBias", true);
  JsTensor* v_bias = unwrap_tensor(env, o.Get("vBias"), "vBias", true);
  JsTensor* scale_mul = unwrap_tensor(env, o.Get("scaleMul"), "scaleMul", true);
  JsTensor* positions = unwrap_tensor(env, o.Get("positions"), "positions", true);
  JsTensor* q = unwrap_tensor(env, o.Get("q"), "q", false);
  JsTensor* k = unwrap_tensor(env, o.Get("k"), "k", true);
  JsTensor* v = unwrap_tensor(env, o.Get("v"), "v", true);
  if ((k == nullptr) != (v == nullptr)) throw_coded(env, "ERR_INVALID_ARG", "k and v go together (both, or neither for q only)");
  const TensorState& Q = *q->state;
  expect_rank(env, Q, 4, "q", "[batch, heads, tokens, headDim]");
  expect_float(env, Q, "q");
  QkNormRopeArgs a;
  a.batch = int(Q.shape[0]);
  a.heads = int(Q.shape[1]);
  a.tokens = int(Q.shape[2]);
  a.head_dim = int(Q.shape[3]);
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.head_dim > 256)
    throw_coded(env, "ERR_SHAPE", "headDim must be even and in [2, 256], got " + std::to_string(a.head_dim));
  const TensorState& QKV = *qkv->state;
  expect_rank(env, QKV, 3, "qkv", "[batch, tokens, 3 * heads * headDim]");
  expect_float(env, QKV, "qkv");
  expect_dim(env, QKV, 0, a.batch, "qkv", "batch");
  expect_dim(env, QKV, 1, a.tokens, "qkv", "tokens");
  expect_dim(env, QKV, 2, int64_t(3) * a.heads * a.head_dim, "qkv", "3 * heads * headDim");
  if (k) {
    expect_rank(env, *k->state, 4, "k", "[batch, heads, capacity, headDim]");
    expect_float(env, *k->state, "k");
    expect_dim(env, *k->state, 0, a.batch, "k", "batch");
    expect_dim(env, *k->state, 1, a.heads, "k", "heads");
    expect_dim(env, *k->state, 3, a.head_dim, "k", "headDim");
    expect_dtype(env, *v->state, k->state->dtype, "v (the dtype of k)");
    expect_same_shape(env, *v->state, k->state->shape, "v", "k");
    a.kv_cap = int(k->state->shape[2]);
    a.kv_offset = get_int(env, o, "kvOffset", 0);
    if (a.kv_offset < 0 || int64_t(a.kv_offset) + a.tokens > a.kv_cap)
      throw_coded(env, "ERR_SHAPE", "kvOffset " + std::to_string(a.kv_offset) + " + tokens " + std::to_string(a.tokens) +
                                        " exceeds the K/V capacity " + std::to_string(a.kv_cap));
  }
  for (JsTensor* t : {q_bias, v_bias}) {
    if (!t) continue;
    expect_rank(env, *t->state, 1, "qBias/vBias", "[heads * headDim]");
    expect_dtype(env, *t->state, DType::f32, "qBias/vBias");
    expect_dim(env, *t->state, 0, int64_t(a.heads) * a.head_dim, "qBias/vBias", "heads * headDim");
  }
  if (scale_mul) {
    expect_rank(env, *scale_mul->state, 1, "scaleMul", "[heads]");
    expect_dtype(env, *scale_mul->state, DType::f32, "scaleMul");
    expect_dim(env, *scale_mul->state, 0, a.heads, "scaleMul", "heads");
  }
  if (positions) {
    if (a.head_dim % 4 != 0)
      throw_coded(env, "ERR_SHAPE", "2-D RoPE needs headDim a multiple of 4, got " + std::to_string(a.head_dim));
    expect_rank(env, *positions->state, 2, "positions", "[tokens, 2]");
    expect_dtype(env, *positions->state, DType::i32, "positions");
    expect_dim(env, *positions->state, 0, a.tokens, "positions", "tokens");
    expect_dim(env, *positions->state, 1, 2, "positions", "the (y, x) axis");
  }
  Napi::Value norm = o.Get("normalize");
  if (!norm.IsUndefined() && !norm.IsBoolean()) throw_coded(env, "ERR_INVALID_ARG", "normalize must be a boolean");
  a.normalize = norm.IsUndefined() || norm.As<Napi::Boolean>().Value();
  if (!a.normalize && scale_mul) throw_coded(env, "ERR_INVALID_ARG", "scaleMul applies only with normalize");
  const auto ins = {&QKV, state_of(q_bias), state_of(v_bias), state_of(scale_mul), state_of(positions)};
  for (JsTensor* out : {q, k, v})
    if (out) check_not_alias(env, out->state.get(), ins, "a qkNormRope output");
  if (k && (q->state->buffer == k->state->buffer || q->state->buffer == v->state->buffer ||
            k->state->buffer == v->state->buffer))
    throw_coded(env, "ERR_INVALID_ARG", "q, k and v must be distinct tensors");
  a.qkv_dtype = QKV.dtype;
  a.q_dtype = Q.dtype;
  a.kv_dtype = k ? k->state->dtype : Q.dtype;
  Holder h;
  a.qkv = h.ptr(qkv);
  a.q_bias = static_cast<const float*>(h.ptr(q_bias));
  a.v_bias = static_cast<const float*>(h.ptr(v_bias));
  a.scale_mul = static_cast<const float*>(h.ptr(scale_mul));
  a.positions = static_cast<const int32_t*>(h.ptr(positions));
  a.q = h.ptr(q);
  a.k = h.ptr(k);
  a.v = h.ptr(v);
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->qk_norm_rope(a); }, "qk_norm_rope");
  return env.Undefined();
}

// crossAttention({ q, kv? | k?, v?, cuSeqlens, out, scale? })
Napi::Value JsEngine::CrossAttention(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "crossAttention(args: object)");
  JsTensor* q = unwrap_tensor(env, o.Get("q"), "q", false);
  JsTensor* kv = unwrap_tensor(env, o.Get("kv"), "kv", true);
  JsTensor* k = unwrap_tensor(env, o.Get("k"), "k", true);
  JsTensor* v = unwrap_tensor(env, o.Get("v"), "v", true);
  JsTensor* cu = unwrap_tensor(env, o.Get("cuSeqlens"), "cuSeqlens", false);
  JsTensor* out = unwrap_tensor(env, o.Get("out"), "out", false);
  const TensorState& Q = *q->state;
  expect_rank(env, Q, 4, "q", "[batch, tokens, heads, headDim]");
  expect_float(env, Q, "q");
  CrossAttentionArgs a;
  a.batch = int(Q.shape[0]);
  a.tokens = int(Q.shape[1]);
  a.heads = int(Q.shape[2]);
  a.head_dim = int(Q.shape[3]);
  a.dtype = Q.dtype;
  if (a.head_dim <= 0 || a.head_dim > 256)
    throw_coded(env, "ERR_SHAPE", "headDim must be in [1, 256], got " + std::to_string(a.head_dim));
  if (kv) {
    if (k || v) throw_coded(env, "ERR_INVALID_ARG", "give kv (fused) or k and v, not both");
    expect_rank(env, *kv->state, 4, "kv", "[nText, 2, heads, headDim]");
    expect_dtype(env, *kv->state, a.dtype, "kv (the dtype of q)");
    expect_dim(env, *kv->state, 1, 2, "kv", "the K/V axis");
    expect_dim(env, *kv->state, 2, a.heads, "kv", "heads");
    expect_dim(env, *kv->state, 3, a.head_dim, "kv", "headDim");
    a.n_text = int(kv->state->shape[0]);
    a.kv_row_stride = int64_t(2) * a.heads * a.head_dim;
  } else {
    if (!k || !v) throw_coded(env, "ERR_INVALID_ARG", "crossAttention needs kv, or k and v");
    for (JsTensor* t : {k, v}) {
      expect_rank(env, *t->state, 3, "k/v", "[nText, heads, headDim]");
      expect_dtype(env, *t->state, a.dtype, "k/v (the dtype of q)");
      expect_dim(env, *t->state, 1, a.heads, "k/v", "heads");
      expect_dim(env, *t->state, 2, a.head_dim, "k/v", "headDim");
    }
    expect_dim(env, *v->state, 0, k->state->shape[0], "v", "nText");
    a.n_text = int(k->state->shape[0]);
    a.kv_row_stride = int64_t(a.heads) * a.head_dim;
  }
  expect_rank(env, *cu->state, 1, "cuSeqlens", "[batch + 1]");
  expect_dtype(env, *cu->state, DType::i32, "cuSeqlens");
  expect_dim(env, *cu->state, 0, int64_t(a.batch) + 1, "cuSeqlens", "batch + 1");
  expect_dtype(env, *out->state, a.dtype, "out (the dtype of q)");
  expect_same_shape(env, *out->state, Q.shape, "out", "q");
  a.scale = float(get_number(env, o, "scale", 1.0 / std::sqrt(double(a.head_dim))));
  check_not_alias(env, out->state.get(), {&Q, state_of(kv), state_of(k), state_of(v), cu->state.get()},
                  "crossAttention output");
  Holder h;
  a.q = h.ptr(q);
  if (kv) {
    a.k = h.ptr(kv);
    a.v = static_cast<const uint8_t*>(a.k) + size_t(a.heads) * a.head_dim * dtype_size(a.dtype);
  } else {
    a.k = h.ptr(k);
    a.v = h.ptr(v);
  }
  a.cu_seqlens = static_cast<const int32_t*>(h.ptr(cu));
  a.out = h.ptr(out);
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->cross_attention(a); }, "cross_attention");
  return env.Undefined();
}

// cfgTau({ logits, out, cfg?, tau? })
Napi::Value JsEngine::CfgTau(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "cfgTau(args: object)");
  JsTensor* z = unwrap_tensor(env, o.Get("logits"), "logits", false);
  JsTensor* out = unwrap_tensor(env, o.Get("out"), "out", false);
  const TensorState& Z = *z->state;
  const TensorState& O = *out->state;
  expect_dtype(env, Z, DType::f32, "logits");
  expect_dtype(env, O, DType::f32, "out");
  if (Z.shape.empty() || O.shape.size() != Z.shape.size())
    throw_coded(env, "ERR_SHAPE", "logits [rows, ...] and out [batch, ...] must have the same rank (at least 1)");
  for (size_t i = 1; i < Z.shape.size(); ++i) expect_dim(env, O, i, Z.shape[i], "out", "a trailing axis of logits");
  CfgTauArgs a;
  const double cfg = get_number(env, o, "cfg", 1.0);
  const double tau = get_number(env, o, "tau", 1.0);
  if (tau == 0.0) throw_coded(env, "ERR_INVALID_ARG", "tau must not be 0");
  if (Z.shape[0] == 2 * O.shape[0]) {
    a.mixed = true;
  } else if (Z.shape[0] == O.shape[0]) {
    if (cfg != 1.0)
      throw_coded(env, "ERR_SHAPE", "cfg " + std::to_string(cfg) + " needs logits with 2 * batch rows (conditional first)");
    a.mixed = false;
  } else {
    throw_coded(env, "ERR_SHAPE", "logits must have batch or 2 * batch rows (out has " + std::to_string(O.shape[0]) +
                                      "), got " + std::to_string(Z.shape[0]));
  }
  check_not_alias(env, &O, {&Z}, "cfgTau output");
  a.batch = int(O.shape[0]);
  a.row_size = O.shape[0] > 0 ? O.numel() / O.shape[0] : 0;
  a.cfg = float(cfg);
  a.uncond_weight = float(1.0 - cfg);
  a.tau = float(tau);
  Holder h;
  a.z = static_cast<const float*>(h.ptr(z));
  a.out = static_cast<float*>(h.ptr(out));
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->cfg_tau(a); }, "cfg_tau");
  return env.Undefined();
}

void top_k_top_p(Napi::Env env, Napi::Object o, int* top_k, double* top_p) {
  *top_k = get_int(env, o, "topK", 0);
  *top_p = get_number(env, o, "topP", 0.0);
  if (*top_p >= 1.0) throw_coded(env, "ERR_INVALID_ARG", "topP must be below 1 (0 or less: off)");
}

// topkTopPMask({ logits, out, topK?, topP? })
Napi::Value JsEngine::TopkTopPMask(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "topkTopPMask(args: object)");
  JsTensor* z = unwrap_tensor(env, o.Get("logits"), "logits", false);
  JsTensor* out = unwrap_tensor(env, o.Get("out"), "out", false);
  const TensorState& Z = *z->state;
  if (Z.shape.empty() || Z.shape.back() <= 0) throw_coded(env, "ERR_SHAPE", "logits must be [..., V] with V >= 1");
  expect_dtype(env, Z, DType::f32, "logits");
  expect_dtype(env, *out->state, DType::f32, "out");
  expect_same_shape(env, *out->state, Z.shape, "out", "logits");
  TopkToppMaskArgs a;
  top_k_top_p(env, o, &a.top_k, &a.top_p);
  a.vocab = int(Z.shape.back());
  a.rows = Z.numel() / a.vocab;
  Holder h;
  a.logits = static_cast<const float*>(h.ptr(z));
  a.out = static_cast<float*>(h.ptr(out));
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->topk_topp_mask(a); }, "topk_topp_mask");
  return env.Undefined();
}

// sampleBits({ logits, out, topK?, topP?, seed, scaleIndex })
Napi::Value JsEngine::SampleBits(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  EngineCore& c = live(env);
  Napi::Object o = args_object(env, info, "sampleBits(args: object)");
  JsTensor* z = unwrap_tensor(env, o.Get("logits"), "logits", false);
  JsTensor* out = unwrap_tensor(env, o.Get("out"), "out", false);
  const TensorState& Z = *z->state;
  const TensorState& O = *out->state;
  expect_dtype(env, Z, DType::f32, "logits");
  if (Z.shape.size() < 2 || Z.shape.back() % 2 != 0)
    throw_coded(env, "ERR_SHAPE", "logits must be [batch, ..., 2k] (pairs of bit logits), got " + shape_string(Z.shape));
  if (O.dtype != DType::u8 && O.dtype != DType::i32)
    throw_coded(env, "ERR_DTYPE", std::string("out must be u8 or i32, got ") + dtype_name(O.dtype));
  if (O.shape.empty() || O.shape[0] != Z.shape[0] || O.numel() * 2 != Z.numel())
    throw_coded(env, "ERR_SHAPE", "out must be [batch, ...] with one entry per logit pair (" +
                                      std::to_string(Z.numel() / 2) + "), got " + shape_string(O.shape));
  SampleBitsArgs a;
  top_k_top_p(env, o, &a.top_k, &a.top_p);
  const double seed = get_number(env, o, "seed");
  if (seed < 0 || seed > 9007199254740991.0 || seed != std::floor(seed))
    throw_coded(env, "ERR_INVALID_ARG", "seed must be an integer in [0, 2^53)");
  a.seed = uint64_t(seed);
  const int scale_index = get_int(env, o, "scaleIndex");
  if (scale_index < 0) throw_coded(env, "ERR_INVALID_ARG", "scaleIndex must be >= 0");
  a.scale_index = uint32_t(scale_index);
  a.batch = int(Z.shape[0]);
  a.pairs = a.batch > 0 ? Z.numel() / 2 / a.batch : 0;
  a.out_dtype = O.dtype;
  Holder h;
  a.logits = static_cast<const float*>(h.ptr(z));
  a.out = h.ptr(out);
  Backend* backend = &c.backend();
  c.enqueue([backend, a, hold = std::move(h.hold)] { backend->sample_bits(a); }, "sample_bits");
  return env.Undefined();
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
  constructor = new Napi::FunctionReference(Napi::Persistent(f));
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
  Napi::Object obj = constructor->New({});
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
