// The backend interface: every op with its shapes and dtypes. `cpu`, `cuda` and `emu` implement all of it.
// Kernels know nothing of N-API; the binding (csrc/) validates shapes and dtypes before calling in, so the
// checks here are the ones only the data can answer (index contents), reported through `Status`.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kv_quant.h"

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
  index_not_sorted = 2,    // ERR_INDEX_ORDER: keep indices out of order per (row, head) (see evictCompact)
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
// Paged K/V (the KV arena of lib/kv/cache.ts): token t of history row r lives in page
//   page(r, t) = table ? table[r * table_pages + t / page_tokens] : r
// of a pool [pages, heads, page_tokens, head_dim], at slot t % page_tokens; a page holds page_tokens tokens of one
// row for every head, so one table per (layer, row) serves all heads. Without a table every row's history is one
// page of page_tokens = capacity tokens, which is the contiguous layout [rows, heads, capacity, head_dim].
// Table entries are checked against [0, pages) where the data lives (ERR_INDEX_RANGE); two rows may name the same
// page (a read-only op is then well defined; a writing op races, which a caller must not do).
struct KvPages {
  const int32_t* table = nullptr;  // [rows, table_pages]
  int table_pages = 1;             // table entries per row (the capacity in pages)
  int page_tokens = 0;             // tokens per page
  int pages = 0;                   // pages in the pool (rows without a table)

  int capacity() const { return table ? table_pages * page_tokens : page_tokens; }
};

// Index of the head_dim-long row of (row r, head h, token t) in a paged pool.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline int64_t kv_page_row(const KvPages& p, int heads, int r, int h, int t) {
  const int page = p.table ? p.table[int64_t(r) * p.table_pages + t / p.page_tokens] : r;
  return (int64_t(page) * heads + h) * p.page_tokens + t % p.page_tokens;
}

// 8-bit K/V (KvFormat int8 or fp8_e4m3, kv_quant.h): u8 rows of the same layouts plus one scale byte per token
// row ([pages, heads, page_tokens] for a pool, [rows, heads, lc] for current rows) shared by its K and V rows:
// element d of key row i reads kv_decode(format, k[i * head_dim + d]) * kv_key_scale(format, scales[i]), of value
// row i the same with kv_value_scale. qkNormRope quantises each token as it writes it (kv_scale_byte, kv_encode);
// attention dequantises as it reads; evictCompact moves the codes and the scale bytes.

// ---------------------------------------------------------------------------------------------------------
// attention: out[r,h,i,:] = softmax_j(scale * q[r,h,i,:] . key_j) . value_j over the keys
//   key_j, j <  n_hist : history row  hist[r,h, g(j), :]   with g(j) = gather ? gather[r,h,j] : j, read through
//                        hist_pages (row kv_page_row(hist_pages, heads, r, h, g(j)) of hist_k / hist_v)
//   key_j, j >= n_hist : current row  cur[r,h, j - n_hist, :]
// where n_hist = gather ? n_gather : hist_len. No mask. f32 accumulation; q/k/v/out share `dtype`.
// Optional window output: for each window query row w (an index into [0, lq)),
//   window_logits[r,h,w,j] = scale * q[r,h,window_rows[w],:] . key_j    (f32, j over all n_hist + lc keys)
//   window_lse[r,h,w]      = log sum_j exp(window_logits[r,h,w,j])      (so probabilities = exp(logit - lse))
// `out` may be null when only the window output is wanted.
struct AttentionArgs {
  int rows = 0, heads = 0, head_dim = 0;
  int lq = 0;
  int hist_cap = 0, hist_len = 0;   // hist_cap = hist_pages.capacity()
  KvPages hist_pages;
  int n_gather = 0;            // number of gathered history entries per (row, head); used when gather != null
  int lc = 0;
  DType dtype = DType::f32;    // f32 or bf16
  KvFormat kv_format = KvFormat::plain;  // plain: history and current rows have `dtype`; else u8 with scales
  float scale = 1.0f;
  const void* q = nullptr;     // [rows, heads, lq, head_dim]
  const void* hist_k = nullptr;
  const void* hist_v = nullptr;   // [pages, heads, page_tokens, head_dim]
  const uint8_t* hist_scales = nullptr;  // [pages, heads, page_tokens], 8-bit formats only
  const int32_t* gather = nullptr;  // [rows, heads, n_gather], values in [0, hist_len)
  const void* cur_k = nullptr;
  const void* cur_v = nullptr;    // [rows, heads, lc, head_dim]
  const uint8_t* cur_scales = nullptr;  // [rows, heads, lc], 8-bit formats only
  void* out = nullptr;            // [rows, heads, lq, head_dim]
  int n_window = 0;
  const int32_t* window_rows = nullptr;  // [n_window], values in [0, lq)
  float* window_logits = nullptr;        // [rows, heads, n_window, n_hist + lc]
  float* window_lse = nullptr;           // [rows, heads, n_window] (optional)

  int n_keys() const { return (gather ? n_gather : hist_len) + lc; }
};

// evictCompact: for every (r, h) independently, with the union U = [hist[r,h,0:hist_len) ‖ cur[r,h,0:lc)],
//   hist[r,h,i,:] <- U[keep[r,h,i]]  for i in [0, n_keep), for K and V, in place, history rows through hist_pages.
// keep must be strictly increasing per (r, h) — non-decreasing with `repeats`, where a repeated index copies
// its row once per occurrence (what the official gather does with the duplicates average pooling can select) —
// and inside [0, hist_len + lc); n_keep <= hist_cap. Every list is validated before anything moves: on a bad
// list nothing changes and the op reports the status.
struct EvictCompactArgs {
  int rows = 0, heads = 0, head_dim = 0;
  int hist_cap = 0, hist_len = 0, lc = 0, n_keep = 0;   // hist_cap = hist_pages.capacity()
  KvPages hist_pages;
  bool repeats = false;
  DType dtype = DType::f32;    // f32 or bf16 (K and V share it); u8 with an 8-bit kv_format
  KvFormat kv_format = KvFormat::plain;  // 8-bit: history and current rows are u8 with the scales below
  void* hist_k = nullptr;
  void* hist_v = nullptr;      // [pages, heads, page_tokens, head_dim]
  uint8_t* hist_scales = nullptr;  // [pages, heads, page_tokens], 8-bit formats only
  const void* cur_k = nullptr;
  const void* cur_v = nullptr; // [rows, heads, lc, head_dim]; may be null when lc == 0
  const uint8_t* cur_scales = nullptr;  // [rows, heads, lc], 8-bit formats only
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

// ---------------------------------------------------------------------------------------------------------
// Latent and VAE-decoder ops (Infinity spec sec. 7.1, 9, 10). Float tensors are f32 or bf16 and every op
// computes in f32; "NCHW" is [batch, channels, height, width], contiguous. Unless an entry says otherwise,
// outputs must not overlap inputs.

// bits_to_codes: codes[b,c,y,x] = bits[b,y,x,c] != 0 ? value : -value  (channels-last bits -> NCHW f32 codes).
// `value` is the official code magnitude, computed once by the caller: with s = 1/sqrt(dim) in f32, the code
// 2s - s L2-normalised over the dim channels (every code vector has the same norm, so one value serves all).
struct BitsToCodesArgs {
  int batch = 0, height = 0, width = 0, dim = 0;
  DType bits_dtype = DType::u8;  // u8 or i32
  float value = 0.0f;
  const void* bits = nullptr;    // [batch, height, width, dim]
  float* codes = nullptr;        // [batch, dim, height, width]
};

// resize_bilinear: PyTorch interpolate(mode='bilinear', or 'trilinear' with T = 1; align_corners=False, no
// antialias), up or down. Per axis, with scale = float(in) / float(out):
//   src = max(0, float((dst + 0.5) * scale - 0.5))  (the product in double, as torch 1.13; rounded once)
//   i0 = floor(src), i1 = min(i0 + 1, in - 1), w1 = src - i0, w0 = 1 - w1
//   row value r(y) = x[y,i0(x)]*w0x + x[y,i1(x)]*w1x;  out = r(i0(y))*w0y + r(i1(y))*w1y   (f32)
// accumulate: out += resized (the running sum of codes) instead of out = resized.
struct ResizeBilinearArgs {
  int batch = 0, channels = 0, in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  bool accumulate = false;
  const float* in = nullptr;  // NCHW [batch, channels, in_h, in_w]
  float* out = nullptr;       // NCHW [batch, channels, out_h, out_w]
};

// conv2d: out[b,o,y,x] = bias[o] + sum_{i,ky,kx} w[o,i,ky,kx] * x[b,i,y+ky-p,x+kx-p], p = (k-1)/2, zero padding,
// stride 1, k = 1 or 3. f32 accumulation. x/out share `dtype`; weight/bias share `weight_dtype`. Unlike gemm, an
// f32 x against bf16 weights is taken exactly (not rounded to bf16).
struct Conv2dArgs {
  int batch = 0, in_channels = 0, out_channels = 0, height = 0, width = 0, kernel = 3;
  DType dtype = DType::f32;         // f32 or bf16
  DType weight_dtype = DType::f32;  // f32 or bf16
  const void* x = nullptr;          // NCHW [batch, in_channels, height, width]
  const void* weight = nullptr;     // [out_channels, in_channels, kernel, kernel]
  const void* bias = nullptr;       // [out_channels], optional
  void* out = nullptr;              // NCHW [batch, out_channels, height, width]
};

// group_norm: per (b, g) over the channels_per_group * spatial values of group g: mean and biased variance
// (f32 results), y = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]; with `swish`, y = y * sigmoid(y).
// out may be x (in place).
struct GroupNormArgs {
  int batch = 0, channels = 0, groups = 0;
  int64_t spatial = 0;             // height * width
  float eps = 1e-6f;
  bool swish = false;
  DType dtype = DType::f32;        // x and out: f32 or bf16
  DType param_dtype = DType::f32;  // weight and bias: f32 or bf16
  const void* x = nullptr;         // [batch, channels, spatial]
  const void* weight = nullptr;    // [channels]
  const void* bias = nullptr;      // [channels]
  void* out = nullptr;             // [batch, channels, spatial]
};

// upsample_nearest2x: out[b,c,y,x] = in[b,c,y/2,x/2]. Any dtype (elements are moved, not converted).
struct UpsampleNearest2xArgs {
  int batch = 0, channels = 0, height = 0, width = 0;  // of the input
  DType dtype = DType::f32;
  const void* in = nullptr;  // NCHW [batch, channels, height, width]
  void* out = nullptr;       // NCHW [batch, channels, 2*height, 2*width]
};

// pixel_shuffle2x (spec sec. 9.3, transformer -> VAE, channels-last on both sides):
//   out[b, 2r+dy, 2q+dx, c] = in[b, r, q, c*4 + dy*2 + dx]. Any dtype.
struct PixelShuffle2xArgs {
  int batch = 0, height = 0, width = 0;  // the token grid (r, q)
  int channels = 0;                      // per output pixel; the input has 4 * channels
  DType dtype = DType::f32;
  const void* in = nullptr;  // [batch, height, width, 4*channels]
  void* out = nullptr;       // [batch, 2*height, 2*width, channels]
};

// pixel_unshuffle2x (VAE latent -> transformer tokens, the exact inverse of the channel mapping above):
//   out[b, r*width + q, c*4 + dy*2 + dx] = in[b, c, 2r+dy, 2q+dx]. Any dtype.
struct PixelUnshuffle2xArgs {
  int batch = 0, height = 0, width = 0;  // the token grid (r, q)
  int channels = 0;                      // of the latent; a token has 4 * channels
  DType dtype = DType::f32;
  const void* in = nullptr;  // NCHW [batch, channels, 2*height, 2*width]
  void* out = nullptr;       // [batch, height*width, 4*channels]
};

// add: out[i] = a[i] + b[i] (f32 sum, rounded to dtype). out may be a or b (in place).
struct AddArgs {
  int64_t count = 0;
  DType dtype = DType::f32;  // f32 or bf16
  const void* a = nullptr;
  const void* b = nullptr;
  void* out = nullptr;
};

// cast: out[i] = in[i] converted between f32 and bf16 (round to nearest even; NaN stays NaN, +-Inf and +-0 keep
// their sign); equal dtypes copy. in and out do not overlap. Bytes: count * (in dsize + out dsize).
struct CastArgs {
  int64_t count = 0;
  DType in_dtype = DType::f32, out_dtype = DType::f32;  // f32 or bf16 each
  const void* in = nullptr;
  void* out = nullptr;
};

// transpose12: the input from element in_offset on, viewed as contiguous [A, B, C, D], is written to the output
// viewed as [A, C, B, D] from element out_offset on:
//   out[out_offset + ((a*C + c)*B + b)*D + d] = in[in_offset + ((a*B + b)*C + c)*D + d].
// With B or C = 1 it is a plain copy (a reshape, or a slice read from or written into a larger tensor). Any dtype
// (raw words); in and out do not overlap.
struct Transpose12Args {
  int64_t a = 0, b = 0, c = 0, d = 0;
  int64_t in_offset = 0, out_offset = 0;  // elements
  DType dtype = DType::f32;
  const void* in = nullptr;
  void* out = nullptr;
};

// image_to_u8: out[b,y,x,k] = uint8(trunc((clamp(img[b,c,y,x], -1, 1) + 1) / 2 * 255)) in f32, with c = k, or
// c = 2 - k when `bgr` (the official output order, for OpenCV). NCHW in, NHWC out.
struct ImageToU8Args {
  int batch = 0, height = 0, width = 0;  // 3 channels
  DType dtype = DType::f32;              // f32 or bf16
  bool bgr = false;
  const void* image = nullptr;  // [batch, 3, height, width]
  uint8_t* out = nullptr;       // [batch, height, width, 3]
};

// ---------------------------------------------------------------------------------------------------------
// Infinity transformer ops. Modulation vectors (AdaLN scale/shift, gates) are f32 rows of length C, one per
// batch row b, found at `ptr + b * stride` so a slot of a [B, S, C] table is used without a copy.

enum class Epilogue : int32_t { none = 0, gelu_tanh = 1, silu = 2 };

// gemm: y[m, n] = epilogue(sum_k x[m, k] * w[n, k] + bias[n]) (PyTorch Linear layout), f32 accumulation.
// x/w: both f32, both bf16, or f32 x with bf16 w — then x is rounded to bf16 (nearest even) before the product,
// as PyTorch's bf16 autocast casts a Linear's input, so every product's operands are bf16 values (whichever unit
// multiplies them: oneDNN's bf16 kernels on the CPU take this case; CUDA's SIMT kernel rounds on load);
// bias (optional) f32 or bf16; y f32 or bf16. y must not alias x, w or bias.
// residual (gemmResidual): y[m, n] += gate[m / tokens][n] * epilogue(...) in place (gate null: 1), y f32: the value
// gemm would store in an f32 y, then gated_residual's x += gate * y, fused into the GEMM's epilogue so the product
// is never written out and read back.
struct GemmArgs {
  int m = 0, n = 0, k = 0;
  DType x_dtype = DType::f32, w_dtype = DType::f32, bias_dtype = DType::f32, y_dtype = DType::f32;
  Epilogue epilogue = Epilogue::none;
  const void* x = nullptr;     // [m, k]
  const void* w = nullptr;     // [n, k]
  const void* bias = nullptr;  // [n] (optional)
  void* y = nullptr;           // [m, n]
  bool residual = false;
  int tokens = 1;                 // residual: rows per gate row (m = batch * tokens)
  const float* gate = nullptr;    // residual: row b at gate + b * gate_stride (optional)
  int64_t gate_stride = 0;
};

// layer_norm over the last dim C of x [rows = B * L, C], statistics in f32 (two passes: mean, then variance):
//   n = (x - mean) / sqrt(var + eps)            (biased variance, as F.layer_norm)
//   modulate: y = n * (1 + scale[b]) + shift[b]  with b = row / tokens
//   affine:   y = n * weight + bias
//   plain:    y = n
// y may be x itself (same dtype); x/y are f32 or bf16, every vector is f32.
enum class NormMode : int32_t { plain = 0, modulate = 1, affine = 2 };
struct LayerNormArgs {
  int batch = 0, tokens = 0, channels = 0;
  float eps = 1e-6f;
  NormMode mode = NormMode::plain;
  DType x_dtype = DType::f32, y_dtype = DType::f32;
  const void* x = nullptr;  // [batch, tokens, C]
  void* y = nullptr;        // [batch, tokens, C]
  const float* scale = nullptr;  // modulate: row b at scale + b * scale_stride
  const float* shift = nullptr;
  int64_t scale_stride = 0, shift_stride = 0;
  const float* weight = nullptr;  // affine: [C]
  const float* bias = nullptr;    // affine: [C]
};

// gated_residual: x[b, l, :] += gate[b] ⊙ y[b, l, :] in place (gate null: 1), f32 math, one rounding to x's
// dtype. x/y f32 or bf16 (independently); y must not alias x.
struct GatedResidualArgs {
  int batch = 0, tokens = 0, channels = 0;
  DType x_dtype = DType::f32, y_dtype = DType::f32;
  void* x = nullptr;        // [batch, tokens, C]
  const void* y = nullptr;  // [batch, tokens, C]
  const float* gate = nullptr;  // row b at gate + b * gate_stride (optional)
  int64_t gate_stride = 0;
};

// activation: y[i] = f(x[i]) elementwise, f32 math; f = silu (x * sigmoid(x)) or gelu_tanh
// (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))). x/y f32 or bf16; y may be x itself (same dtype).
struct ActivationArgs {
  int64_t count = 0;
  Epilogue fn = Epilogue::silu;  // silu or gelu_tanh
  DType x_dtype = DType::f32, y_dtype = DType::f32;
  const void* x = nullptr;
  void* y = nullptr;
};

// qk_norm_rope: splits a fused projection qkv [B, L, 3, H, c] into attention operands, per (b, l, h):
//   q = qkv[.., 0, h, :] + q_bias[h, :]   k = qkv[.., 1, h, :]   v = qkv[.., 2, h, :] + v_bias[h, :]
//   normalize: q = q / max(|q|, 1e-12) * exp(min(scale_mul[h], ln 100)),  k = k / max(|k|, 1e-12)
//   rope (positions non-null): pair p = (2p, 2p+1) of q and k rotated by theta = pos * inv_freq[p mod c/4],
//     pos = positions[l].y for p < c/4, positions[l].x otherwise; inv_freq[i] = 1 / 10000^(2i / (c/2)) (f32)
//   q_out[b, h, l, :] = q;  k_out[b, h, kv_offset + l, :] = k;  v_out[b, h, kv_offset + l, :] = v
// Math in f32; c even (a multiple of 4 with rope), <= 256. Biases and scale_mul optional (absent: 0 / no scale).
struct QkNormRopeArgs {
  int batch = 0, tokens = 0, heads = 0, head_dim = 0;
  bool normalize = true;
  DType qkv_dtype = DType::f32, q_dtype = DType::f32, kv_dtype = DType::f32;
  const void* qkv = nullptr;        // [B, L, 3 * H * c]
  const float* q_bias = nullptr;    // [H * c]
  const float* v_bias = nullptr;    // [H * c]
  const float* scale_mul = nullptr; // [H], natural-log scale
  const int32_t* positions = nullptr;  // [L, 2] (y, x); null: no rotation
  void* q = nullptr;                // [B, H, L, c]
  void* k = nullptr;                // [pages, H, page_tokens, c] through kv_pages; k and v both null: q only
  void* v = nullptr;                // token l of batch row b at kv_page_row(kv_pages, H, b, h, kv_offset + l)
  KvFormat kv_format = KvFormat::plain;  // 8-bit (needs normalize): k and v are u8, each token quantised with its
  uint8_t* scales = nullptr;             // scale byte written here, [pages, H, page_tokens]
  KvPages kv_pages;
  int kv_cap = 0, kv_offset = 0;    // kv_cap = kv_pages.capacity(); kv_offset + L <= kv_cap
};

// cross_attention (varlen): out[b, l, h, :] = softmax_j(scale * q[b, l, h, :] . k[j, h, :]) . v[j, h, :] over
// the text tokens j in [cu_seqlens[b], cu_seqlens[b + 1]) (from kv_starts[b] on, when given); a row with no text
// gets zeros. K/V rows of token j
// start at k + j * kv_row_stride (elements), so a fused [Ntext, 2, H, c] projection is read in place.
// q/k/v/out share `dtype` (f32 or bf16); f32 accumulation; c <= 256.
struct CrossAttentionArgs {
  int batch = 0, tokens = 0, heads = 0, head_dim = 0, n_text = 0;
  DType dtype = DType::f32;
  float scale = 1.0f;
  const void* q = nullptr;   // [B, L, H, c]
  const void* k = nullptr;   // token j, head h at k + j * kv_row_stride + h * c
  const void* v = nullptr;
  int64_t kv_row_stride = 0;
  const int32_t* cu_seqlens = nullptr;  // [B + 1], non-decreasing, cu[0] = 0, cu[B] <= n_text
  // [B] (optional): image b's text is tokens [kv_starts[b], kv_starts[b] + cu[b+1] - cu[b]) instead of
  // [cu[b], cu[b+1]), so images with the same text (or a prefix of it) read one copy of its K/V.
  const int32_t* kv_starts = nullptr;
  void* out = nullptr;       // [B, L, H, c]
};

// cfg_tau: out[b, i] = cfg * (z[b, i] / tau) + uncond_weight * (z[B + b, i] / tau) when `mixed` (z has 2B
// rows, conditional first), else out[b, i] = z[b, i] / tau. uncond_weight = 1 - cfg, rounded to f32 from
// the exact value as torch does with a Python scalar. f32; out must not alias z.
struct CfgTauArgs {
  int batch = 0;          // B (rows of out)
  int64_t row_size = 0;   // elements per row
  bool mixed = true;
  float cfg = 1.0f, uncond_weight = 0.0f, tau = 1.0f;
  const float* z = nullptr;  // [2B or B, row_size]
  float* out = nullptr;      // [B, row_size]
};

// topk_topp_mask: per row of V logits, as sample_with_top_k_top_p_also_inplace_modifying_logits_:
//   top_k > 0: remove x_i < the k-th largest value (k = min(top_k, V); ties with it survive)
//   top_p > 0: on the result, sort ascending (ties: lower index first), remove where the running sum of
//              softmax (f32) <= 1 - top_p (f32), never the last (largest)
// removed entries become -inf. out may be logits itself. f32.
struct TopkToppMaskArgs {
  int64_t rows = 0;
  int vocab = 0;
  int top_k = 0;       // <= 0: off
  double top_p = 0.0;  // <= 0: off
  const float* logits = nullptr;  // [rows, V]
  float* out = nullptr;           // [rows, V]
};

// sample_bits: for each pair (z0, z1) = logits[b, t, 0:2]: the top-k / top-p mask above with V = 2, then
// p1 = the softmax probability of class 1 (f64), u = philox_uniform(seed, b, scale_index, t), bit = u < p1.
// `u` depends only on (seed, image, scale, pair), so every backend draws the same bits for a seed.
struct SampleBitsArgs {
  int batch = 0;
  int64_t pairs = 0;  // T per image
  int top_k = 0;
  double top_p = 0.0;
  uint64_t seed = 0;
  uint32_t scale_index = 0;
  const float* logits = nullptr;  // [B, T, 2]
  DType out_dtype = DType::u8;    // u8 or i32
  void* out = nullptr;            // [B, T]
};

// gated_activation (GEGLU / SwiGLU): per row of 2F values x = [a | b], y = f(a) * b with f silu or gelu_tanh
// (as ActivationArgs), f32 math. x/y f32 or bf16; y [rows, F] must not overlap x.
struct GatedActivationArgs {
  int64_t rows = 0;
  int features = 0;  // F
  Epilogue fn = Epilogue::gelu_tanh;
  DType x_dtype = DType::f32, y_dtype = DType::f32;
  const void* x = nullptr;  // [rows, 2F]
  void* y = nullptr;        // [rows, F]
};

// segment_attention (varlen self-attention, T5's encoder attention): tokens are packed as segments
// [cu[s], cu[s+1]); token i of a segment attends to every token j of the same segment:
//   out[t, h] = sum_j softmax_j(scale * q_i . k_j + bias[h, clamp(j - i, -R, R) + R]) v_j,   R = (span - 1) / 2
// with no bias term when relative_bias is null. A bias given over a span of 2R + 1 offsets extends its edge
// values beyond it (T5's buckets are constant past max_distance). qkv [T, 3, H, c]: q, k, v of token t at
// (t * 3 + {0, 1, 2}) * H * c + h * c; out [T, H, c]. Segments must tile [0, T) (cu[0] = 0, non-decreasing,
// cu[S] = T) and be at most max_seqlen long, else status index_out_of_range and nothing is written.
struct SegmentAttentionArgs {
  int tokens = 0, heads = 0, head_dim = 0, segments = 0, max_seqlen = 0, span = 0;
  DType dtype = DType::f32;  // qkv and out
  float scale = 1.0f;
  const void* qkv = nullptr;
  const int32_t* cu_seqlens = nullptr;  // [S + 1]
  const float* relative_bias = nullptr; // [H, span] or null
  void* out = nullptr;
};

// rms_norm (T5LayerNorm): per row of C channels, n = x * rsqrt(mean(x^2) + eps) with the mean of squares in
// f32; n is rounded to the weight's dtype when that is bf16 (as HF casts before the weight), then
// y = weight * n. y may be x.
struct RmsNormArgs {
  int64_t rows = 0;
  int channels = 0;
  float eps = 1e-6f;
  DType x_dtype = DType::f32, weight_dtype = DType::f32, y_dtype = DType::f32;  // each f32 or bf16
  const void* x = nullptr;       // [rows, C]
  const void* weight = nullptr;  // [C]
  void* y = nullptr;             // [rows, C]
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

  // The profile label of the op that just ran when it differs from the op's own (a library path, e.g.
  // "gemm:onednn"), else null; the queue asks once after each profiled op.
  virtual const char* take_profile_label() { return nullptr; }

  // Kernel cost counters (the emulator's, kernels/emu/emu_profile.h): while on, every kernel launch is recorded
  // with what it asked of the memory system and the tensor cores. Called on the queue thread only. A backend
  // without counters returns false for `on`.
  struct KernelLaunchCounters {
    std::string kernel;
    unsigned grid[3] = {1, 1, 1}, block[3] = {1, 1, 1};
    size_t smem_bytes = 0;
    double simt_flops = 0;  // declared by the launcher; 0 when it declares none
    uint64_t blocks_run = 0;  // blocks emulated (fewer than the grid's when sampling; counters are scaled)
    std::vector<std::pair<const char*, double>> counters;  // name (a string literal) -> count
  };
  // `sample_blocks` > 0: grids with more blocks run only that many (results incomplete; for projections).
  virtual bool set_kernel_counters(bool on, uint64_t sample_blocks = 0) {
    (void)sample_blocks;
    return !on;
  }
  virtual std::vector<KernelLaunchCounters> take_kernel_counters() { return {}; }

  // A timestamp taken when the queue reaches it: a CUDA event recorded on the stream, or the host clock on
  // backends that execute in place. `elapsed_ms(a, b)` is valid once both have completed (after synchronize).
  using TimingMark = std::shared_ptr<void>;
  virtual TimingMark mark_time() = 0;
  virtual double elapsed_ms(const TimingMark& start, const TimingMark& end) = 0;

  // Calls `reached` once the device has finished everything queued before this call, without waiting for it
  // here: progress marks that never drain the queue. Backends that execute in place (cpu, emu) have finished it
  // already and call it at once; CUDA records an event on the stream and calls it from a waiter thread.
  // Marks are reached in the order they were placed, and all of them before the next `synchronize` returns.
  // `reached` must not call into the backend. If this throws, `reached` has not been and will not be called.
  virtual void when_reached(const std::function<void()>& reached) { reached(); }

  // --- Model ops (Infinity). A backend overrides what it implements; the rest report themselves as
  // unavailable there rather than failing to build, so backends can gain ops one at a time.
  virtual void gemm(const GemmArgs&) { unavailable("gemm"); }
  virtual void layer_norm(const LayerNormArgs&) { unavailable("layerNorm"); }
  virtual void gated_residual(const GatedResidualArgs&) { unavailable("gatedResidual"); }
  virtual void activation(const ActivationArgs&) { unavailable("activation"); }
  virtual void qk_norm_rope(const QkNormRopeArgs&) { unavailable("qkNormRope"); }
  virtual void cross_attention(const CrossAttentionArgs&) { unavailable("crossAttention"); }
  virtual void cfg_tau(const CfgTauArgs&) { unavailable("cfgTau"); }
  virtual void topk_topp_mask(const TopkToppMaskArgs&) { unavailable("topkTopPMask"); }
  virtual void sample_bits(const SampleBitsArgs&) { unavailable("sampleBits"); }
  virtual void rms_norm(const RmsNormArgs&) { unavailable("rmsNorm"); }
  virtual void gated_activation(const GatedActivationArgs&) { unavailable("gatedActivation"); }
  virtual void segment_attention(const SegmentAttentionArgs&) { unavailable("segmentAttention"); }

  // Latent and VAE-decoder ops (structs above).
  virtual void bits_to_codes(const BitsToCodesArgs&) { unavailable("bitsToCodes"); }
  virtual void resize_bilinear(const ResizeBilinearArgs&) { unavailable("resizeBilinear"); }
  virtual void conv2d(const Conv2dArgs&) { unavailable("conv2d"); }
  virtual void group_norm(const GroupNormArgs&) { unavailable("groupNorm"); }
  virtual void upsample_nearest2x(const UpsampleNearest2xArgs&) { unavailable("upsampleNearest2x"); }
  virtual void pixel_shuffle2x(const PixelShuffle2xArgs&) { unavailable("pixelShuffle2x"); }
  virtual void pixel_unshuffle2x(const PixelUnshuffle2xArgs&) { unavailable("pixelUnshuffle2x"); }
  virtual void add(const AddArgs&) { unavailable("add"); }
  virtual void cast(const CastArgs&) { unavailable("cast"); }
  virtual void transpose12(const Transpose12Args&) { unavailable("transpose12"); }
  virtual void image_to_u8(const ImageToU8Args&) { unavailable("imageToU8"); }

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
