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
