import { fail, rethrowNative } from './errors.js';
import type { NativeEngine, NativeTensor } from './native.js';
import type { ActivationFn, GemmEpilogue, NativeOpArgs, NativeOpName, SelectionMode, SelectionPooling } from './native-ops.generated.js';
import type { Tensor } from './tensor.js';

/** What the ops need of an engine (engine.ts implements it; the two modules do not import each other). */
export interface OpContext {
  readonly native: NativeEngine;
  checkOwn(t: Tensor, what: string): void;
  tensor(data: Int32Array, shape: readonly number[], dtype: 'i32', opts: { category: 'scratch' }): Tensor;
}

/**
 * The native arguments of op K as this layer builds them: names and value types come from the op table; an
 * absent operand may be undefined here because the native checker reports it (ERR_INVALID_ARG naming it).
 */
type NativeCall<K extends NativeOpName> = { [P in keyof NativeOpArgs<NativeTensor>[K]]?: NativeOpArgs<NativeTensor>[K][P] };

/** Index lists may be given as host arrays; they are uploaded for the one op that uses them. */
export type IndexInput = Int32Array | Tensor;

export interface KVPair {
  k: Tensor;
  v: Tensor;
  /** 8-bit K/V only: u8, one scale byte per token row, shared by its k and v rows (the tensors' shape without headDim). */
  scales?: Tensor;
}

/**
 * How K/V rows are stored: 'plain' in the op's float dtype, or 8-bit — 'int8' (code x scale, codes in [-127, 127])
 * or 'fp8' (OCP e4m3 x scale) — as u8 tensors with one scale byte per (token, head) that holds the power-of-two
 * scales of its K row and its V row (kernels/kv_quant.h, lib/kv/quant.ts). Every K/V operand of one op shares the
 * format.
 */
export type KvFormat = 'plain' | 'int8' | 'fp8';

export interface AttentionArgs {
  /** [rows, heads, Lq, headDim], f32 or bf16. */
  q: Tensor;
  /**
   * Contiguous [rows, heads, capacity, headDim], or a paged pool [pages, heads, pageTokens, headDim] read through
   * `pageTable`; the first `len` (default: capacity) tokens are valid.
   */
  history?: KVPair & {
    len?: number;
    /** [rows, tablePages] int32: history token t of row r is in page pageTable[r, t / pageTokens]. */
    pageTable?: IndexInput;
    /** [rows, heads, n] int32: read history rows through these indices (each in [0, len)). */
    gather?: IndexInput;
  };
  /** [rows, heads, Lc, headDim]: the current scale's keys/values. */
  current?: KVPair;
  /** [rows, heads, Lq, headDim], same dtype as q. May be omitted when only the window output is wanted. */
  out?: Tensor;
  /** Softmax scale applied to q.k. */
  scale: number;
  /** Storage of history and current K/V (default 'plain': q's dtype). */
  kvFormat?: KvFormat;
  /** Observation-window output: scaled logits of the given query rows against every key (both sources). */
  window?: {
    /** Query rows, each in [0, Lq). */
    rows: IndexInput;
    /** [rows, heads, nWindow, nKeys] f32, keys ordered [history ‖ current]. */
    logits: Tensor;
    /** [rows, heads, nWindow] f32: log-sum-exp of each logits row (probabilities = exp(logit - lse)). */
    lse?: Tensor;
  };
}

export interface EvictCompactArgs {
  /** The layer's buffers (contiguous, or paged through pageTable as in AttentionArgs); tokens [0, len) are valid. Compacted in place. */
  history: KVPair & { len: number; pageTable?: IndexInput };
  current?: KVPair;
  /** [rows, heads, nKeep] int32, strictly increasing per (row, head), into [0, len + Lc). */
  keep: IndexInput;
  /**
   * Allow repeated indices (keep non-decreasing): a repeated index copies its row once per occurrence, as the
   * official gather does with the duplicates average pooling can select. Default false (a repeat is ERR_INDEX_ORDER).
   */
  repeats?: boolean;
  /** Storage of history and current K/V (default 'plain'); 8-bit rows move with their scales. */
  kvFormat?: KvFormat;
}

export type ScoreMode = SelectionMode;
export type PoolingMode = SelectionPooling;

export interface SelectionArgs {
  /** [rows, heads, nWindow, nKeys] f32 window logits (from attention's window output). */
  logits: Tensor;
  /** [rows, heads, nWindow] f32, needed by mode 'probs'. */
  lse?: Tensor;
  /** [nWindow] key positions of the window: masked from scoring and always kept. */
  windowKeys: IndexInput;
  /** Kept entries per (row, head), window included: nWindow <= budget <= nKeys. */
  budget: number;
  /** 'logits' sums raw scaled logits (the official code); 'probs' sums softmax probabilities (the paper). */
  mode?: ScoreMode;
  pooling?: PoolingMode;
  /** Odd pooling width (default 1: no smoothing). */
  kernel?: number;
  /** [rows, heads, budget] int32: the kept positions, sorted ascending. */
  out: Tensor;
  /** [rows, heads, nKeys] f32: pooled scores before the window is masked again (diagnostics). */
  pooledScores?: Tensor;
}

// ---- Latent and VAE-decoder ops (Infinity spec sec. 7.1, 9, 10). "NCHW" is [batch, channels, height, width].

/**
 * The magnitude of every BSQ code entry for `dim` channels, computed as the official
 * `indices_to_codes(bits, 'bit_label')` does in f32: s = 1/sqrt(dim), code = 2s - s, then divided by the L2 norm
 * of the dim-vector (summed in order). Every code vector has the same norm, so one value serves all; the
 * normalisation moves it by an ulp (1/sqrt(32) -> 0.1767767071723938), which is why it is kept.
 */
export function bsqCodeValue(dim: number): number {
  const f = Math.fround;
  const s = f(1 / Math.sqrt(dim));
  const code = f(f(2 * s) - s);
  let sq = 0;
  for (let i = 0; i < dim; i++) sq = f(sq + f(code * code));
  return f(code / Math.max(f(Math.sqrt(sq)), 1e-12));
}

export interface BitsToCodesArgs {
  /** [B, h, w, d] u8 or i32 sampled bits, channels-last (nonzero counts as 1). */
  bits: Tensor;
  /** [B, d, h, w] f32, channels-first: +bsqCodeValue(d) for a 1 bit, -bsqCodeValue(d) for a 0 bit. */
  out: Tensor;
}

export interface ResizeBilinearArgs {
  /** NCHW f32. */
  input: Tensor;
  /** NCHW f32 with the input's batch and channels; any height and width (up or down). */
  out: Tensor;
  /** Add the resized input to `out` instead of overwriting it (the running code sum). Default false. */
  accumulate?: boolean;
}

export interface Conv2dArgs {
  /** NCHW [B, I, H, W], f32 or bf16. */
  input: Tensor;
  /** [O, I, k, k] with k = 1 or 3 (padding (k-1)/2, stride 1), f32 or bf16. */
  weight: Tensor;
  /** [O], the weight's dtype. Default: no bias. */
  bias?: Tensor;
  /** NCHW [B, O, H, W], the input's dtype. Must not alias an input. */
  out: Tensor;
}

export interface GroupNormArgs {
  /** NCHW, f32 or bf16. */
  input: Tensor;
  /** [C] scale and shift, f32 or bf16 (both the same dtype). */
  weight: Tensor;
  bias: Tensor;
  /** The input's shape and dtype; may be `input` itself (in place). */
  out: Tensor;
  /** Number of groups, dividing C. Default 32. */
  groups?: number;
  /** Added to the variance. Default 1e-6 (the VAE's). */
  eps?: number;
  /** Apply swish y*sigmoid(y) after the affine step. Default false. */
  swish?: boolean;
}

export interface CastArgs {
  /** f32 or bf16, any shape. */
  input: Tensor;
  /** f32 or bf16, input's shape: each element converted (to bf16: round to nearest even, as every bf16 output). */
  out: Tensor;
}

export interface ImageToU8Args {
  /** NCHW [B, 3, H, W] image in [-1, 1] (values outside are clamped), f32 or bf16. */
  image: Tensor;
  /** NHWC [B, H, W, 3] u8: trunc((x + 1) / 2 * 255), evaluated in f32. */
  out: Tensor;
  /** Channel order BGR instead of RGB (what the official pipeline returns, for OpenCV). Default false. */
  bgr?: boolean;
}

// ---- Infinity transformer ops (spec sec. 5, 6, 8). Float tensors are f32 or bf16 unless stated; math is f32.

/** An elementwise function fused after a GEMM's bias, or run alone by `activation`. */
export type Epilogue = GemmEpilogue;

/**
 * One f32 vector of C channels per image: a [B, C] tensor, or slot `slot` of a [B, S, C] table (e.g. the six
 * AdaLN vectors of a block, `ada_gss + cond6`), read in place.
 */
export type RowVectors = Tensor | { table: Tensor; slot: number };

export interface GemmArgs {
  /** [..., K], f32 or bf16; the leading axes are flattened into M. */
  x: Tensor;
  /** [N, K], PyTorch Linear layout: x's dtype, or bf16 with an f32 x (then x is rounded to bf16 first, as bf16 autocast does). */
  w: Tensor;
  /** [N], f32 or bf16, added before the epilogue. */
  bias?: Tensor;
  /** [..., N] with x's leading axes, f32 or bf16. Must not overlap an input. */
  y: Tensor;
  /** Applied after the bias. Default 'none'. */
  epilogue?: Epilogue;
}

export interface GemmResidualArgs {
  /** [B, L, K], f32 or bf16. */
  x: Tensor;
  /** [N, K], as gemm's. */
  w: Tensor;
  /** [N], f32 or bf16, added before the epilogue. */
  bias?: Tensor;
  /** [B, L, N] f32, updated in place: y += gate[b] ⊙ epilogue(x · wᵀ + bias). Must not overlap an input. */
  y: Tensor;
  /** Per-image gate; absent: 1 (a plain residual add). */
  gate?: RowVectors;
  /** Applied after the bias, before the gate. Default 'none'. */
  epilogue?: Epilogue;
}

export interface LayerNormArgs {
  /** [B, L, C], or [rows, C] (each row its own image). */
  x: Tensor;
  /** x's shape, f32 or bf16; may be x itself when the dtypes match. */
  y: Tensor;
  /** Default 1e-6 (the model's norm_eps). */
  eps?: number;
  /** AdaLN: y = LN(x) * (1 + scale[b]) + shift[b]. Give both or neither. */
  scale?: RowVectors;
  shift?: RowVectors;
  /** Affine LayerNorm: y = LN(x) * weight + bias, both [C] f32. Excludes scale/shift. */
  weight?: Tensor;
  bias?: Tensor;
}

export interface RmsNormArgs {
  /** [..., C], f32 or bf16. */
  x: Tensor;
  /** [C], f32 or bf16: with bf16, the normalised x is rounded to bf16 before the weight (as T5LayerNorm casts). */
  weight: Tensor;
  /** x's shape, f32 or bf16; may be x itself when the dtypes match. */
  y: Tensor;
  /** Added to the mean of squares. Default 1e-6 (T5's layer_norm_epsilon). */
  eps?: number;
}

export interface GatedActivationArgs {
  /** [..., 2F], f32 or bf16: the gate half then the linear half (one fused projection, e.g. T5's wi_0 ‖ wi_1). */
  x: Tensor;
  /** [..., F], f32 or bf16; must not overlap x. */
  out: Tensor;
  /** 'gelu_tanh' (GEGLU, T5's gated-gelu) or 'silu' (SwiGLU). */
  fn: ActivationFn;
}

export interface SegmentAttentionArgs {
  /** [T, 3, H, c], f32 or bf16: the fused q/k/v projection of T packed tokens. */
  qkv: Tensor;
  /** [S + 1] int32 from 0 to T, non-decreasing: segment s (a prompt) is tokens cuSeqlens[s] .. cuSeqlens[s + 1]. */
  cuSeqlens: IndexInput;
  /**
   * [H, 2R + 1] f32: added to the logit of query i and key j of a segment at offset clamp(j − i, −R, R) + R
   * (T5's relative-position bias, expanded from its buckets; see relativePositionBias).
   */
  relativeBias?: Tensor;
  /** [T, H, c], qkv's dtype. */
  out: Tensor;
  /** Multiplies q·k (T5: 1, no 1/√c). */
  scale: number;
  /** The longest segment (sizes the launch). Default T. */
  maxSeqlen?: number;
}

export interface GatedResidualArgs {
  /** [B, L, C] or [rows, C], updated in place: x += gate[b] ⊙ y. */
  x: Tensor;
  /** x's shape, any float dtype. */
  y: Tensor;
  /** Per-image gate; absent: 1 (a plain residual add). */
  gate?: RowVectors;
}

export interface ActivationArgs {
  x: Tensor;
  /** x's shape; may be x itself when the dtypes match. */
  out: Tensor;
  fn: ActivationFn;
}

export interface QkNormRopeArgs {
  /** [B, L, 3 * H * c]: the fused q/k/v projection, viewed as [B, L, 3, H, c]. */
  qkv: Tensor;
  /** [H * c] f32 biases of q and v (k has none). */
  qBias?: Tensor;
  vBias?: Tensor;
  /** [H] f32 per-head log scale: q is multiplied by exp(min(scaleMul, ln 100)). Needs normalize. */
  scaleMul?: Tensor;
  /** L2-normalise q and k (F.normalize, eps 1e-12) before scaling and rotating. Default true. */
  normalize?: boolean;
  /** [L, 2] int32 (y, x) RoPE grid positions of this scale's tokens (see rope2dPositions); absent: no rotation. */
  positions?: IndexInput;
  /** [B, H, L, c] output, f32 or bf16. */
  q: Tensor;
  /**
   * K/V (one dtype): this scale's tokens are written at tokens kvOffset .. kvOffset + L. Contiguous [B, H, capacity,
   * c], or a paged pool [pages, H, pageTokens, c] with `pageTable`. Both absent: q only (e.g. ScaleKV's raw scoring
   * query).
   */
  k?: Tensor;
  v?: Tensor;
  /** [B, tablePages] int32: token t of batch row b is in page pageTable[b, t / pageTokens] of k and v. */
  pageTable?: IndexInput;
  /** Default 0. */
  kvOffset?: number;
  /** 'int8' or 'fp8' (needs normalize): k and v are u8, each token quantised, its scale byte written to scales. Default 'plain'. */
  kvFormat?: KvFormat;
  /** [pages, H, pageTokens] (or [B, H, capacity]) u8 scale bytes of the tokens of k and v, with an 8-bit kvFormat. */
  scales?: Tensor;
}

export interface CrossAttentionArgs {
  /** [B, L, H, c] (the q projection's natural layout). */
  q: Tensor;
  /** [Ntext, 2, H, c]: the fused K/V projection of the text, read in place. Or give k and v. */
  kv?: Tensor;
  /** [Ntext, H, c] each. */
  k?: Tensor;
  v?: Tensor;
  /** [B + 1] int32: image b attends to text tokens cuSeqlens[b] .. cuSeqlens[b + 1]. */
  cuSeqlens: IndexInput;
  /**
   * [B] int32: image b attends to the cuSeqlens[b + 1] - cuSeqlens[b] text tokens from kvStarts[b] on instead, so
   * images with the same text, or a prefix of it, share one copy of its K/V.
   */
  kvStarts?: IndexInput;
  /** [B, L, H, c], q's dtype. Rows with no text are zeros. */
  out: Tensor;
  /** Softmax scale. Default 1 / sqrt(c). */
  scale?: number;
}

export interface CfgTauArgs {
  /** [2B, ...] f32 (conditional rows first), or [B, ...] when cfg is 1. */
  logits: Tensor;
  /** [B, ...] f32: cfg * (z_cond / tau) + (1 - cfg) * (z_uncond / tau). */
  out: Tensor;
  /** Default 1. */
  cfg?: number;
  /** Default 1. */
  tau?: number;
}

export interface TopkTopPMaskArgs {
  /** [..., V] f32. */
  logits: Tensor;
  /** logits' shape, f32; may be logits itself. Removed entries become -Infinity. */
  out: Tensor;
  /** Keep values >= the k-th largest (ties kept). Default 0: off. */
  topK?: number;
  /** Then drop the smallest entries whose cumulative softmax is <= 1 - topP. Default 0: off. */
  topP?: number;
}

export interface SampleBitsArgs {
  /** [B, ..., 2k] f32 bit-logit pairs: (z0, z1) = logits of bit value 0 and 1 (after cfgTau). */
  logits: Tensor;
  /** [B, ...] u8 or i32 with one entry per pair: the sampled bits. */
  out: Tensor;
  /** As topkTopPMask with V = 2 (the official defaults 900 / 0.97). Default 0: off. */
  topK?: number;
  topP?: number;
  /** Integer in [0, 2^53): with scaleIndex, image and pair it keys the Philox4x32-10 draw. */
  seed: number;
  /** The scale being sampled, so every scale draws fresh numbers. */
  scaleIndex: number;
}

/** The kernel-level ops of an engine. Each validates at the call, then runs in queue order. */
export class Ops {
  readonly #engine: OpContext;
  constructor(engine: OpContext) {
    this.#engine = engine;
  }

  #own(t: Tensor | undefined, what: string): NativeTensor | undefined {
    if (t === undefined || t === null) return undefined;
    this.#engine.checkOwn(t, what);
    return t.native;
  }

  // Host index arrays become one-op tensors; the native side holds the buffer until the op has run.
  #indices(x: IndexInput | undefined, shape: number[] | null, what: string): { tensor?: Tensor; temp: boolean } {
    if (x === undefined || x === null) return { temp: false };
    if (x instanceof Int32Array) {
      const dims = shape ?? [x.length];
      return { tensor: this.#engine.tensor(x, dims, 'i32', { category: 'scratch' }), temp: true };
    }
    this.#engine.checkOwn(x, what);
    return { tensor: x, temp: false };
  }

  /** A page table given as a host array is [rows, entries / rows]. */
  #pageTable(x: IndexInput | undefined, rows: number | undefined, what: string): { tensor?: Tensor; temp: boolean } {
    if (x instanceof Int32Array && (!rows || x.length % rows !== 0))
      fail('ERR_SHAPE', `${what} has ${x.length} entries, not a whole number per row of ${rows ?? 'unknown'} rows`);
    return this.#indices(x, x instanceof Int32Array ? [rows as number, x.length / (rows as number)] : null, what);
  }

  #run<K extends NativeOpName>(name: K, args: NativeCall<K>, temps: { tensor?: Tensor; temp: boolean }[]) {
    try {
      (this.#engine.native[name] as unknown as (a: NativeCall<K>) => void)(args);
    } catch (e) {
      rethrowNative(e);
    } finally {
      for (const t of temps) if (t.temp) t.tensor?.dispose();
    }
  }

  /** Flash-style attention over [history ‖ current], optionally with the observation-window logits. */
  attention(a: AttentionArgs): void {
    if (!a?.q) fail('ERR_INVALID_ARG', 'attention: q is required');
    const q = this.#own(a.q, 'q');
    if (typeof a.scale !== 'number' || !Number.isFinite(a.scale)) fail('ERR_INVALID_ARG', 'attention: scale must be a finite number');
    const [rows, heads] = a.q.shape;
    const gatherLen = a.history?.gather instanceof Int32Array ? a.history.gather.length / (rows * heads) : 0;
    if (a.history?.gather instanceof Int32Array && !Number.isInteger(gatherLen))
      fail('ERR_SHAPE', `attention: gather has ${a.history.gather.length} entries, not a multiple of rows*heads = ${rows * heads}`);
    const gather = this.#indices(a.history?.gather, [rows, heads, gatherLen], 'history.gather');
    const pageTable = this.#pageTable(a.history?.pageTable, rows, 'history.pageTable');
    const windowRows = this.#indices(a.window?.rows, null, 'window.rows');
    this.#run(
      'attention',
      {
        q,
        histK: this.#own(a.history?.k, 'history.k'),
        histV: this.#own(a.history?.v, 'history.v'),
        histLen: a.history?.len,
        pageTable: pageTable.tensor?.native,
        gather: gather.tensor?.native,
        curK: this.#own(a.current?.k, 'current.k'),
        curV: this.#own(a.current?.v, 'current.v'),
        histScales: this.#own(a.history?.scales, 'history.scales'),
        curScales: this.#own(a.current?.scales, 'current.scales'),
        kvFormat: a.kvFormat,
        out: this.#own(a.out, 'out'),
        scale: a.scale,
        windowRows: windowRows.tensor?.native,
        windowLogits: this.#own(a.window?.logits, 'window.logits'),
        windowLse: this.#own(a.window?.lse, 'window.lse'),
      },
      [gather, pageTable, windowRows],
    );
  }

  /** Moves the kept K/V rows to the front of the history, in place. Returns the new history length. */
  evictCompact(a: EvictCompactArgs): number {
    if (!a?.history?.k) fail('ERR_INVALID_ARG', 'evictCompact: history is required');
    const k = this.#own(a.history.k, 'history.k');
    const heads = a.history.k.shape[1];
    // A paged pool's first axis counts pages: the rows come from whichever operand has them.
    const table = a.history.pageTable;
    const rows = table === undefined ? a.history.k.shape[0] : !(table instanceof Int32Array) ? table.shape?.[0] : !(a.keep instanceof Int32Array) ? a.keep?.shape?.[0] : a.current?.k.shape[0];
    if (rows === undefined) fail('ERR_INVALID_ARG', 'evictCompact: with a host pageTable, give keep or pageTable as a tensor, or a current operand, so the rows are known');
    const pageTable = this.#pageTable(table, rows, 'history.pageTable');
    const n = a.keep instanceof Int32Array ? a.keep.length / (rows * heads) : a.keep?.shape?.[2];
    if (!Number.isInteger(n)) fail('ERR_SHAPE', `evictCompact: keep must hold rows*heads = ${rows * heads} equal lists`);
    const keep = this.#indices(a.keep, [rows, heads, n as number], 'keep');
    this.#run(
      'evictCompact',
      {
        histK: k,
        histV: this.#own(a.history.v, 'history.v'),
        histLen: a.history.len,
        pageTable: pageTable.tensor?.native,
        curK: this.#own(a.current?.k, 'current.k'),
        curV: this.#own(a.current?.v, 'current.v'),
        histScales: this.#own(a.history.scales, 'history.scales'),
        curScales: this.#own(a.current?.scales, 'current.scales'),
        kvFormat: a.kvFormat,
        keep: keep.tensor?.native,
        repeats: a.repeats ?? false,
      },
      [keep, pageTable],
    );
    return n as number;
  }

  /** Window scoring + pooling + top-k (ties to the lowest index) + union with the window, sorted. */
  selection(a: SelectionArgs): void {
    const windowKeys = this.#indices(a.windowKeys, null, 'windowKeys');
    this.#run(
      'selection',
      {
        logits: this.#own(a.logits, 'logits'),
        lse: this.#own(a.lse, 'lse'),
        windowKeys: windowKeys.tensor?.native,
        out: this.#own(a.out, 'out'),
        budget: a.budget,
        mode: a.mode ?? 'logits',
        pooling: a.pooling ?? 'max',
        kernel: a.kernel ?? 1,
        pooledScores: this.#own(a.pooledScores, 'pooledScores'),
      },
      [windowKeys],
    );
  }

  #rowVectors(x: RowVectors | undefined, what: string): { tensor?: NativeTensor; slot?: number } {
    if (x === undefined || x === null) return {};
    if ('table' in x) return { tensor: this.#own(x.table, `${what}.table`), slot: x.slot };
    return { tensor: this.#own(x, what) };
  }

  /** y = epilogue(x · wᵀ + bias), f32 accumulation (tensor cores for bf16 on CUDA); f32 x against bf16 w is rounded to bf16 first. */
  gemm(a: GemmArgs): void {
    this.#run(
      'gemm',
      { x: this.#own(a?.x, 'x'), w: this.#own(a?.w, 'w'), bias: this.#own(a?.bias, 'bias'), y: this.#own(a?.y, 'y'), epilogue: a?.epilogue ?? 'none' },
      [],
    );
  }

  /**
   * y += gate ⊙ epilogue(x · wᵀ + bias) in place: gemm into an f32 tensor followed by gatedResidual, as one op
   * (on CUDA the GEMM's epilogue adds into y, so the product never reaches memory).
   */
  gemmResidual(a: GemmResidualArgs): void {
    const gate = this.#rowVectors(a?.gate, 'gate');
    this.#run(
      'gemmResidual',
      {
        x: this.#own(a?.x, 'x'), w: this.#own(a?.w, 'w'), bias: this.#own(a?.bias, 'bias'), y: this.#own(a?.y, 'y'),
        gate: gate.tensor, gateSlot: gate.slot, epilogue: a?.epilogue ?? 'none',
      },
      [],
    );
  }

  /** LayerNorm over the last axis: plain, AdaLN-modulated (scale/shift) or affine (weight/bias). */
  layerNorm(a: LayerNormArgs): void {
    const scale = this.#rowVectors(a?.scale, 'scale');
    const shift = this.#rowVectors(a?.shift, 'shift');
    this.#run(
      'layerNorm',
      {
        x: this.#own(a?.x, 'x'), y: this.#own(a?.y, 'y'), eps: a?.eps ?? 1e-6,
        scale: scale.tensor, scaleSlot: scale.slot, shift: shift.tensor, shiftSlot: shift.slot,
        weight: this.#own(a?.weight, 'weight'), bias: this.#own(a?.bias, 'bias'),
      },
      [],
    );
  }

  /** T5's RMS norm over the last axis: y = weight · x / sqrt(mean(x²) + eps), with the statistics in f32. */
  rmsNorm(a: RmsNormArgs): void {
    this.#run('rmsNorm', { x: this.#own(a?.x, 'x'), weight: this.#own(a?.weight, 'weight'), y: this.#own(a?.y, 'y'), eps: a?.eps ?? 1e-6 }, []);
  }

  /** out = fn(gate) ⊙ linear over the two halves of x's last axis (GEGLU / SwiGLU). */
  gatedActivation(a: GatedActivationArgs): void {
    this.#run('gatedActivation', { x: this.#own(a?.x, 'x'), out: this.#own(a?.out, 'out'), fn: a?.fn }, []);
  }

  /** Varlen self-attention within each segment of packed tokens (T5's encoder attention, with its position bias). */
  segmentAttention(a: SegmentAttentionArgs): void {
    const cu = this.#indices(a?.cuSeqlens, null, 'cuSeqlens');
    this.#run(
      'segmentAttention',
      {
        qkv: this.#own(a?.qkv, 'qkv'), cuSeqlens: cu.tensor?.native, relativeBias: this.#own(a?.relativeBias, 'relativeBias'),
        out: this.#own(a?.out, 'out'), scale: a?.scale, maxSeqlen: a?.maxSeqlen,
      },
      [cu],
    );
  }

  /** x += gate ⊙ y in place (the gated residual of the attention and FFN branches). */
  gatedResidual(a: GatedResidualArgs): void {
    const gate = this.#rowVectors(a?.gate, 'gate');
    this.#run('gatedResidual', { x: this.#own(a?.x, 'x'), y: this.#own(a?.y, 'y'), gate: gate.tensor, gateSlot: gate.slot }, []);
  }

  /** out = fn(x) elementwise. */
  activation(a: ActivationArgs): void {
    this.#run('activation', { x: this.#own(a?.x, 'x'), out: this.#own(a?.out, 'out'), fn: a?.fn }, []);
  }

  /** out = SiLU(x) = x * sigmoid(x). */
  silu(x: Tensor, out: Tensor): void {
    this.activation({ x, out, fn: 'silu' });
  }

  /** out = GELU(x) with the tanh approximation. */
  geluTanh(x: Tensor, out: Tensor): void {
    this.activation({ x, out, fn: 'gelu_tanh' });
  }

  /**
   * Cosine self-attention operands from the fused projection: bias, L2-normalise and scale, 2-D RoPE; q to its own
   * tensor, k and v appended to the KV cache at kvOffset.
   */
  qkNormRope(a: QkNormRopeArgs): void {
    const tokens = a?.qkv?.shape?.[1] ?? 0;
    const positions = this.#indices(a?.positions, [tokens, 2], 'positions');
    const pageTable = this.#pageTable(a?.pageTable, a?.qkv?.shape?.[0], 'pageTable');
    this.#run(
      'qkNormRope',
      {
        qkv: this.#own(a?.qkv, 'qkv'), qBias: this.#own(a?.qBias, 'qBias'), vBias: this.#own(a?.vBias, 'vBias'),
        scaleMul: this.#own(a?.scaleMul, 'scaleMul'), normalize: a?.normalize ?? true, positions: positions.tensor?.native,
        q: this.#own(a?.q, 'q'), k: this.#own(a?.k, 'k'), v: this.#own(a?.v, 'v'), kvOffset: a?.kvOffset ?? 0,
        pageTable: pageTable.tensor?.native, scales: this.#own(a?.scales, 'scales'),
        kvFormat: a?.kvFormat,
      },
      [positions, pageTable],
    );
  }

  /** Varlen cross-attention of each image's tokens over its own text segment (no mask, no RoPE). */
  crossAttention(a: CrossAttentionArgs): void {
    const cu = this.#indices(a?.cuSeqlens, null, 'cuSeqlens');
    const starts = this.#indices(a?.kvStarts, null, 'kvStarts');
    this.#run(
      'crossAttention',
      {
        q: this.#own(a?.q, 'q'), kv: this.#own(a?.kv, 'kv'), k: this.#own(a?.k, 'k'), v: this.#own(a?.v, 'v'),
        cuSeqlens: cu.tensor?.native, kvStarts: starts.tensor?.native, out: this.#own(a?.out, 'out'), scale: a?.scale,
      },
      [cu, starts],
    );
  }

  /** Classifier-free guidance on logits after the temperature: out = cfg * z_c / tau + (1 - cfg) * z_u / tau. */
  cfgTau(a: CfgTauArgs): void {
    this.#run('cfgTau', { logits: this.#own(a?.logits, 'logits'), out: this.#own(a?.out, 'out'), cfg: a?.cfg ?? 1, tau: a?.tau ?? 1 }, []);
  }

  /** The deterministic part of the official top-k / top-p sampler over the last axis: removed logits become -Infinity. */
  topkTopPMask(a: TopkTopPMaskArgs): void {
    this.#run('topkTopPMask', { logits: this.#own(a?.logits, 'logits'), out: this.#own(a?.out, 'out'), topK: a?.topK ?? 0, topP: a?.topP ?? 0 }, []);
  }

  /** Samples one bit per logit pair after top-k / top-p, with a counter-based RNG: the same bits on every backend. */
  sampleBits(a: SampleBitsArgs): void {
    this.#run(
      'sampleBits',
      {
        logits: this.#own(a?.logits, 'logits'), out: this.#own(a?.out, 'out'), topK: a?.topK ?? 0, topP: a?.topP ?? 0,
        seed: a?.seed, scaleIndex: a?.scaleIndex,
      },
      [],
    );
  }

  /** BSQ bits to codes (spec sec. 9.1): channels-last {0,1} bits -> channels-first f32 +-value codes. */
  bitsToCodes(a: BitsToCodesArgs): void {
    const dim = a?.bits?.shape?.[3];
    if (!Number.isInteger(dim)) fail('ERR_SHAPE', 'bitsToCodes: bits must be [batch, height, width, dim]');
    this.#run('bitsToCodes', { bits: this.#own(a.bits, 'bits'), out: this.#own(a.out, 'out'), value: bsqCodeValue(dim as number) }, []);
  }

  /**
   * Bilinear resize as PyTorch's interpolate(mode='bilinear' or 'trilinear' with T = 1, align_corners=False,
   * no antialias), up or down (spec sec. 9.2): downsampling point-samples, it does not average areas.
   */
  resizeBilinear(a: ResizeBilinearArgs): void {
    this.#run('resizeBilinear', { input: this.#own(a?.input, 'input'), out: this.#own(a?.out, 'out'), accumulate: a?.accumulate ?? false }, []);
  }

  /** 2-D convolution, stride 1, zero padding (k-1)/2, k = 1 or 3, f32 accumulation. */
  conv2d(a: Conv2dArgs): void {
    this.#run(
      'conv2d',
      { input: this.#own(a?.input, 'input'), weight: this.#own(a?.weight, 'weight'), bias: this.#own(a?.bias, 'bias'), out: this.#own(a?.out, 'out') },
      [],
    );
  }

  /** GroupNorm with f32 statistics and an optional fused swish (the VAE's norm -> swish pairs). */
  groupNorm(a: GroupNormArgs): void {
    this.#run(
      'groupNorm',
      {
        input: this.#own(a?.input, 'input'),
        weight: this.#own(a?.weight, 'weight'),
        bias: this.#own(a?.bias, 'bias'),
        out: this.#own(a?.out, 'out'),
        groups: a?.groups ?? 32,
        eps: a?.eps ?? 1e-6,
        swish: a?.swish ?? false,
      },
      [],
    );
  }

  /** Nearest-neighbour x2 upsampling, NCHW [B, C, H, W] -> [B, C, 2H, 2W], any dtype. */
  upsampleNearest2x(a: { input: Tensor; out: Tensor }): void {
    this.#run('upsampleNearest2x', { input: this.#own(a?.input, 'input'), out: this.#own(a?.out, 'out') }, []);
  }

  /**
   * Spatial un-patchify of sampled bits (spec sec. 9.3, 8B): [B, h, w, 4c] -> [B, 2h, 2w, c], both channels-last;
   * channel c*4 + dy*2 + dx of token (r, q) becomes channel c of pixel (2r+dy, 2q+dx). Any dtype.
   */
  pixelShuffle2x(a: { input: Tensor; out: Tensor }): void {
    this.#run('pixelShuffle2x', { input: this.#own(a?.input, 'input'), out: this.#own(a?.out, 'out') }, []);
  }

  /**
   * Spatial patchify of the next-scale input (the inverse mapping): NCHW latent [B, c, 2h, 2w] -> tokens
   * [B, h*w, 4c] (token r*w + q, channel c*4 + dy*2 + dx = latent[c, 2r+dy, 2q+dx]). Any dtype.
   */
  pixelUnshuffle2x(a: { input: Tensor; out: Tensor }): void {
    this.#run('pixelUnshuffle2x', { input: this.#own(a?.input, 'input'), out: this.#own(a?.out, 'out') }, []);
  }

  /** out = a + b elementwise (same shape and dtype, f32 or bf16); out may be a or b. */
  add(a: { a: Tensor; b: Tensor; out: Tensor }): void {
    this.#run('add', { a: this.#own(a?.a, 'a'), b: this.#own(a?.b, 'b'), out: this.#own(a?.out, 'out') }, []);
  }

  /**
   * Moves data between layouts: `input` (dims[0]*dims[1]*dims[2]*dims[3] elements, any shape; with `inOffset`, that
   * many from element inOffset on) viewed as contiguous [A, B, C, D] is written to `out` viewed as [A, C, B, D],
   * starting at element `outOffset` of out (default 0):
   * out[outOffset + ((a*C + c)*B + b)*D + d] = input[inOffset + ((a*B + b)*C + c)*D + d]. With B or C = 1 it is a
   * plain copy: a reshape, or a slice read from or written into a larger tensor. Any dtype (out has input's); no
   * aliasing. E.g. attention output [rows, heads, L, c] -> [rows, L, heads*c] with dims [rows, heads, L, c].
   */
  transpose12(a: { input: Tensor; out: Tensor; dims: readonly [number, number, number, number]; outOffset?: number; inOffset?: number }): void {
    this.#run(
      'transpose12',
      {
        input: this.#own(a?.input, 'input'), out: this.#own(a?.out, 'out'), dims: a?.dims ? [...a.dims] : undefined, outOffset: a?.outOffset ?? 0,
        inOffset: a?.inOffset,
      },
      [],
    );
  }

  /** out = input converted between f32 and bf16 (e.g. the summed codes, f32, into a bf16 VAE decoder). */
  cast(a: CastArgs): void {
    this.#run('cast', { input: this.#own(a?.input, 'input'), out: this.#own(a?.out, 'out') }, []);
  }

  /** The decoded image as 8-bit pixels, exactly as the official clamp -> (x+1)/2*255 -> truncate. */
  imageToU8(a: ImageToU8Args): void {
    this.#run('imageToU8', { image: this.#own(a?.image, 'image'), out: this.#own(a?.out, 'out'), bgr: a?.bgr ?? false }, []);
  }
}
