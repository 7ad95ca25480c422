// Runs the real kernels/cuda kernels through the emu backend (under the test sanitizer) and compares them
// with the CPU backend on small random cases, including shapes that are not tile multiples, the tensor-core
// and SIMT paths, and bad index lists (both backends must report the same status code).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../../kernels/cuda/ops.cuh"
#include "../../kernels/emu/emu_backend.h"
#include "selftest.h"

namespace {

using scalekv::Backend;
using scalekv::DType;

uint16_t to_bf16(float f) { return skv_emu::float_to_bf16_bits(f); }
float from_bf16(uint16_t b) { return skv_emu::bf16_bits_to_float(b); }

// A host tensor of f32 values, stored on a backend as f32 or bf16.
struct HostTensor {
  std::vector<float> v;
  DType dtype = DType::f32;
  std::vector<unsigned char> bytes() const {
    std::vector<unsigned char> out(v.size() * scalekv::dtype_size(dtype));
    for (size_t i = 0; i < v.size(); ++i) {
      if (dtype == DType::f32) std::memcpy(&out[i * 4], &v[i], 4);
      else { const uint16_t b = to_bf16(v[i]); std::memcpy(&out[i * 2], &b, 2); }
    }
    return out;
  }
};

std::vector<float> decode(const std::vector<unsigned char>& raw, DType dtype) {
  std::vector<float> v(raw.size() / scalekv::dtype_size(dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DType::f32) std::memcpy(&v[i], &raw[i * 4], 4);
    else { uint16_t b; std::memcpy(&b, &raw[i * 2], 2); v[i] = from_bf16(b); }
  }
  return v;
}

// Buffers on one backend, freed with it.
struct Device {
  std::unique_ptr<Backend> be;
  std::vector<void*> owned;
  explicit Device(std::unique_ptr<Backend> b) : be(std::move(b)) {}
  ~Device() { for (void* p : owned) be->free(p); }
  void* put(const void* src, size_t bytes) {
    void* p = be->alloc(bytes);
    owned.push_back(p);
    if (src) be->upload(p, src, bytes);
    return p;
  }
  void* put(const HostTensor& t) { const auto b = t.bytes(); return put(b.data(), b.size()); }
  template <class T> T* put(const std::vector<T>& v) { return static_cast<T*>(put(v.data(), v.size() * sizeof(T))); }
  void* zeros(size_t bytes) { void* p = put(nullptr, bytes); be->fill_u8(p, 0, bytes); return p; }
  std::vector<unsigned char> get(const void* p, size_t bytes) {
    std::vector<unsigned char> out(bytes);
    be->download(out.data(), p, bytes);
    return out;
  }
  std::vector<float> get_f32(const void* p, size_t n) { return decode(get(p, n * 4), DType::f32); }
  // Runs `op`, synchronizes, and returns the status code (0 when fine).
  template <class F> int run(F op) {
    try {
      op();
      be->synchronize();
    } catch (const scalekv::BackendError& e) {
      return static_cast<int>(e.code);
    }
    return 0;
  }
};

std::vector<float> random_vec(std::mt19937& rng, size_t n, float lo = -1, float hi = 1) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

int count_mismatches(const std::vector<float>& a, const std::vector<float>& b, double atol, double rtol,
                     const std::string& what) {
  int bad = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const bool both_nan = std::isnan(a[i]) && std::isnan(b[i]);
    const bool same_inf = std::isinf(a[i]) && a[i] == b[i];
    if (both_nan || same_inf || std::fabs(a[i] - b[i]) <= atol + rtol * std::fabs(b[i])) continue;
    if (bad++ < 3) std::fprintf(stderr, "  %s[%zu]: emu %.7g cpu %.7g\n", what.c_str(), i, a[i], b[i]);
  }
  if (a.size() != b.size()) ++bad;
  return bad;
}

// The contiguous K/V layout [rows, heads, cap, head_dim]: one page of cap tokens per row, no table.
scalekv::KvPages contiguous_pages(int rows, int cap) {
  scalekv::KvPages p;
  p.page_tokens = cap;
  p.pages = rows;
  return p;
}

struct AttnCase {
  DType dtype;
  int rows, heads, head_dim, lq, hist_cap, hist_len, n_gather, lc, n_window;
  bool bad_gather = false;
  float scale_mul = 1.0f;  // scale = scale_mul / sqrt(head_dim): negative and zero scales too
};

void check_attention(const AttnCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const size_t pairs = static_cast<size_t>(c.rows) * c.heads;
  HostTensor q{random_vec(rng, pairs * c.lq * c.head_dim), c.dtype};
  HostTensor hk{random_vec(rng, pairs * c.hist_cap * c.head_dim), c.dtype};
  HostTensor hv{random_vec(rng, pairs * c.hist_cap * c.head_dim), c.dtype};
  HostTensor ck{random_vec(rng, pairs * c.lc * c.head_dim), c.dtype};
  HostTensor cv{random_vec(rng, pairs * c.lc * c.head_dim), c.dtype};
  std::vector<int32_t> gather(pairs * c.n_gather), window_rows(static_cast<size_t>(c.n_window));
  for (auto& g : gather) g = static_cast<int32_t>(rng() % static_cast<unsigned>(c.hist_len));
  if (c.bad_gather && !gather.empty()) gather[gather.size() / 2] = c.hist_len;
  for (auto& w : window_rows) w = static_cast<int32_t>(rng() % static_cast<unsigned>(c.lq));
  const int n_keys = (c.n_gather ? c.n_gather : c.hist_len) + c.lc;
  const size_t out_n = pairs * c.lq * c.head_dim, wl_n = pairs * c.n_window * n_keys, lse_n = pairs * c.n_window;

  std::vector<float> outs[2][3];
  int codes[2];
  for (int b = 0; b < 2; ++b) {
    Device d(b == 0 ? scalekv::make_emu_backend(2) : scalekv::make_cpu_backend(2));
    scalekv::AttentionArgs a;
    a.rows = c.rows; a.heads = c.heads; a.head_dim = c.head_dim; a.lq = c.lq;
    a.hist_cap = c.hist_cap; a.hist_len = c.hist_len; a.n_gather = c.n_gather; a.lc = c.lc;
    a.hist_pages = contiguous_pages(c.rows, c.hist_cap);
    a.dtype = c.dtype; a.scale = c.scale_mul / std::sqrt(static_cast<float>(c.head_dim));
    a.q = d.put(q); a.hist_k = d.put(hk); a.hist_v = d.put(hv);
    a.cur_k = c.lc ? d.put(ck) : nullptr; a.cur_v = c.lc ? d.put(cv) : nullptr;
    a.gather = c.n_gather ? d.put(gather) : nullptr;
    a.out = d.zeros(out_n * scalekv::dtype_size(c.dtype));
    a.n_window = c.n_window;
    if (c.n_window) {
      a.window_rows = d.put(window_rows);
      a.window_logits = static_cast<float*>(d.zeros(wl_n * 4));
      a.window_lse = static_cast<float*>(d.zeros(lse_n * 4));
    }
    codes[b] = d.run([&] { d.be->attention(a); });
    outs[b][0] = decode(d.get(a.out, out_n * scalekv::dtype_size(c.dtype)), c.dtype);
    if (c.n_window) {
      outs[b][1] = d.get_f32(a.window_logits, wl_n);
      outs[b][2] = d.get_f32(a.window_lse, lse_n);
    }
  }
  CHECK(codes[0] == codes[1]);
  if (codes[1] != 0) return;
  const double tol = c.dtype == DType::bf16 ? 1e-2 : 1e-5;
  CHECK(count_mismatches(outs[0][0], outs[1][0], tol, tol, "out") == 0);
  CHECK(count_mismatches(outs[0][1], outs[1][1], 1e-5, 1e-5, "window_logits") == 0);
  CHECK(count_mismatches(outs[0][2], outs[1][2], 1e-5, 1e-5, "window_lse") == 0);
}

struct EvictCase {
  DType dtype;
  int rows, heads, head_dim, hist_cap, hist_len, lc, n_keep;
  bool unsorted = false;
  bool repeats = false;  // draw with replacement: non-decreasing lists with repeated indices
};

void check_evict(const EvictCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const size_t pairs = static_cast<size_t>(c.rows) * c.heads;
  HostTensor hk{random_vec(rng, pairs * c.hist_cap * c.head_dim), c.dtype};
  HostTensor hv{random_vec(rng, pairs * c.hist_cap * c.head_dim), c.dtype};
  HostTensor ck{random_vec(rng, pairs * c.lc * c.head_dim), c.dtype};
  HostTensor cv{random_vec(rng, pairs * c.lc * c.head_dim), c.dtype};
  std::vector<int32_t> keep;
  for (size_t p = 0; p < pairs; ++p) {  // a sorted random subset of [0, hist_len + lc), or a sorted sample
    std::vector<int32_t> all(static_cast<size_t>(c.hist_len + c.lc));
    for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int32_t>(i);
    if (c.repeats) {
      all.resize(static_cast<size_t>(c.n_keep));
      for (auto& x : all) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(c.hist_len + c.lc));
    } else {
      std::shuffle(all.begin(), all.end(), rng);
      all.resize(static_cast<size_t>(c.n_keep));
    }
    std::sort(all.begin(), all.end());
    keep.insert(keep.end(), all.begin(), all.end());
  }
  if (c.unsorted && c.n_keep > 1) std::swap(keep[keep.size() - 1], keep[keep.size() - 2]);
  const size_t hist_bytes = pairs * c.hist_cap * c.head_dim * scalekv::dtype_size(c.dtype);
  std::vector<unsigned char> got[2][2];
  int codes[2];
  for (int b = 0; b < 2; ++b) {
    Device d(b == 0 ? scalekv::make_emu_backend(2) : scalekv::make_cpu_backend(2));
    scalekv::EvictCompactArgs a;
    a.rows = c.rows; a.heads = c.heads; a.head_dim = c.head_dim; a.hist_cap = c.hist_cap;
    a.hist_pages = contiguous_pages(c.rows, c.hist_cap);
    a.hist_len = c.hist_len; a.lc = c.lc; a.n_keep = c.n_keep; a.dtype = c.dtype; a.repeats = c.repeats;
    a.hist_k = d.put(hk); a.hist_v = d.put(hv);
    a.cur_k = c.lc ? d.put(ck) : nullptr; a.cur_v = c.lc ? d.put(cv) : nullptr;
    a.keep = d.put(keep);
    codes[b] = d.run([&] { d.be->evict_compact(a); });
    got[b][0] = d.get(a.hist_k, hist_bytes);
    got[b][1] = d.get(a.hist_v, hist_bytes);
  }
  CHECK(codes[0] == codes[1]);
  CHECK(got[0][0] == got[1][0]);  // a pure move: bit-exact
  CHECK(got[0][1] == got[1][1]);
}

struct SelCase {
  int rows, heads, n_window, n_keys, budget, kernel;
  scalekv::ScoreMode mode;
  scalekv::Pooling pooling;
  bool bad_window = false;
};

void check_selection(const SelCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const size_t pairs = static_cast<size_t>(c.rows) * c.heads;
  const std::vector<float> logits = random_vec(rng, pairs * c.n_window * c.n_keys, -4, 4);
  std::vector<float> lse(pairs * c.n_window);
  for (size_t pw = 0; pw < lse.size(); ++pw) {
    double s = 0;
    for (int j = 0; j < c.n_keys; ++j) s += std::exp(static_cast<double>(logits[pw * c.n_keys + j]));
    lse[pw] = static_cast<float>(std::log(s));
  }
  std::vector<int32_t> window_keys(static_cast<size_t>(c.n_window));
  for (size_t i = 0; i < window_keys.size(); ++i) window_keys[i] = c.n_keys - 1 - static_cast<int32_t>(3 * i);
  if (c.bad_window) window_keys[0] = c.n_keys;
  std::vector<int32_t> out[2];
  std::vector<float> pooled[2];
  int codes[2];
  for (int b = 0; b < 2; ++b) {
    Device d(b == 0 ? scalekv::make_emu_backend(2) : scalekv::make_cpu_backend(2));
    scalekv::SelectionArgs a;
    a.rows = c.rows; a.heads = c.heads; a.n_window = c.n_window; a.n_keys = c.n_keys; a.budget = c.budget;
    a.mode = c.mode; a.pooling = c.pooling; a.kernel = c.kernel;
    a.logits = d.put(logits); a.lse = d.put(lse); a.window_keys = d.put(window_keys);
    a.out = static_cast<int32_t*>(d.zeros(pairs * c.budget * 4));
    a.pooled_scores = static_cast<float*>(d.zeros(pairs * c.n_keys * 4));
    codes[b] = d.run([&] { d.be->selection(a); });
    const auto raw = d.get(a.out, pairs * c.budget * 4);
    out[b].resize(pairs * c.budget);
    std::memcpy(out[b].data(), raw.data(), raw.size());
    pooled[b] = d.get_f32(a.pooled_scores, pairs * c.n_keys);
  }
  CHECK(codes[0] == codes[1]);
  if (codes[1] != 0) return;
  CHECK(out[0] == out[1]);
  CHECK(count_mismatches(pooled[0], pooled[1], 1e-5, 1e-5, "pooled") == 0);
}

struct ConvCase {
  int batch, in, out, height, width, kernel;
  bool bias;
  DType dtype = DType::bf16, weight_dtype = DType::bf16;
  bool misalign = false;  // x, weight, bias and out one element past a 16-byte boundary
};

// conv2d on the emu backend against a float64 reference of the stored (bf16-rounded) inputs: bf16 output within
// about one bf16 ulp (the rounding of the exact result, plus f32 accumulation), f32 within 1e-5.
void check_conv2d(const ConvCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const int k = c.kernel, p = (k - 1) / 2, H = c.height, W = c.width;
  const size_t hw = static_cast<size_t>(H) * W, out_n = c.batch * c.out * hw;
  HostTensor x{random_vec(rng, c.batch * c.in * hw), c.dtype};
  HostTensor w{random_vec(rng, static_cast<size_t>(c.out) * c.in * k * k, -0.5f, 0.5f), c.weight_dtype};
  HostTensor bias{random_vec(rng, c.out), c.weight_dtype};
  // The reference sees what the backend stores.
  const auto stored = [](const HostTensor& t) { return decode(t.bytes(), t.dtype); };
  const std::vector<float> xs = stored(x), ws = stored(w), bs = stored(bias);
  std::vector<double> ref(out_n);
  for (int b = 0; b < c.batch; ++b)
    for (int o = 0; o < c.out; ++o)
      for (int y = 0; y < H; ++y)
        for (int xx = 0; xx < W; ++xx) {
          double acc = c.bias ? bs[o] : 0.0;
          for (int i = 0; i < c.in; ++i)
            for (int ky = 0; ky < k; ++ky)
              for (int kx = 0; kx < k; ++kx) {
                const int yy = y + ky - p, xs_ = xx + kx - p;
                if (yy < 0 || yy >= H || xs_ < 0 || xs_ >= W) continue;
                acc += double(ws[((size_t(o) * c.in + i) * k + ky) * k + kx]) * xs[(size_t(b) * c.in + i) * hw + yy * W + xs_];
              }
          ref[(size_t(b) * c.out + o) * hw + y * W + xx] = acc;
        }

  Device d(scalekv::make_emu_backend(2));
  const size_t xsz = scalekv::dtype_size(c.dtype), wsz = scalekv::dtype_size(c.weight_dtype);
  const auto put = [&](const HostTensor& t, size_t esz) {
    const auto bytes = t.bytes();
    if (!c.misalign) return d.put(bytes.data(), bytes.size());
    std::vector<unsigned char> shifted(esz);  // one leading element
    shifted.insert(shifted.end(), bytes.begin(), bytes.end());
    return static_cast<void*>(static_cast<unsigned char*>(d.put(shifted.data(), shifted.size())) + esz);
  };
  scalekv::Conv2dArgs a;
  a.batch = c.batch; a.in_channels = c.in; a.out_channels = c.out; a.height = H; a.width = W; a.kernel = k;
  a.dtype = c.dtype; a.weight_dtype = c.weight_dtype;
  a.x = put(x, xsz); a.weight = put(w, wsz); a.bias = c.bias ? put(bias, wsz) : nullptr;
  unsigned char* out_base = static_cast<unsigned char*>(d.zeros((out_n + 1) * xsz));
  a.out = out_base + (c.misalign ? xsz : 0);
  CHECK(d.run([&] { d.be->conv2d(a); }) == 0);
  const std::vector<float> got = decode(d.get(a.out, out_n * xsz), c.dtype);
  if (c.misalign) CHECK(d.get(out_base, xsz) == std::vector<unsigned char>(xsz, 0));  // nothing before out
  double scale = 1;
  for (double v : ref) scale = std::max(scale, std::fabs(v));
  std::vector<float> want(ref.begin(), ref.end());
  const bool bf16_out = c.dtype == DType::bf16;
  const int bad = count_mismatches(got, want, 1e-5 * scale, bf16_out ? 1.0 / 128 : 1e-5, "conv2d out");
  if (bad) std::fprintf(stderr, "  conv2d case B%d I%d O%d %dx%d k%d bias=%d\n", c.batch, c.in, c.out, H, W, k, c.bias);
  CHECK(bad == 0);
}

struct GemmCase {
  int m, n, k;
  DType x, w, y;
  bool bias;
  scalekv::Epilogue epilogue;
  const char* slow_path = nullptr;  // the reason the emu launcher must note, if any
  int x_offset = 0, y_offset = 0;   // bytes past a 256-aligned allocation (an unaligned base)
  DType bias_dtype = DType::f32;
};

// Runs one gemm on a fresh backend; y has 64 guard bytes after it that must stay untouched.
std::vector<float> run_gemm(std::unique_ptr<Backend> be, const GemmCase& c, const HostTensor& x, const HostTensor& w,
                            const HostTensor& bias, scalekv::cuda_ops::SlowPath* note) {
  Device d(std::move(be));
  const size_t y_bytes = static_cast<size_t>(c.m) * c.n * scalekv::dtype_size(c.y), guard = 64;
  const auto xb = x.bytes();
  std::vector<unsigned char> x_host(c.x_offset + xb.size());
  std::memcpy(x_host.data() + c.x_offset, xb.data(), xb.size());
  scalekv::GemmArgs a;
  a.m = c.m; a.n = c.n; a.k = c.k;
  a.x_dtype = x.dtype; a.w_dtype = w.dtype; a.bias_dtype = bias.dtype; a.y_dtype = c.y; a.epilogue = c.epilogue;
  a.x = static_cast<unsigned char*>(d.put(x_host.data(), x_host.size())) + c.x_offset;
  a.w = d.put(w);
  a.bias = c.bias ? d.put(bias) : nullptr;
  unsigned char* y = static_cast<unsigned char*>(d.put(nullptr, c.y_offset + y_bytes + guard));
  d.be->fill_u8(y, 0x7f, c.y_offset + y_bytes + guard);
  a.y = y + c.y_offset;
  (void)scalekv::cuda_ops::take_slow_path();
  CHECK(d.run([&] { d.be->gemm(a); }) == 0);
  if (note) *note = scalekv::cuda_ops::take_slow_path();
  const auto raw = d.get(y, c.y_offset + y_bytes + guard);
  for (size_t i = 0; i < c.y_offset; ++i) CHECK(raw[i] == 0x7f);
  for (size_t i = 0; i < guard; ++i) CHECK(raw[c.y_offset + y_bytes + i] == 0x7f);
  return decode(std::vector<unsigned char>(raw.begin() + c.y_offset, raw.begin() + c.y_offset + y_bytes), c.y);
}

void check_gemm(const GemmCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  HostTensor x{random_vec(rng, static_cast<size_t>(c.m) * c.k), c.x};
  const float ws = 1.0f / std::sqrt(static_cast<float>(std::max(c.k, 1)));
  HostTensor w{random_vec(rng, static_cast<size_t>(c.n) * c.k, -ws, ws), c.w};
  HostTensor bias{random_vec(rng, static_cast<size_t>(c.n)), c.bias_dtype};
  scalekv::cuda_ops::SlowPath note;
  const std::vector<float> emu = run_gemm(scalekv::make_emu_backend(2), c, x, w, bias, &note);
  const std::vector<float> cpu = run_gemm(scalekv::make_cpu_backend(2), c, x, w, bias, nullptr);
  const double tol = c.y == DType::bf16 ? 1e-2 : 1e-5;
  CHECK(count_mismatches(emu, cpu, tol, tol, "gemm y") == 0);
  if (c.slow_path) {
    CHECK(note.op && std::strcmp(note.op, "gemm") == 0);
    CHECK(note.reason && std::strcmp(note.reason, c.slow_path) == 0);
  } else {
    CHECK(note.op == nullptr && note.reason == nullptr);
  }
  // f32 x against bf16 w means rounding x to bf16, then the bf16 product: the emu result must equal, bit for bit,
  // the same kernel fed the rounded x as bf16 (same path: same tiles, same accumulation order).
  if (c.x == DType::f32 && c.w == DType::bf16) {
    HostTensor xr{x.v, DType::bf16};
    for (float& v : xr.v) v = from_bf16(to_bf16(v));
    const std::vector<float> emu_rounded = run_gemm(scalekv::make_emu_backend(2), c, xr, w, bias, nullptr);
    CHECK(count_mismatches(emu, emu_rounded, 0, 0, "gemm y (f32 x vs pre-rounded bf16 x)") == 0);
  }
}

}  // namespace

EMU_TEST(attention_emu_matches_cpu) {
  const AttnCase cases[] = {
      {DType::bf16, 2, 2, 64, 37, 48, 33, 0, 7, 3},      // tensor cores, dense history
      {DType::bf16, 1, 3, 128, 20, 70, 65, 30, 5, 2},    // tensor cores, gathered history
      {DType::bf16, 1, 2, 40, 19, 24, 17, 0, 3, 0},      // SIMT bf16 (head dim not 64/128)
      {DType::f32, 2, 1, 64, 23, 40, 40, 12, 9, 4},      // SIMT f32, gathered
      {DType::f32, 1, 1, 100, 5, 8, 0, 0, 6, 1},         // no history at all
      {DType::bf16, 1, 2, 64, 16, 16, 16, 0, 0, 0},      // exact tile multiples
  };
  uint32_t seed = 1;
  for (const AttnCase& c : cases) check_attention(c, seed++);
}

// The bf16 tensor-core kernel for both head dims: query counts off the 32-row warp tile and the 64/128-row
// block (1, 5, 33, 64, 65, 100), key counts off the 32/64-key tile (1, 63, 64, 65, 200, 650), gathered and
// contiguous history, window outputs on and off, R > 1. Grids under one wave of 132 SMs split the key tiles
// (the emulator reports 132) when there are at least 4 of them; (rows 2, heads 66, Lq 1) fills the wave.
EMU_TEST(attention_mma_tiles_and_split_kv_match_cpu) {
  uint32_t seed = 40;
  for (const int d : {64, 128}) {
    const AttnCase cases[] = {
        {DType::bf16, 1, 1, d, 1, 4, 0, 0, 1, 0},            // one key, one query
        {DType::bf16, 1, 2, d, 5, 40, 40, 0, 23, 2},         // 63 keys, contiguous
        {DType::bf16, 2, 1, d, 33, 50, 50, 40, 24, 3},       // 64 keys, gathered; 33 rows: second warp tile
        {DType::bf16, 1, 2, d, 100, 70, 60, 0, 5, 0},        // 65 keys; 128-row block with a tail
        {DType::bf16, 1, 1, d, 64, 70, 64, 0, 0, 1},         // exactly one 64-row block, 64 keys
        {DType::bf16, 2, 2, d, 33, 300, 280, 150, 50, 5},    // 200 keys, gathered: split-KV
        {DType::bf16, 1, 2, d, 1, 310, 300, 0, 0, 1},        // Lq 1, 300 contiguous keys: split-KV
        {DType::bf16, 2, 2, d, 100, 900, 800, 640, 10, 4},   // 650 gathered keys (ScaleKV-like): split-KV
        {DType::bf16, 1, 1, d, 65, 250, 200, 0, 0, 0},       // 200 keys, 128-row block: split-KV
        {DType::bf16, 2, 66, d, 1, 200, 190, 0, 10, 0},      // 200 keys, 132 blocks: one wave, no split
        {DType::bf16, 1, 2, d, 33, 300, 280, 150, 50, 2, false, -1.0f},  // negative scale, split-KV
        {DType::bf16, 1, 2, d, 5, 40, 40, 0, 25, 0, false, 0.0f},        // zero scale: the mean of V
        {DType::bf16, 1, 1, d, 7, 0, 0, 0, 0, 0},            // no keys at all: zeros
    };
    for (const AttnCase& c : cases) check_attention(c, seed++);
  }
}

EMU_TEST(attention_bad_gather_reports_like_cpu) {
  check_attention({DType::bf16, 1, 2, 64, 9, 20, 12, 8, 3, 0, true}, 99);
}

EMU_TEST(evict_compact_emu_matches_cpu) {
  const EvictCase cases[] = {
      {DType::bf16, 2, 2, 64, 40, 33, 7, 25},
      {DType::f32, 1, 3, 3, 12, 10, 4, 9},   // odd head dim: 4-byte vectors
      {DType::bf16, 1, 1, 5, 9, 9, 2, 9},    // 2-byte vectors, keep everything of a full cache
      {DType::f32, 2, 1, 64, 300, 280, 30, 250},
  };
  uint32_t seed = 10;
  for (const EvictCase& c : cases) check_evict(c, seed++);
}

EMU_TEST(evict_compact_repeats_emu_matches_cpu) {
  const EvictCase cases[] = {
      {DType::bf16, 2, 2, 64, 40, 33, 7, 40, false, true},
      {DType::f32, 1, 3, 3, 300, 200, 100, 300, false, true},  // 4-byte vectors, lists past one scan block
      {DType::bf16, 1, 1, 5, 9, 9, 2, 9, false, true},         // 2-byte vectors
  };
  uint32_t seed = 20;
  for (const EvictCase& c : cases) check_evict(c, seed++);
}

EMU_TEST(evict_compact_unsorted_changes_nothing) { check_evict({DType::f32, 2, 2, 16, 30, 25, 5, 12, true}, 77); }

EMU_TEST(selection_emu_matches_cpu) {
  using scalekv::Pooling;
  using scalekv::ScoreMode;
  const SelCase cases[] = {
      {2, 2, 4, 300, 40, 5, ScoreMode::logits, Pooling::max},
      {1, 3, 3, 1000, 100, 7, ScoreMode::probs, Pooling::avg},
      {1, 1, 2, 17, 17, 1, ScoreMode::logits, Pooling::none},
      {1, 2, 5, 64, 5, 3, ScoreMode::probs, Pooling::max},
  };
  uint32_t seed = 20;
  for (const SelCase& c : cases) check_selection(c, seed++);
}

EMU_TEST(selection_bad_inputs_report_like_cpu) {
  using scalekv::Pooling;
  using scalekv::ScoreMode;
  check_selection({1, 2, 3, 50, 10, 3, ScoreMode::logits, Pooling::max, true}, 30);
  check_selection({1, 2, 3, 50, 2, 3, ScoreMode::logits, Pooling::max}, 31);  // budget < window
}

EMU_TEST(conv2d_emu_matches_float64) {
  const ConvCase cases[] = {
      // bf16 tensor cores; I*k*k % 8 != 0 (weights gathered element-wise): channels off every tile, tiny images
      {1, 3, 8, 1, 1, 3, true},
      {2, 20, 24, 3, 5, 3, false},
      {1, 70, 136, 17, 9, 3, true},      // 20 K tiles through the 3-stage pipeline, 2 out-channel tiles
      {2, 3, 136, 33, 40, 1, true},      // pixel tiles spanning rows and the batch boundary
      {1, 20, 8, 33, 40, 3, true},
      {2, 70, 24, 17, 9, 1, false},
      {1, 3, 24, 1, 1, 1, false},
      // I*k*k % 8 == 0: weights by cp.async (a partial last chunk row, several tiles)
      {1, 32, 136, 33, 40, 3, true},
      {2, 24, 8, 3, 5, 1, true},
      {2, 16, 40, 17, 9, 3, false},
      // misaligned operands: element-wise weights, scalar stores of the output
      {2, 32, 24, 17, 9, 3, true, DType::bf16, DType::bf16, true},
      {1, 24, 8, 3, 5, 1, false, DType::bf16, DType::bf16, true},
      // SIMT: f32 (the exact path), f32 x against bf16 weights, bf16 x against f32 weights
      {2, 20, 24, 17, 9, 3, true, DType::f32, DType::f32},
      {1, 70, 8, 3, 5, 1, true, DType::f32, DType::bf16},
      {1, 20, 24, 3, 5, 3, true, DType::bf16, DType::f32},
  };
  uint32_t seed = 40;
  for (const ConvCase& c : cases) check_conv2d(c, seed++);
}

EMU_TEST(gemm_emu_matches_cpu) {
  using scalekv::Epilogue;
  constexpr DType F = DType::f32, B = DType::bf16;
  const GemmCase cases[] = {
      // Tensor cores, f32 x rounded on load (the model's bf16 mode); K = 40, 264, 1032 are 2, 9, 33 K tiles: fewer
      // tiles than pipeline stages, and the 4-stage ring wrapping around many times. M, N tails on both sides.
      {1, 8, 40, F, B, F, true, Epilogue::none},
      {17, 24, 264, F, B, B, false, Epilogue::gelu_tanh},
      {130, 136, 1032, F, B, F, true, Epilogue::silu},
      {257, 8, 264, F, B, B, true, Epilogue::silu},
      {17, 136, 40, F, B, F, false, Epilogue::none},
      // Tensor cores, bf16 x.
      {257, 136, 264, B, B, B, true, Epilogue::none},
      {130, 24, 40, B, B, F, true, Epilogue::gelu_tanh, nullptr, 0, 0, DType::bf16},
      {1, 136, 1032, B, B, B, false, Epilogue::silu},
      // Output rows that are not 16-byte multiples (N % 4 for f32, N % 8 for bf16) or an unaligned y: per-element stores.
      {33, 27, 64, F, B, F, true, Epilogue::none},
      {9, 20, 48, B, B, B, true, Epilogue::gelu_tanh},
      {40, 136, 40, F, B, F, true, Epilogue::silu, nullptr, 0, 4},
      {40, 136, 40, B, B, B, true, Epilogue::none, nullptr, 0, 2},
      // The 128 x 256 tile (8 warps): at least one such block per SM (132 in the emulator), e.g. 17 x 9 = 153 for
      // M = N = 2100 (tails of 52 rows / columns); K = 40, 72 end in a partial K tile, K = 136 wraps the ring.
      {2100, 2100, 72, F, B, F, true, Epilogue::silu},
      {2100, 2100, 40, B, B, B, true, Epilogue::gelu_tanh, nullptr, 0, 0, DType::bf16},
      {1100, 4100, 136, B, B, F, false, Epilogue::none},
      {2100, 2100, 40, F, B, B, true, Epilogue::none},
      {2100, 2102, 32, F, B, F, true, Epilogue::silu},               // N % 4 != 0: per-element stores
      {2100, 2100, 40, B, B, B, false, Epilogue::none, nullptr, 0, 2},  // unaligned y
      // Just under the rule (16 x 8 = 128 wide blocks < 132 SMs): the 128 x 128 tile.
      {2048, 2048, 40, B, B, F, true, Epilogue::silu},
      // SIMT: f32 x and w is the exact path (no note); bf16 w that cannot take the tensor cores is noted.
      {70, 130, 300, F, F, F, true, Epilogue::none},
      {9, 24, 64, F, B, F, true, Epilogue::none, "x not 16-byte aligned", 4},
      {9, 24, 64, B, B, B, true, Epilogue::silu, "x not 16-byte aligned", 2},
      {5, 17, 36, B, B, F, true, Epilogue::gelu_tanh, "K % 8 != 0"},
      {6, 17, 13, F, B, B, false, Epilogue::none, "K % 8 != 0"},
      {3, 5, 0, F, B, F, true, Epilogue::silu},  // K = 0: y = epilogue(bias), nothing slow about it
  };
  uint32_t seed = 40;
  for (const GemmCase& c : cases) check_gemm(c, seed++);
}

// ---------------------------------------------------------------------------------------------------------
// Paged K/V history: the emu backend against itself. Every op runs once on a contiguous history and once on the
// same history scattered into a pool of pages through a page table; the results must be bit-identical, and pool
// bytes no (row, token) maps to must keep their poison.

namespace {

constexpr unsigned char kPoison = 0xff;  // NaN as f32 and as bf16

// CHECK, naming the seed and the case when it fails.
#define CHECK_SEEDED(cond, seed, what)                                                                              \
  do {                                                                                                              \
    if (!(cond))                                                                                                    \
      ::selftest::record_failure(__FILE__, __LINE__, "CHECK(" #cond ") seed " + std::to_string(seed) + ": " + (what)); \
  } while (0)

// Histories of `rows` rows of cap = table_pages * page_tokens tokens, paged: row r owns its first owned[r] table
// entries (each a distinct page of the shuffled pool, which has spare pages nobody owns); its other entries are -1.
struct PageMap {
  int rows = 0, heads = 0, cap = 0;
  size_t row_bytes = 0;  // head_dim * dtype size
  scalekv::KvPages pages;  // table: null, the host table is `table`
  std::vector<int32_t> table;

  // The pool row of (r, h, t), or -1 where row r owns no page for t.
  int64_t pool_row(int r, int h, int t) const {
    if (table[static_cast<size_t>(r) * pages.table_pages + t / pages.page_tokens] < 0) return -1;
    scalekv::KvPages host = pages;
    host.table = table.data();
    return scalekv::kv_page_row(host, heads, r, h, t);
  }
  size_t pool_bytes() const {
    return static_cast<size_t>(pages.pages) * heads * pages.page_tokens * row_bytes;
  }
  // The pool holding the contiguous [rows, heads, cap, D] history `flat` where pages are owned, poison elsewhere.
  std::vector<unsigned char> scatter(const std::vector<unsigned char>& flat) const {
    std::vector<unsigned char> pool(pool_bytes(), kPoison);
    for (int r = 0; r < rows; ++r)
      for (int h = 0; h < heads; ++h)
        for (int t = 0; t < cap; ++t) {
          const int64_t row = pool_row(r, h, t);
          if (row >= 0)
            std::memcpy(&pool[row * row_bytes], &flat[((static_cast<size_t>(r) * heads + h) * cap + t) * row_bytes],
                        row_bytes);
        }
    return pool;
  }
};

// A random map whose rows own at least the pages covering [0, needed_tokens), a random number more (ragged).
PageMap make_page_map(std::mt19937& rng, int rows, int heads, int cap, size_t row_bytes, int page_tokens,
                      int needed_tokens) {
  PageMap m;
  m.rows = rows;
  m.heads = heads;
  m.cap = cap;
  m.row_bytes = row_bytes;
  m.pages.page_tokens = page_tokens;
  m.pages.table_pages = cap / page_tokens;
  const int needed = (needed_tokens + page_tokens - 1) / page_tokens;
  std::vector<int> owned(static_cast<size_t>(rows));
  int total = 0;
  for (int& o : owned) {
    o = needed + static_cast<int>(rng() % static_cast<uint32_t>(m.pages.table_pages - needed + 1));
    total += o;
  }
  m.pages.pages = total + 1 + static_cast<int>(rng() % 3);
  std::vector<int32_t> pool_pages(static_cast<size_t>(m.pages.pages));
  for (size_t i = 0; i < pool_pages.size(); ++i) pool_pages[i] = static_cast<int32_t>(i);
  std::shuffle(pool_pages.begin(), pool_pages.end(), rng);
  m.table.assign(static_cast<size_t>(rows) * m.pages.table_pages, -1);
  size_t next = 0;
  for (int r = 0; r < rows; ++r)
    for (int i = 0; i < owned[static_cast<size_t>(r)]; ++i)
      m.table[static_cast<size_t>(r) * m.pages.table_pages + i] = pool_pages[next++];
  return m;
}

// Uploads `map`'s table (if paged) and returns the KvPages to pass; contiguous: one page of cap tokens per row.
scalekv::KvPages device_pages(Device& d, const PageMap* map, int rows, int cap) {
  if (!map) return contiguous_pages(rows, cap);
  scalekv::KvPages p = map->pages;
  p.table = d.put(map->table);
  return p;
}

// Sets the table entry of row `row` covering token `token` out of range: the pool size, or -1.
void spoil_entry(PageMap& map, int row, int token, bool negative) {
  map.table[static_cast<size_t>(row) * map.pages.table_pages + token / map.pages.page_tokens] =
      negative ? -1 : map.pages.pages;
}

std::string describe(const char* op, DType dtype, std::initializer_list<std::pair<const char*, int>> fields) {
  std::string s = std::string(op) + " " + scalekv::dtype_name(dtype);
  for (const auto& f : fields) s += std::string(" ") + f.first + "=" + std::to_string(f.second);
  return s;
}

struct PagedAttnCase {
  DType dtype;
  int rows, heads, head_dim, lq, hist_len, n_gather, lc, n_window, page_tokens;
  bool bad_table = false;  // an entry the call reads names a page outside the pool
};

struct AttnRun {
  int code = 0;
  std::vector<unsigned char> out, logits, lse, hist_k, hist_v;
};

constexpr unsigned char kUnwritten = 0x5a;  // output bytes before the call

// One attention call on the emu backend; `map` null: hist_k / hist_v are contiguous [rows, heads, cap, D].
AttnRun run_paged_attention(const PagedAttnCase& c, int cap, const PageMap* map, const HostTensor& q,
                            const std::vector<unsigned char>& hist_k, const std::vector<unsigned char>& hist_v,
                            const HostTensor& ck, const HostTensor& cv, const std::vector<int32_t>& gather,
                            const std::vector<int32_t>& window_rows) {
  const size_t pairs = static_cast<size_t>(c.rows) * c.heads, esize = scalekv::dtype_size(c.dtype);
  const int n_keys = (c.n_gather ? c.n_gather : c.hist_len) + c.lc;
  const size_t out_bytes = pairs * c.lq * c.head_dim * esize, wl_bytes = pairs * c.n_window * n_keys * 4,
               lse_bytes = pairs * c.n_window * 4;
  Device d(scalekv::make_emu_backend(2));
  const auto unwritten = [&](size_t bytes) {
    void* p = d.put(nullptr, bytes);
    d.be->fill_u8(p, kUnwritten, bytes);
    return p;
  };
  scalekv::AttentionArgs a;
  a.rows = c.rows; a.heads = c.heads; a.head_dim = c.head_dim; a.lq = c.lq;
  a.hist_pages = device_pages(d, map, c.rows, cap);
  a.hist_cap = a.hist_pages.capacity(); a.hist_len = c.hist_len; a.n_gather = c.n_gather; a.lc = c.lc;
  a.dtype = c.dtype; a.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  a.q = d.put(q);
  a.hist_k = d.put(hist_k.data(), hist_k.size());
  a.hist_v = d.put(hist_v.data(), hist_v.size());
  a.cur_k = c.lc ? d.put(ck) : nullptr; a.cur_v = c.lc ? d.put(cv) : nullptr;
  a.gather = c.n_gather ? d.put(gather) : nullptr;
  a.out = unwritten(out_bytes);
  a.n_window = c.n_window;
  if (c.n_window) {
    a.window_rows = d.put(window_rows);
    a.window_logits = static_cast<float*>(unwritten(wl_bytes));
    a.window_lse = static_cast<float*>(unwritten(lse_bytes));
  }
  AttnRun run;
  run.code = d.run([&] { d.be->attention(a); });
  run.out = d.get(a.out, out_bytes);
  if (c.n_window) {
    run.logits = d.get(a.window_logits, wl_bytes);
    run.lse = d.get(a.window_lse, lse_bytes);
  }
  run.hist_k = d.get(a.hist_k, hist_k.size());
  run.hist_v = d.get(a.hist_v, hist_v.size());
  return run;
}

void check_paged_attention(const PagedAttnCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const std::string what = describe("attention", c.dtype, {{"rows", c.rows}, {"heads", c.heads}, {"D", c.head_dim},
      {"Lq", c.lq}, {"histLen", c.hist_len}, {"nGather", c.n_gather}, {"Lc", c.lc}, {"nWindow", c.n_window},
      {"pageTokens", c.page_tokens}, {"badTable", c.bad_table}});
  const size_t pairs = static_cast<size_t>(c.rows) * c.heads;
  // Room past hist_len, rounded up to whole pages.
  const int slack = static_cast<int>(rng() % static_cast<uint32_t>(2 * c.page_tokens + 1));
  const int cap = (c.hist_len + slack + c.page_tokens - 1) / c.page_tokens * c.page_tokens;
  HostTensor q{random_vec(rng, pairs * c.lq * c.head_dim), c.dtype};
  HostTensor hk{random_vec(rng, pairs * cap * c.head_dim), c.dtype};
  HostTensor hv{random_vec(rng, pairs * cap * c.head_dim), c.dtype};
  HostTensor ck{random_vec(rng, pairs * c.lc * c.head_dim), c.dtype};
  HostTensor cv{random_vec(rng, pairs * c.lc * c.head_dim), c.dtype};
  std::vector<int32_t> gather(pairs * c.n_gather), window_rows(static_cast<size_t>(c.n_window));
  for (auto& g : gather) g = static_cast<int32_t>(rng() % static_cast<unsigned>(c.hist_len));
  for (auto& w : window_rows) w = static_cast<int32_t>(rng() % static_cast<unsigned>(c.lq));
  PageMap map = make_page_map(rng, c.rows, c.heads, cap, c.head_dim * scalekv::dtype_size(c.dtype), c.page_tokens,
                              c.hist_len);
  const std::vector<unsigned char> pool_k = map.scatter(hk.bytes()), pool_v = map.scatter(hv.bytes());

  if (c.bad_table) {
    // The last page the call reads, of the last row; the other entries stay good.
    spoil_entry(map, c.rows - 1, c.hist_len - 1, seed % 2 == 0);
    const AttnRun paged = run_paged_attention(c, cap, &map, q, pool_k, pool_v, ck, cv, gather, window_rows);
    CHECK_SEEDED(paged.code == static_cast<int>(scalekv::StatusCode::index_out_of_range), seed, what);
    const auto untouched = [](const std::vector<unsigned char>& b) {
      return std::all_of(b.begin(), b.end(), [](unsigned char x) { return x == kUnwritten; });
    };
    CHECK_SEEDED(untouched(paged.out) && untouched(paged.logits) && untouched(paged.lse), seed, what);
    CHECK_SEEDED(paged.hist_k == pool_k && paged.hist_v == pool_v, seed, what);
    return;
  }
  const AttnRun flat = run_paged_attention(c, cap, nullptr, q, hk.bytes(), hv.bytes(), ck, cv, gather, window_rows);
  const AttnRun paged = run_paged_attention(c, cap, &map, q, pool_k, pool_v, ck, cv, gather, window_rows);
  CHECK_SEEDED(flat.code == 0 && paged.code == 0, seed, what);
  CHECK_SEEDED(paged.out == flat.out, seed, what);
  CHECK_SEEDED(paged.logits == flat.logits, seed, what);
  CHECK_SEEDED(paged.lse == flat.lse, seed, what);
  CHECK_SEEDED(paged.hist_k == pool_k && paged.hist_v == pool_v, seed, what);  // read only
}

struct PagedEvictCase {
  DType dtype;
  int rows, heads, head_dim, hist_len, lc, n_keep, page_tokens;
  bool repeats = false;
  bool bad_table = false;
};

// One evictCompact call on the emu backend; returns the status code, hist_k / hist_v updated in place.
int run_paged_evict(const PagedEvictCase& c, int cap, const PageMap* map, std::vector<unsigned char>& hist_k,
                    std::vector<unsigned char>& hist_v, const HostTensor& ck, const HostTensor& cv,
                    const std::vector<int32_t>& keep) {
  Device d(scalekv::make_emu_backend(2));
  scalekv::EvictCompactArgs a;
  a.rows = c.rows; a.heads = c.heads; a.head_dim = c.head_dim;
  a.hist_pages = device_pages(d, map, c.rows, cap);
  a.hist_cap = a.hist_pages.capacity();
  a.hist_len = c.hist_len; a.lc = c.lc; a.n_keep = c.n_keep; a.dtype = c.dtype; a.repeats = c.repeats;
  a.hist_k = d.put(hist_k.data(), hist_k.size());
  a.hist_v = d.put(hist_v.data(), hist_v.size());
  a.cur_k = c.lc ? d.put(ck) : nullptr; a.cur_v = c.lc ? d.put(cv) : nullptr;
  a.keep = d.put(keep);
  const int code = d.run([&] { d.be->evict_compact(a); });
  hist_k = d.get(a.hist_k, hist_k.size());
  hist_v = d.get(a.hist_v, hist_v.size());
  return code;
}

void check_paged_evict(const PagedEvictCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const std::string what = describe("evictCompact", c.dtype, {{"rows", c.rows}, {"heads", c.heads},
      {"D", c.head_dim}, {"histLen", c.hist_len}, {"Lc", c.lc}, {"nKeep", c.n_keep}, {"pageTokens", c.page_tokens},
      {"repeats", c.repeats}, {"badTable", c.bad_table}});
  const size_t pairs = static_cast<size_t>(c.rows) * c.heads;
  const int touched = std::max(c.hist_len, c.n_keep);
  const int slack = static_cast<int>(rng() % static_cast<uint32_t>(2 * c.page_tokens + 1));
  const int cap = (touched + slack + c.page_tokens - 1) / c.page_tokens * c.page_tokens;
  HostTensor hk{random_vec(rng, pairs * cap * c.head_dim), c.dtype};
  HostTensor hv{random_vec(rng, pairs * cap * c.head_dim), c.dtype};
  HostTensor ck{random_vec(rng, pairs * c.lc * c.head_dim), c.dtype};
  HostTensor cv{random_vec(rng, pairs * c.lc * c.head_dim), c.dtype};
  std::vector<int32_t> keep;
  const uint32_t n_total = static_cast<uint32_t>(c.hist_len + c.lc);
  for (size_t p = 0; p < pairs; ++p) {  // a sorted random subset of [0, hist_len + lc), or a sorted sample
    std::vector<int32_t> list(n_total);
    for (size_t i = 0; i < list.size(); ++i) list[i] = static_cast<int32_t>(i);
    if (c.repeats) {
      list.resize(static_cast<size_t>(c.n_keep));
      for (auto& x : list) x = static_cast<int32_t>(rng() % n_total);
    } else {
      std::shuffle(list.begin(), list.end(), rng);
      list.resize(static_cast<size_t>(c.n_keep));
    }
    std::sort(list.begin(), list.end());
    keep.insert(keep.end(), list.begin(), list.end());
  }
  PageMap map = make_page_map(rng, c.rows, c.heads, cap, c.head_dim * scalekv::dtype_size(c.dtype), c.page_tokens,
                              touched);
  std::vector<unsigned char> pool_k = map.scatter(hk.bytes()), pool_v = map.scatter(hv.bytes());

  if (c.bad_table) {
    // The last page the compaction touches, of the first row; nothing may move anywhere.
    spoil_entry(map, 0, touched - 1, seed % 2 == 0);
    const std::vector<unsigned char> before_k = pool_k, before_v = pool_v;
    const int code = run_paged_evict(c, cap, &map, pool_k, pool_v, ck, cv, keep);
    CHECK_SEEDED(code == static_cast<int>(scalekv::StatusCode::index_out_of_range), seed, what);
    CHECK_SEEDED(pool_k == before_k && pool_v == before_v, seed, what);
    return;
  }
  std::vector<unsigned char> flat_k = hk.bytes(), flat_v = hv.bytes();
  const int flat_code = run_paged_evict(c, cap, nullptr, flat_k, flat_v, ck, cv, keep);
  const int paged_code = run_paged_evict(c, cap, &map, pool_k, pool_v, ck, cv, keep);
  CHECK_SEEDED(flat_code == 0 && paged_code == 0, seed, what);
  // Every owned (row, token) holds what the contiguous run left there; everything else kept its poison.
  CHECK_SEEDED(pool_k == map.scatter(flat_k), seed, what);
  CHECK_SEEDED(pool_v == map.scatter(flat_v), seed, what);
}

struct PagedQkCase {
  DType qkv_dtype, kv_dtype;
  int batch, tokens, heads, head_dim, kv_offset, page_tokens;
  bool bad_table = false;
};

struct QkRun {
  int code = 0;
  std::vector<unsigned char> q, k, v;
};

// One qkNormRope call on the emu backend; `map` null: k / v are contiguous [batch, heads, cap, c] of poison.
QkRun run_paged_qk(const PagedQkCase& c, int cap, const PageMap* map, const HostTensor& qkv,
                   const std::vector<float>& q_bias, const std::vector<float>& v_bias,
                   const std::vector<float>& scale_mul, const std::vector<int32_t>& positions) {
  Device d(scalekv::make_emu_backend(2));
  const size_t kv_esize = scalekv::dtype_size(c.kv_dtype);
  const size_t q_bytes = static_cast<size_t>(c.batch) * c.heads * c.tokens * c.head_dim * kv_esize;
  const size_t kv_bytes = map ? map->pool_bytes() : static_cast<size_t>(c.batch) * c.heads * cap * c.head_dim * kv_esize;
  scalekv::QkNormRopeArgs a;
  a.batch = c.batch; a.tokens = c.tokens; a.heads = c.heads; a.head_dim = c.head_dim;
  a.qkv_dtype = c.qkv_dtype; a.q_dtype = c.kv_dtype; a.kv_dtype = c.kv_dtype;
  a.qkv = d.put(qkv);
  a.q_bias = d.put(q_bias); a.v_bias = d.put(v_bias); a.scale_mul = d.put(scale_mul);
  a.positions = d.put(positions);
  a.q = d.put(nullptr, q_bytes);
  a.k = d.put(nullptr, kv_bytes);
  a.v = d.put(nullptr, kv_bytes);
  for (void* p : {a.q, a.k, a.v}) d.be->fill_u8(p, kPoison, p == a.q ? q_bytes : kv_bytes);
  a.kv_pages = device_pages(d, map, c.batch, cap);
  a.kv_cap = a.kv_pages.capacity(); a.kv_offset = c.kv_offset;
  QkRun run;
  run.code = d.run([&] { d.be->qk_norm_rope(a); });
  run.q = d.get(a.q, q_bytes);
  run.k = d.get(a.k, kv_bytes);
  run.v = d.get(a.v, kv_bytes);
  return run;
}

void check_paged_qk_norm_rope(const PagedQkCase& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const std::string what = describe("qkNormRope", c.kv_dtype, {{"batch", c.batch}, {"tokens", c.tokens},
      {"heads", c.heads}, {"c", c.head_dim}, {"kvOffset", c.kv_offset}, {"pageTokens", c.page_tokens},
      {"badTable", c.bad_table}});
  const int written = c.kv_offset + c.tokens;
  const int slack = static_cast<int>(rng() % static_cast<uint32_t>(2 * c.page_tokens + 1));
  const int cap = (written + slack + c.page_tokens - 1) / c.page_tokens * c.page_tokens;
  const size_t hc = static_cast<size_t>(c.heads) * c.head_dim;
  HostTensor qkv{random_vec(rng, static_cast<size_t>(c.batch) * c.tokens * 3 * hc), c.qkv_dtype};
  const std::vector<float> q_bias = random_vec(rng, hc), v_bias = random_vec(rng, hc);
  const std::vector<float> scale_mul = random_vec(rng, static_cast<size_t>(c.heads), 0.0f, 3.0f);
  std::vector<int32_t> positions(2 * static_cast<size_t>(c.tokens));
  for (auto& p : positions) p = static_cast<int32_t>(rng() % 64);
  PageMap map = make_page_map(rng, c.batch, c.heads, cap, c.head_dim * scalekv::dtype_size(c.kv_dtype),
                              c.page_tokens, written);
  // Rows own pages from token 0 on, but the call reads only those from kv_offset on: the ones before may be -1.
  for (int b = 0; b < c.batch; ++b)
    for (int i = 0; i < c.kv_offset / c.page_tokens; ++i)
      if (rng() % 2) map.table[static_cast<size_t>(b) * map.pages.table_pages + i] = -1;

  if (c.bad_table) {
    spoil_entry(map, c.batch - 1, c.kv_offset, seed % 2 == 0);  // the first page the last row writes
    const QkRun paged = run_paged_qk(c, cap, &map, qkv, q_bias, v_bias, scale_mul, positions);
    CHECK_SEEDED(paged.code == static_cast<int>(scalekv::StatusCode::index_out_of_range), seed, what);
    const auto poisoned = [](const std::vector<unsigned char>& b) {
      return std::all_of(b.begin(), b.end(), [](unsigned char x) { return x == kPoison; });
    };
    CHECK_SEEDED(poisoned(paged.q) && poisoned(paged.k) && poisoned(paged.v), seed, what);  // q is not written either
    return;
  }
  const QkRun flat = run_paged_qk(c, cap, nullptr, qkv, q_bias, v_bias, scale_mul, positions);
  const QkRun paged = run_paged_qk(c, cap, &map, qkv, q_bias, v_bias, scale_mul, positions);
  CHECK_SEEDED(flat.code == 0 && paged.code == 0, seed, what);
  CHECK_SEEDED(paged.q == flat.q, seed, what);
  CHECK_SEEDED(paged.k == map.scatter(flat.k), seed, what);
  CHECK_SEEDED(paged.v == map.scatter(flat.v), seed, what);
}

}  // namespace

// Page sizes 1, 3, 16, 64 and sizes that divide no key tile (the 32-key SIMT / D = 128 tensor-core tile, the 64-key
// D = 64 one): f32 and bf16 SIMT, the tensor-core kernel with and without split-KV (shapes from the CPU checks
// above), gathered and contiguous history, with and without current rows and window outputs.
EMU_TEST(attention_paged_matches_contiguous) {
  constexpr DType F = DType::f32, B = DType::bf16;
  const PagedAttnCase cases[] = {
      {F, 2, 2, 64, 23, 40, 12, 9, 4, 3},       // SIMT f32, gathered
      {F, 2, 1, 40, 5, 37, 0, 0, 3, 1},         // SIMT f32, contiguous, no current rows
      {F, 1, 2, 16, 9, 50, 20, 0, 0, 64},       // one partly used page per row
      {B, 1, 2, 40, 19, 17, 0, 3, 0, 16},       // SIMT bf16 (head dim not 64/128)
      {B, 1, 2, 64, 5, 63, 0, 0, 2, 64},        // tensor cores, 63 keys, no current rows
      {B, 2, 1, 64, 33, 50, 40, 24, 3, 1},      // tensor cores, 64 keys, gathered, one token per page
      {B, 1, 2, 128, 100, 60, 0, 5, 0, 3},      // D = 128, 128-row block
      {B, 2, 2, 64, 33, 280, 150, 50, 5, 16},   // split-KV, gathered
      {B, 1, 2, 128, 1, 300, 0, 0, 1, 24},      // split-KV, contiguous, pages across the 32-key tiles
      {B, 2, 2, 64, 100, 800, 640, 10, 4, 48},  // split-KV, ScaleKV-like
      {B, 1, 1, 128, 65, 200, 0, 0, 0, 7},      // split-KV, 128-row block
  };
  uint32_t seed = 500;
  for (const PagedAttnCase& c : cases) check_paged_attention(c, seed++);
}

EMU_TEST(attention_bad_page_table_writes_nothing) {
  check_paged_attention({DType::bf16, 2, 2, 64, 9, 70, 0, 3, 2, 16, true}, 520);  // tensor cores
  check_paged_attention({DType::bf16, 2, 2, 64, 9, 70, 30, 3, 2, 3, true}, 521);  // gathered
  check_paged_attention({DType::f32, 2, 1, 40, 5, 20, 0, 0, 3, 1, true}, 522);    // SIMT, window
}

EMU_TEST(evict_compact_paged_matches_contiguous) {
  constexpr DType F = DType::f32, B = DType::bf16;
  const PagedEvictCase cases[] = {
      {B, 2, 2, 64, 33, 7, 25, 3},
      {F, 1, 3, 3, 10, 4, 9, 1},       // 4-byte vectors, one token per page
      {B, 1, 1, 5, 9, 2, 9, 16},       // 2-byte vectors
      {F, 2, 1, 64, 280, 30, 250, 64},
      {B, 2, 2, 16, 40, 0, 20, 7},     // no current rows
      {B, 2, 2, 64, 33, 7, 40, 5, true},       // repeats
      {F, 1, 3, 3, 200, 100, 300, 16, true},   // repeats, writes past hist_len
      {B, 1, 2, 8, 20, 0, 20, 1, true},        // repeats, one token per page
  };
  uint32_t seed = 600;
  for (const PagedEvictCase& c : cases) check_paged_evict(c, seed++);
}

EMU_TEST(evict_compact_bad_page_table_moves_nothing) {
  check_paged_evict({DType::f32, 2, 2, 16, 30, 5, 12, 4, false, true}, 620);
  check_paged_evict({DType::bf16, 2, 2, 16, 10, 20, 25, 3, false, true}, 621);  // the page only the writes reach
  check_paged_evict({DType::bf16, 1, 2, 8, 20, 4, 20, 1, true, true}, 622);
}

EMU_TEST(qk_norm_rope_paged_matches_contiguous) {
  constexpr DType F = DType::f32, B = DType::bf16;
  const PagedQkCase cases[] = {
      {F, F, 2, 5, 2, 8, 3, 2},
      {F, B, 2, 7, 3, 16, 4, 3},
      {B, B, 1, 17, 2, 64, 50, 64},  // across a page boundary
      {F, F, 3, 4, 1, 32, 0, 1},     // one token per page
      {B, F, 2, 20, 2, 8, 13, 16},
  };
  uint32_t seed = 700;
  for (const PagedQkCase& c : cases) check_paged_qk_norm_rope(c, seed++);
}

EMU_TEST(qk_norm_rope_bad_page_table_writes_nothing) {
  check_paged_qk_norm_rope({DType::f32, DType::f32, 2, 5, 2, 8, 3, 2, true}, 720);
  check_paged_qk_norm_rope({DType::bf16, DType::bf16, 2, 9, 2, 16, 16, 16, true}, 721);
}
