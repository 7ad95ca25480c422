/**
 * The per-layer self-attention KV cache of the Infinity sampling loop (spec sec. 11.1), and the hook through which
 * a KV policy (ScaleKV compression, baselines) manages it.
 *
 * Layout (the planner/policy contract):
 * - **History**, per layer: K and V buffers [rows, heads, capacity_l, headDim] (category 'kv'); rows [0, len) of
 *   every (row, head) are valid. capacity_l = `policy.capacity(layer, scaleTokens)`: the most history the layer ever
 *   holds, NOT counting the scale being computed.
 * - **Current scale**: ONE scratch K/V pair [rows, heads, n_si, headDim] (category 'scratch', the cache dtype),
 *   allocated by `beginScale`, written by `qkNormRope` in every layer in turn (K cosine-normalised and rotated,
 *   V raw incl. v_bias), released by `endScale` (the stream-ordered allocator reuses it).
 * - Attention of layer l at scale si = ops.attention(q, history_l, current). Then the policy's `afterAttention`
 *   decides what of [history ‖ current] stays: ops.evictCompact(history, current, keep) + setLength. Without an
 *   `afterAttention` (and in FullKvPolicy) every current row is appended, except at the last scale of the schedule,
 *   whose K/V nothing reads.
 * RoPE stays correct under compaction because K is stored rotated and positions come from the schedule.
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
  /** History capacity (tokens) of every layer, or one per layer; 0 is allowed (no buffer). */
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
  /** True at the last scale of the schedule: its K/V are never needed again. */
  lastScale: boolean;
  /** The scale grids (h, w) of this generation, and the first token of every scale. */
  schedule: readonly (readonly [number, number])[];
  scaleStarts: readonly number[];
  /** [rows, n, C]: the self-attention input (AdaLN-modulated LayerNorm of the block input). */
  input: Tensor;
  /** [rows, n, 3C]: input @ W_qkvᵀ without bias; the first C columns are ScaleKV's raw scoring query. */
  qkv: Tensor;
  /** [rows, heads, n, headDim]: the attention query (normalised, scaled, rotated). */
  q: Tensor;
  /** Tokens of this scale (= the current scratch's length). History length: cache.len(layer). */
  tokens: number;
}

/**
 * Decides the history capacity and what stays after every (layer, scale) attention. `afterAttention` queues its
 * work on the engine and must leave the layer consistent: call cache.appendCurrent / cache.compact (or nothing at
 * the last scale).
 */
export interface KvPolicy {
  readonly name: string;
  /** History capacity of a layer in tokens (excluding the scale being computed) for a schedule of these scale sizes. */
  capacity(layer: number, scaleTokens: readonly number[]): number;
  /** Called once before the first scale of a generation. */
  begin?(cache: KvCache): void;
  afterAttention?(ctx: AfterAttentionContext): void | Promise<void>;
  /** Called when the generation ends (normally or not); frees policy state. */
  end?(): void;
}

/** The default after-attention step: append the current scale (not at the last scale). */
export function appendUnlessLast(ctx: AfterAttentionContext): void {
  if (!ctx.lastScale) ctx.cache.appendCurrent(ctx.layer);
}

/** The reference behaviour: keep every token; history capacity = all tokens but the last scale's. */
export class FullKvPolicy implements KvPolicy {
  readonly name = 'full';
  capacity(_layer: number, scaleTokens: readonly number[]): number {
    return scaleTokens.slice(0, -1).reduce((a, b) => a + b, 0);
  }
  afterAttention(ctx: AfterAttentionContext): void {
    appendUnlessLast(ctx);
  }
}

export class KvCache {
  readonly engine: Engine;
  readonly layers: number;
  readonly rows: number;
  readonly heads: number;
  readonly headDim: number;
  readonly dtype: DType;
  readonly #k: (Tensor | undefined)[] = [];
  readonly #v: (Tensor | undefined)[] = [];
  readonly #len: number[];
  readonly #cap: number[];
  #curK: Tensor | undefined;
  #curV: Tensor | undefined;

  constructor(engine: Engine, o: KvCacheOptions) {
    this.engine = engine;
    this.layers = o.layers;
    this.rows = o.rows;
    this.heads = o.heads;
    this.headDim = o.headDim;
    this.dtype = o.dtype;
    this.#cap = Array.from({ length: o.layers }, (_, l) => (typeof o.capacity === 'number' ? o.capacity : o.capacity[l]));
    for (const c of this.#cap) if (!Number.isSafeInteger(c) || c < 0) fail('ERR_INVALID_ARG', `KvCache: capacity ${c} must be a non-negative integer`);
    this.#len = new Array(o.layers).fill(0);
    try {
      for (let l = 0; l < o.layers; l++) {
        const shape = [o.rows, o.heads, this.#cap[l], o.headDim];
        this.#k.push(this.#cap[l] > 0 ? engine.empty(shape, o.dtype, { category: 'kv' }) : undefined);
        this.#v.push(this.#cap[l] > 0 ? engine.empty(shape, o.dtype, { category: 'kv' }) : undefined);
      }
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  /** [rows, heads, capacity, headDim] history buffers of a layer (undefined when its capacity is 0). */
  k(layer: number): Tensor | undefined {
    return this.#k[layer];
  }
  v(layer: number): Tensor | undefined {
    return this.#v[layer];
  }
  /** Valid history tokens of a layer. */
  len(layer: number): number {
    return this.#len[layer];
  }
  capacity(layer: number): number {
    return this.#cap[layer];
  }

  /** Allocates the shared current-scale scratch K/V [rows, heads, tokens, headDim]. */
  beginScale(tokens: number): { k: Tensor; v: Tensor } {
    this.endScale();
    const shape = [this.rows, this.heads, tokens, this.headDim];
    this.#curK = this.engine.empty(shape, this.dtype, { category: 'scratch' });
    try {
      this.#curV = this.engine.empty(shape, this.dtype, { category: 'scratch' });
    } catch (e) {
      this.endScale();
      throw e;
    }
    return { k: this.#curK, v: this.#curV };
  }

  /** The current scale's scratch K/V (beginScale must have run). */
  current(): { k: Tensor; v: Tensor } {
    if (!this.#curK || !this.#curV) fail('ERR_INTERNAL', 'KvCache: no current scale (beginScale was not called)');
    return { k: this.#curK, v: this.#curV };
  }

  /** Tokens of the current scale (0 when none). */
  get currentTokens(): number {
    return this.#curK?.shape[2] ?? 0;
  }

  /** Releases the current-scale scratch. */
  endScale(): void {
    this.#curK?.dispose();
    this.#curV?.dispose();
    this.#curK = undefined;
    this.#curV = undefined;
  }

  /** The attention history of a layer (undefined when empty): its buffers and valid length. */
  history(layer: number): { k: Tensor; v: Tensor; len: number } | undefined {
    const k = this.#k[layer];
    const v = this.#v[layer];
    if (!k || !v || this.#len[layer] === 0) return undefined;
    return { k, v, len: this.#len[layer] };
  }

  /**
   * Keeps the entries `keep` of [history ‖ current] (per (row, head) lists of `count` strictly increasing positions,
   * [rows, heads, count] host or device int32) at the front of the history; the new length is `count`. With
   * `repeats` the lists are non-decreasing and a repeated position is kept once per occurrence.
   */
  compact(layer: number, keep: Int32Array | Tensor, count: number, repeats = false): void {
    if (!Number.isSafeInteger(count) || count < 0 || count > this.#cap[layer])
      fail('ERR_BUDGET', `KV cache layer ${layer}: keeping ${count} entries exceeds its history capacity ${this.#cap[layer]}`);
    const len = this.#len[layer];
    if (count === 0) {
      this.#len[layer] = 0;
      return;
    }
    const k = this.#k[layer] as Tensor;
    const v = this.#v[layer] as Tensor;
    const cur = this.currentTokens > 0 ? this.current() : undefined;
    this.engine.ops.evictCompact({ history: { k, v, len }, current: cur, keep, repeats });
    this.#len[layer] = count;
  }

  /** Appends the whole current scale to the history of a layer (identity keep: history rows are not moved). */
  appendCurrent(layer: number): void {
    const len = this.#len[layer];
    const n = this.currentTokens;
    const total = len + n;
    if (total > this.#cap[layer])
      fail('ERR_BUDGET', `KV cache layer ${layer}: ${len} cached + ${n} new tokens exceed its history capacity ${this.#cap[layer]}`);
    const ph = this.rows * this.heads;
    const keep = new Int32Array(ph * total);
    for (let p = 0; p < ph; p++) for (let i = 0; i < total; i++) keep[p * total + i] = i;
    this.compact(layer, keep, total);
  }

  /** After a policy compacted a layer itself (evictCompact), its new valid length. */
  setLength(layer: number, len: number): void {
    if (!Number.isSafeInteger(len) || len < 0 || len > this.#cap[layer])
      fail('ERR_INVALID_ARG', `KV cache layer ${layer}: length ${len} outside [0, ${this.#cap[layer]}]`);
    this.#len[layer] = len;
  }

  /** Bytes held by the history buffers of all layers. */
  get bytes(): number {
    let n = 0;
    for (const t of [...this.#k, ...this.#v]) n += t?.bytes ?? 0;
    return n;
  }

  dispose(): void {
    this.endScale();
    for (const t of [...this.#k, ...this.#v]) t?.dispose();
    this.#k.length = 0;
    this.#v.length = 0;
  }
}
