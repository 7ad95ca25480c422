/**
 * The per-layer self-attention KV cache of the Infinity sampling loop (spec sec. 11.1), and the hook through which
 * a KV policy (ScaleKV compression) manages it.
 *
 * Layout: per layer, K and V buffers [rows, heads, capacity, headDim] (category 'kv'). Rows [0, len) of every
 * (row, head) are valid. Each scale's keys/values are written by `qkNormRope` at row `len` (K after cosine
 * normalisation and RoPE, V raw incl. v_bias), then attention runs over [0, len + n), then the layer's length grows
 * by n (`commit`). A policy may compact a layer after its attention at a scale (`ops.evictCompact` moves the kept
 * rows to the front, per (row, head)) and set the new length with `setLength`. RoPE stays correct under
 * compaction because K is stored rotated and positions come from the schedule, not from the cache offset.
 */
import type { DType } from '../dtype.js';
import type { Engine, Tensor } from '../engine.js';
import { fail } from '../errors.js';

export interface KvCacheOptions {
  layers: number;
  /** Batch rows (2B with CFG). */
  rows: number;
  heads: number;
  headDim: number;
  /** Token capacity of every layer, or one per layer. */
  capacity: number | readonly number[];
  /** 'f32' or 'bf16'. */
  dtype: DType;
}

/** What a policy sees after layer `layer` attended at scale `scaleIndex`. */
export interface AfterAttentionContext {
  engine: Engine;
  cache: KvCache;
  layer: number;
  scaleIndex: number;
  /** The scale grids (h, w) of this generation, and the first token of every scale. */
  schedule: readonly (readonly [number, number])[];
  scaleStarts: readonly number[];
  /** [rows, n, C]: the self-attention input (AdaLN-modulated LayerNorm of the block input). */
  input: Tensor;
  /** [rows, n, 3C]: input @ W_qkvᵀ without bias; the first C columns are ScaleKV's raw scoring query. */
  qkv: Tensor;
  /** [rows, heads, n, headDim]: the attention query (normalised, scaled, rotated). */
  q: Tensor;
  /** Tokens of this scale, already committed: the layer's cache length is cache.len(layer). */
  tokens: number;
}

/**
 * Decides the cache capacity and may compact layers as generation proceeds. `afterAttention` runs after every
 * (layer, scale) attention, with this scale's K/V already counted in cache.len(layer); it queues its work on the
 * engine (no host round trip is needed) and calls cache.setLength for the layers it compacts.
 */
export interface KvPolicy {
  readonly name: string;
  /** Token capacity per layer for a schedule of `totalTokens` tokens (scale sizes given for budget plans). */
  capacity(layer: number, scaleTokens: readonly number[]): number;
  /** Called once before the first scale of a generation. */
  begin?(cache: KvCache): void;
  afterAttention?(ctx: AfterAttentionContext): void | Promise<void>;
  /** Called when the generation ends (normally or not); frees policy state. */
  end?(): void;
}

/** The reference behaviour: keep every token (capacity = the whole schedule), never compact. */
export class FullKvPolicy implements KvPolicy {
  readonly name = 'full';
  capacity(_layer: number, scaleTokens: readonly number[]): number {
    return scaleTokens.reduce((a, b) => a + b, 0);
  }
}

export class KvCache {
  readonly engine: Engine;
  readonly layers: number;
  readonly rows: number;
  readonly heads: number;
  readonly headDim: number;
  readonly dtype: DType;
  readonly #k: Tensor[] = [];
  readonly #v: Tensor[] = [];
  readonly #len: number[];
  readonly #cap: number[];

  constructor(engine: Engine, o: KvCacheOptions) {
    this.engine = engine;
    this.layers = o.layers;
    this.rows = o.rows;
    this.heads = o.heads;
    this.headDim = o.headDim;
    this.dtype = o.dtype;
    this.#cap = Array.from({ length: o.layers }, (_, l) => (typeof o.capacity === 'number' ? o.capacity : o.capacity[l]));
    for (const c of this.#cap) if (!Number.isSafeInteger(c) || c < 1) fail('ERR_INVALID_ARG', `KvCache: capacity ${c} must be a positive integer`);
    this.#len = new Array(o.layers).fill(0);
    try {
      for (let l = 0; l < o.layers; l++) {
        const shape = [o.rows, o.heads, this.#cap[l], o.headDim];
        this.#k.push(engine.empty(shape, o.dtype, { category: 'kv' }));
        this.#v.push(engine.empty(shape, o.dtype, { category: 'kv' }));
      }
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  /** [rows, heads, capacity, headDim] buffers of a layer. */
  k(layer: number): Tensor {
    return this.#k[layer];
  }
  v(layer: number): Tensor {
    return this.#v[layer];
  }
  /** Valid tokens of a layer. */
  len(layer: number): number {
    return this.#len[layer];
  }
  capacity(layer: number): number {
    return this.#cap[layer];
  }

  /** Where `tokens` new entries of `layer` go (row offset for qkNormRope); throws ERR_BUDGET when they do not fit. */
  reserve(layer: number, tokens: number): number {
    const at = this.#len[layer];
    if (at + tokens > this.#cap[layer])
      fail('ERR_BUDGET', `KV cache layer ${layer}: ${at} cached + ${tokens} new tokens exceed its capacity ${this.#cap[layer]}`);
    return at;
  }

  /** Counts `tokens` entries written at reserve()'s offset. */
  commit(layer: number, tokens: number): void {
    this.reserve(layer, tokens);
    this.#len[layer] += tokens;
  }

  /** The attention history of a layer: its buffers and valid length. */
  history(layer: number): { k: Tensor; v: Tensor; len: number } {
    return { k: this.#k[layer], v: this.#v[layer], len: this.#len[layer] };
  }

  /** After a policy compacted a layer (evictCompact), its new valid length. */
  setLength(layer: number, len: number): void {
    if (!Number.isSafeInteger(len) || len < 0 || len > this.#cap[layer])
      fail('ERR_INVALID_ARG', `KV cache layer ${layer}: length ${len} outside [0, ${this.#cap[layer]}]`);
    this.#len[layer] = len;
  }

  /** Bytes held by all layers. */
  get bytes(): number {
    let n = 0;
    for (const t of [...this.#k, ...this.#v]) n += t.bytes;
    return n;
  }

  dispose(): void {
    for (const t of [...this.#k, ...this.#v]) t.dispose();
    this.#k.length = 0;
    this.#v.length = 0;
  }
}
