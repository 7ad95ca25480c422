import type { Engine, Tensor } from './engine.js';
import { fail, rethrowNative } from './errors.js';
import type { NativeTensor } from './native.js';

/** Index lists may be given as host arrays; they are uploaded for the one op that uses them. */
export type IndexInput = Int32Array | Tensor;

export interface KVPair {
  k: Tensor;
  v: Tensor;
}

export interface AttentionArgs {
  /** [rows, heads, Lq, headDim], f32 or bf16. */
  q: Tensor;
  /** [rows, heads, capacity, headDim]; the first `len` (default: capacity) rows are valid. */
  history?: KVPair & {
    len?: number;
    /** [rows, heads, n] int32: read history rows through these indices (each in [0, len)). */
    gather?: IndexInput;
  };
  /** [rows, heads, Lc, headDim]: the current scale's keys/values. */
  current?: KVPair;
  /** [rows, heads, Lq, headDim], same dtype as q. May be omitted when only the window output is wanted. */
  out?: Tensor;
  /** Softmax scale applied to q.k. */
  scale: number;
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
  /** The layer's buffers; rows [0, len) are valid. Compacted in place. */
  history: KVPair & { len: number };
  current?: KVPair;
  /** [rows, heads, nKeep] int32, strictly increasing per (row, head), into [0, len + Lc). */
  keep: IndexInput;
}

export type ScoreMode = 'logits' | 'probs';
export type PoolingMode = 'none' | 'max' | 'avg';

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

/** The kernel-level ops of an engine. Each validates at the call, then runs in queue order. */
export class Ops {
  readonly #engine: Engine;
  constructor(engine: Engine) {
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

  #run(name: 'attention' | 'evictCompact' | 'selection', args: Record<string, unknown>, temps: { tensor?: Tensor; temp: boolean }[]) {
    try {
      (this.#engine.native[name] as (a: Record<string, unknown>) => void)(args);
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
    const windowRows = this.#indices(a.window?.rows, null, 'window.rows');
    this.#run(
      'attention',
      {
        q,
        histK: this.#own(a.history?.k, 'history.k'),
        histV: this.#own(a.history?.v, 'history.v'),
        histLen: a.history?.len,
        gather: gather.tensor?.native,
        curK: this.#own(a.current?.k, 'current.k'),
        curV: this.#own(a.current?.v, 'current.v'),
        out: this.#own(a.out, 'out'),
        scale: a.scale,
        windowRows: windowRows.tensor?.native,
        windowLogits: this.#own(a.window?.logits, 'window.logits'),
        windowLse: this.#own(a.window?.lse, 'window.lse'),
      },
      [gather, windowRows],
    );
  }

  /** Moves the kept K/V rows to the front of the history, in place. Returns the new history length. */
  evictCompact(a: EvictCompactArgs): number {
    if (!a?.history?.k) fail('ERR_INVALID_ARG', 'evictCompact: history is required');
    const k = this.#own(a.history.k, 'history.k');
    const [rows, heads] = a.history.k.shape;
    const n = a.keep instanceof Int32Array ? a.keep.length / (rows * heads) : a.keep?.shape?.[2];
    if (!Number.isInteger(n)) fail('ERR_SHAPE', `evictCompact: keep must hold rows*heads = ${rows * heads} equal lists`);
    const keep = this.#indices(a.keep, [rows, heads, n as number], 'keep');
    this.#run(
      'evictCompact',
      {
        histK: k,
        histV: this.#own(a.history.v, 'history.v'),
        histLen: a.history.len,
        curK: this.#own(a.current?.k, 'current.k'),
        curV: this.#own(a.current?.v, 'current.v'),
        keep: keep.tensor?.native,
      },
      [keep],
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
}
