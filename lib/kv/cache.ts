/**
 * The per-layer self-attention KV cache of the Infinity sampling loop (spec sec. 11.1).
 *
 * Layout (the planner/policy contract):
 * - **History**, per layer: K and V buffers [rows, heads, capacity_l, headDim] (category 'kv'); rows [0, len) of
 *   every (row, head) are valid. capacity_l = `policy.capacity(layer, scaleTokens)`: the most history the layer ever
 *   holds, NOT counting a scale it does not keep whole.
 * - **Scale scratch**: ONE K/V pair [rows, heads, n_si, headDim] (category 'scratch', the cache dtype) shared by the
 *   layers of a scale, allocated the first time a layer places its K/V there and released by `endScale`.
 *
 * Per (layer, scale): `place(layer, placement)` says where qkNormRope writes this scale's K/V — after the history
 * ('append': the history grows by the scale, no copy) or into the scratch ('decide'); the attention reads
 * `attentionOperands(layer)`; after a 'decide' placement the policy keeps entries of [history ‖ current] with
 * `compact` (or none). These are the only ways the cache changes, and each checks lengths against capacities.
 * RoPE stays correct under compaction because K is stored rotated and positions come from the schedule.
 */
import type { DType } from '../dtype.js';
import type { Engine, Tensor } from '../engine.js';
import { fail } from '../errors.js';
import type { KVPair } from '../ops.js';
import type { KvPlacement } from './policy.js';

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

/** Where a layer writes this scale's K/V: rows offset .. offset + tokens of k and v. */
export interface KvTarget {
  k: Tensor;
  v: Tensor;
  offset: number;
}

type LayerState = 'idle' | 'appended' | 'scratch' | 'compacted';

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
  readonly #state: LayerState[];
  #tokens = 0;
  #scratch: KVPair | undefined;

  constructor(engine: Engine, o: KvCacheOptions) {
    this.engine = engine;
    this.layers = o.layers;
    this.rows = o.rows;
    this.heads = o.heads;
    this.headDim = o.headDim;
    this.dtype = o.dtype;
    if (typeof o.capacity !== 'number' && o.capacity.length !== o.layers)
      fail('ERR_INVALID_ARG', `KvCache: ${o.capacity.length} capacities for ${o.layers} layers`);
    this.#cap = Array.from({ length: o.layers }, (_, l) => (typeof o.capacity === 'number' ? o.capacity : o.capacity[l]));
    for (const c of this.#cap) if (!Number.isSafeInteger(c) || c < 0) fail('ERR_INVALID_ARG', `KvCache: capacity ${c} must be a non-negative integer`);
    this.#len = new Array(o.layers).fill(0);
    this.#state = new Array(o.layers).fill('idle');
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
    return this.#k[this.#layer(layer)];
  }
  v(layer: number): Tensor | undefined {
    return this.#v[this.#layer(layer)];
  }
  /** Valid history tokens of a layer (after 'append', the current scale included). */
  len(layer: number): number {
    return this.#len[this.#layer(layer)];
  }
  capacity(layer: number): number {
    return this.#cap[this.#layer(layer)];
  }

  /** The valid history of a layer (undefined when empty): its buffers and length. */
  history(layer: number): { k: Tensor; v: Tensor; len: number } | undefined {
    const l = this.#layer(layer);
    const k = this.#k[l];
    const v = this.#v[l];
    if (!k || !v || this.#len[l] === 0) return undefined;
    return { k, v, len: this.#len[l] };
  }

  /** Starts a scale of `tokens` tokens: every layer places its K/V anew. */
  beginScale(tokens: number): void {
    if (!Number.isSafeInteger(tokens) || tokens < 1) fail('ERR_INVALID_ARG', `KvCache: a scale of ${tokens} tokens`);
    this.endScale();
    this.#tokens = tokens;
  }

  /** Tokens of the current scale (0 outside beginScale .. endScale). */
  get scaleTokens(): number {
    return this.#tokens;
  }

  /**
   * Where layer `layer` writes this scale's K/V (qkNormRope's k, v and kvOffset). 'append' extends the history by
   * the scale in place (ERR_BUDGET when it would exceed the layer's capacity); 'decide' hands out the scale's
   * scratch, whose entries compact() can keep.
   */
  place(layer: number, placement: KvPlacement): KvTarget {
    const l = this.#layer(layer);
    const n = this.#tokens;
    if (n === 0) fail('ERR_INTERNAL', 'KvCache: place() outside beginScale .. endScale');
    if (this.#state[l] !== 'idle') fail('ERR_INTERNAL', `KV cache layer ${l}: this scale was already placed`);
    if (placement === 'append') {
      const len = this.#len[l];
      if (len + n > this.#cap[l])
        fail('ERR_BUDGET', `KV cache layer ${l}: ${len} cached + ${n} new tokens exceed its history capacity ${this.#cap[l]}`);
      this.#len[l] = len + n;
      this.#state[l] = 'appended';
      return { k: this.#k[l] as Tensor, v: this.#v[l] as Tensor, offset: len };
    }
    if (placement !== 'decide') fail('ERR_INVALID_ARG', `KvCache: placement must be 'append' or 'decide', got ${String(placement)}`);
    this.#state[l] = 'scratch';
    return { ...this.#scratchPair(), offset: 0 };
  }

  /** The keys/values layer `layer` attends over at this scale: its history, and the scratch when placed there. */
  attentionOperands(layer: number): { history?: KVPair & { len: number }; current?: KVPair } {
    const l = this.#layer(layer);
    if (this.#state[l] === 'idle' || this.#state[l] === 'compacted') fail('ERR_INTERNAL', `KV cache layer ${l}: no scale placed to attend over`);
    return { history: this.history(l), current: this.#state[l] === 'scratch' ? this.#scratch : undefined };
  }

  /**
   * After a 'decide' placement: keeps the entries `keep` of [history ‖ current] at the front of the history, once per
   * layer and scale. `keep` holds per (row, head) lists of `count` strictly increasing positions (non-decreasing with
   * `repeats`: a repeated position is kept once per occurrence), as [rows, heads, count] host or device int32.
   */
  compact(layer: number, keep: Int32Array | Tensor, count: number, repeats = false): void {
    const l = this.#layer(layer);
    if (this.#state[l] !== 'scratch') fail('ERR_INTERNAL', `KV cache layer ${l}: compact() needs this scale placed with 'decide' and not yet compacted`);
    const keyLen = this.#len[l] + this.#tokens;
    if (!Number.isSafeInteger(count) || count < 0 || count > this.#cap[l] || count > keyLen)
      fail('ERR_BUDGET', `KV cache layer ${l}: keeping ${count} of ${keyLen} entries (history capacity ${this.#cap[l]})`);
    const listed = keep instanceof Int32Array ? keep.length : keep.shape.length === 3 && keep.shape[0] === this.rows && keep.shape[1] === this.heads ? keep.shape[2] * this.rows * this.heads : -1;
    if (listed !== this.rows * this.heads * count)
      fail('ERR_SHAPE', `KV cache layer ${l}: keep must hold ${this.rows} x ${this.heads} lists of ${count} positions`);
    this.#state[l] = 'compacted';
    if (count > 0) {
      const history = { k: this.#k[l] as Tensor, v: this.#v[l] as Tensor, len: this.#len[l] };
      this.engine.ops.evictCompact({ history, current: this.#scratch, keep, repeats });
    }
    this.#len[l] = count;
  }

  /** Releases the scale's scratch. */
  endScale(): void {
    this.#scratch?.k.dispose();
    this.#scratch?.v.dispose();
    this.#scratch = undefined;
    this.#tokens = 0;
    this.#state.fill('idle');
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

  #layer(layer: number): number {
    if (!Number.isSafeInteger(layer) || layer < 0 || layer >= this.layers) fail('ERR_INVALID_ARG', `KvCache: layer ${layer} outside [0, ${this.layers})`);
    return layer;
  }

  #scratchPair(): KVPair {
    if (!this.#scratch) {
      const shape = [this.rows, this.heads, this.#tokens, this.headDim];
      const k = this.engine.empty(shape, this.dtype, { category: 'scratch' });
      try {
        this.#scratch = { k, v: this.engine.empty(shape, this.dtype, { category: 'scratch' }) };
      } catch (e) {
        k.dispose();
        throw e;
      }
    }
    return this.#scratch;
  }
}
