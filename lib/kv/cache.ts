/**
 * The per-layer self-attention KV cache of the Infinity sampling loop (spec sec. 11.1), held in a paged arena.
 *
 * Layout (the planner/policy contract):
 * - **Pool**: one K and one V tensor [pages, heads, pageTokens, headDim] per cache (category 'kv'). A page holds
 *   `pageTokens` consecutive history tokens of one row for every head (the heads of a row always keep the same count,
 *   so one table serves them all, and a page's K rows for one head are contiguous, as the attention tiles read them).
 * - **Page tables**: per layer, [rows, tablePages_l] int32 (host copy + a device copy, category 'kv'); history token t
 *   of row r is in page table[r, t / pageTokens], slot t % pageTokens. tablePages_l covers the layer's capacity,
 *   `policy.capacity(layer, scaleTokens)`, the most history it ever holds; entries past its length are -1.
 * - **Scale scratch**: ONE contiguous K/V pair [rows, heads, n_si, headDim] (category 'scratch', the cache dtype)
 *   shared by the layers of a scale, allocated the first time a layer places its K/V there and released by `endScale`.
 *
 * A layer holds pages for exactly its length (rounded up to whole pages per row), so the pool need not cover every
 * layer at its largest at once: `kvPoolPages` sizes it from the lengths a policy goes through, the in-scale
 * transitions included (a layer that grows at scale s takes its pages before a later layer that shrinks at s gives
 * its own back). Pages freed by a compaction serve the next layer at once: the engine's queue orders the reuse.
 *
 * Per (layer, scale): `place(layer, placement)` says where qkNormRope writes this scale's K/V — after the history
 * ('append': the history grows by the scale into new pages, no copy) or into the scratch ('decide'); the attention
 * reads `attentionOperands(layer)`; after a 'decide' placement the policy keeps entries of [history ‖ current] with
 * `compact` (or none), which moves them to the front of the layer's pages and frees the pages past them. These are
 * the only ways the cache changes, and each checks lengths against capacities and the pool.
 * RoPE stays correct under compaction because K is stored rotated and positions come from the schedule.
 *
 * **8-bit K/V** (`kvFormat` 'int8' or 'fp8', lib/kv/quant.ts): the pools and the scratch are u8, and each has a u8
 * tensor of the same layout without headDim ([pages, heads, pageTokens], [rows, heads, n_si]) in its category, one
 * scale byte per token for its K and V rows; qkNormRope quantises as it writes, attention dequantises as it reads,
 * evictCompact moves codes and scale bytes.
 */
import type { DType } from '../dtype.js';
import type { Engine, Tensor } from '../engine.js';
import { fail } from '../errors.js';
import type { KVPair, KvFormat } from '../ops.js';
import type { KvPlacement } from './policy.js';
import { dequantiseKvRows } from './quant.js';

/**
 * Tokens per page on an engine of `backend` unless a cache says otherwise (`KvCacheOptions.pageTokens`). On cuda
 * (and on emu and count, which stand for it) 1: the arena holds exactly the tokens the policy keeps, and the
 * attention's row pre-pass resolves every key's pool row once per call, so the tensor-core kernel's tiles cost the
 * same for any page size. On cpu 16: the flash body reads each key row of the history where the page table says,
 * and below 16 tokens a page the reads of long histories cost up to a tenth of the attention (bench/RESULTS.md).
 */
export function kvPageTokensFor(backend: string): number {
  return backend === 'cpu' ? 16 : 1;
}

export interface KvCacheOptions {
  layers: number;
  /** Batch rows (2B with CFG). */
  rows: number;
  heads: number;
  headDim: number;
  /** History capacity (tokens) of every layer, or one per layer; 0 is allowed (the layer never keeps anything). */
  capacity: number | readonly number[];
  /** 'f32' or 'bf16': the model's activations (and the K/V with kvFormat 'plain'). */
  dtype: DType;
  /** How K/V are stored: 'plain' (default, in `dtype`), or 8-bit 'int8' / 'fp8' with a scale byte per (token, head). */
  kvFormat?: KvFormat;
  /** Tokens per page; default `kvPageTokensFor(engine.backend)`. A (layer, row) holds under one page more than it keeps. */
  pageTokens?: number;
  /**
   * Pages in the pool (per K and V). Default: every layer at its capacity at once, rows x sum of ceil(capacity /
   * pageTokens); `kvPoolPages` gives the tighter figure for a policy's lengths.
   */
  poolPages?: number;
}

/** Where a layer writes this scale's K/V: token offset .. offset + tokens of k and v, through pageTable when paged. */
export interface KvTarget {
  k: Tensor;
  v: Tensor;
  /** 8-bit K/V: where the tokens' scale bytes go. */
  scales?: Tensor;
  offset: number;
  /** [rows, tablePages] int32 page table of k and v (absent for the contiguous scratch). */
  pageTable?: Tensor;
}

/** A layer's history as the ops read it: the pool, its length and the layer's page table. */
export type KvHistory = KVPair & { len: number; pageTable: Tensor };

type LayerState = 'idle' | 'appended' | 'scratch' | 'compacted';

const pagesFor = (tokens: number, pageTokens: number) => Math.ceil(tokens / pageTokens);

/**
 * Pages per K (and V) pool a generation needs when every layer's history length after scale si is
 * `lengths[si][layer]` (si over every scale but the last, whose K/V are never kept): the most pages live at any
 * point of the layer-by-layer loop. While layer l works on scale si, the layers before it already hold their new
 * length, those after it their old one, and layer l the larger of the two (a growing layer takes its pages before
 * writing, a shrinking one frees them after its compaction).
 */
export function kvPoolPages(lengths: readonly (readonly number[])[], rows: number, pageTokens: number): number {
  let most = 0;
  let before: readonly number[] = lengths[0]?.map(() => 0) ?? [];
  for (const after of lengths) {
    if (after.length !== before.length) fail('ERR_INVALID_ARG', 'kvPoolPages: every scale needs one length per layer');
    let pages = before.reduce((s, len) => s + pagesFor(len, pageTokens), 0);
    for (let l = 0; l < after.length; l++) {
      const old = pagesFor(before[l], pageTokens);
      const next = pagesFor(after[l], pageTokens);
      most = Math.max(most, pages - old + Math.max(old, next));
      pages += next - old;
    }
    most = Math.max(most, pages);
    before = after;
  }
  return rows * most;
}

/**
 * Pages per K (and V) pool held at the scale boundaries of the same lengths: the most, over the scales, of what every
 * layer keeps once the scale is done (what a policy's budgets describe; `kvPoolPages` adds the in-scale transitions).
 */
export function kvBoundaryPages(lengths: readonly (readonly number[])[], rows: number, pageTokens: number): number {
  return rows * Math.max(0, ...lengths.map((after) => after.reduce((s, len) => s + pagesFor(len, pageTokens), 0)));
}

export class KvCache {
  readonly engine: Engine;
  readonly layers: number;
  readonly rows: number;
  readonly heads: number;
  readonly headDim: number;
  readonly dtype: DType;
  readonly kvFormat: KvFormat;
  readonly pageTokens: number;
  readonly poolPages: number;
  readonly #poolK: Tensor | undefined;
  readonly #poolV: Tensor | undefined;
  readonly #scales: Tensor | undefined;
  /** Free pages, taken from the end (the most recently freed first: their lines may still be in cache). */
  readonly #free: number[];
  readonly #tables: Int32Array[];
  readonly #deviceTables: (Tensor | undefined)[] = [];
  readonly #dirty: boolean[];
  readonly #len: number[];
  readonly #cap: number[];
  readonly #state: LayerState[];
  #tokens = 0;
  #scratch: KVPair | undefined;
  #disposed = false;
  #peakPages = 0;
  #boundaryPages = 0;

  constructor(engine: Engine, o: KvCacheOptions) {
    this.engine = engine;
    this.layers = o.layers;
    this.rows = o.rows;
    this.heads = o.heads;
    this.headDim = o.headDim;
    this.dtype = o.dtype;
    this.kvFormat = o.kvFormat ?? 'plain';
    if (!['plain', 'int8', 'fp8'].includes(this.kvFormat)) fail('ERR_INVALID_ARG', `KvCache: kvFormat must be 'plain', 'int8' or 'fp8', got ${String(o.kvFormat)}`);
    this.pageTokens = o.pageTokens ?? kvPageTokensFor(engine.backend);
    if (!Number.isSafeInteger(this.pageTokens) || this.pageTokens < 1) fail('ERR_INVALID_ARG', `KvCache: pageTokens ${o.pageTokens} must be a positive integer`);
    if (typeof o.capacity !== 'number' && o.capacity.length !== o.layers)
      fail('ERR_INVALID_ARG', `KvCache: ${o.capacity.length} capacities for ${o.layers} layers`);
    this.#cap = Array.from({ length: o.layers }, (_, l) => (typeof o.capacity === 'number' ? o.capacity : o.capacity[l]));
    for (const c of this.#cap) if (!Number.isSafeInteger(c) || c < 0) fail('ERR_INVALID_ARG', `KvCache: capacity ${c} must be a non-negative integer`);
    const tablePages = this.#cap.map((c) => pagesFor(c, this.pageTokens));
    this.poolPages = o.poolPages ?? o.rows * tablePages.reduce((a, b) => a + b, 0);
    if (!Number.isSafeInteger(this.poolPages) || this.poolPages < 0) fail('ERR_INVALID_ARG', `KvCache: poolPages ${o.poolPages} must be a non-negative integer`);
    this.#free = Array.from({ length: this.poolPages }, (_, i) => this.poolPages - 1 - i);
    this.#tables = tablePages.map((n) => new Int32Array(o.rows * n).fill(-1));
    this.#dirty = new Array(o.layers).fill(false);
    this.#len = new Array(o.layers).fill(0);
    this.#state = new Array(o.layers).fill('idle');
    try {
      const shape = [this.poolPages, o.heads, this.pageTokens, o.headDim];
      const pools = this.poolPages > 0;
      this.#poolK = pools ? engine.empty(shape, this.#kvDtype, { category: 'kv' }) : undefined;
      this.#poolV = pools ? engine.empty(shape, this.#kvDtype, { category: 'kv' }) : undefined;
      const quantised = pools && this.kvFormat !== 'plain';
      this.#scales = quantised ? engine.empty(shape.slice(0, 3), 'u8', { category: 'kv' }) : undefined;
      for (let l = 0; l < o.layers; l++)
        this.#deviceTables.push(tablePages[l] > 0 ? engine.tensor(this.#tables[l], [o.rows, tablePages[l]], 'i32', { category: 'kv' }) : undefined);
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  /** Valid history tokens of a layer (after 'append', the current scale included). */
  len(layer: number): number {
    return this.#len[this.#layer(layer)];
  }
  capacity(layer: number): number {
    return this.#cap[this.#layer(layer)];
  }
  /** Pages of the pool not held by any layer. */
  get freePages(): number {
    return this.#free.length;
  }
  /** The most pages the layers held at once so far. */
  get peakPages(): number {
    return this.#peakPages;
  }
  /** The most pages the layers held at the end of a scale so far. */
  get boundaryPages(): number {
    return this.#boundaryPages;
  }
  /** Bytes of the device page tables. */
  get tableBytes(): number {
    return this.#deviceTables.reduce((a, t) => a + (t?.bytes ?? 0), 0);
  }
  /** The [rows, tablePages] page table of a layer (a copy). */
  pageTable(layer: number): Int32Array {
    return this.#tables[this.#layer(layer)].slice();
  }

  /** The valid history of a layer (undefined when empty): the pool, its length and the layer's page table. */
  history(layer: number): KvHistory | undefined {
    const l = this.#layer(layer);
    if (this.#len[l] === 0) return undefined;
    return { ...this.#pools(), len: this.#len[l], pageTable: this.#table(l) };
  }

  /**
   * Reads a layer's history back as contiguous [rows, heads, len, headDim] K and V: f32, raw bf16 bits, or (8-bit)
   * the codes times their scales as f32.
   */
  async readHistory(layer: number): Promise<{ k: Float32Array | Uint16Array; v: Float32Array | Uint16Array; len: number }> {
    const l = this.#layer(layer);
    const len = this.#len[l];
    const table = this.#tables[l];
    const scales = this.kvFormat === 'plain' || !this.#scales ? undefined : ((await this.#scales.read()) as Uint8Array);
    const read = async (pool: Tensor | undefined, values: boolean) => {
      if (!pool) return new Float32Array(0);
      const data = await pool.read();
      if (this.kvFormat === 'plain' || !scales) return data;
      return dequantiseKvRows(this.kvFormat, data as Uint8Array, scales, this.headDim, values);
    };
    const [poolK, poolV] = await Promise.all([read(this.#poolK, false), read(this.#poolV, true)]);
    const { rows, heads, headDim: d, pageTokens: P } = this;
    const gather = (pool: Float32Array | Int32Array | Uint8Array) => {
      const out = pool instanceof Float32Array ? new Float32Array(rows * heads * len * d) : new Uint16Array(rows * heads * len * d);
      const tablePages = table.length / rows;
      for (let r = 0; r < rows; r++)
        for (let h = 0; h < heads; h++)
          for (let t = 0; t < len; t++) {
            const page = table[r * tablePages + Math.floor(t / P)];
            const src = ((page * heads + h) * P + (t % P)) * d;
            out.set(pool.subarray(src, src + d), ((r * heads + h) * len + t) * d);
          }
      return out;
    };
    return { k: gather(poolK), v: gather(poolV), len };
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
   * Where layer `layer` writes this scale's K/V (qkNormRope's k, v, kvOffset and pageTable). 'append' extends the
   * history by the scale into new pages (ERR_BUDGET when it would exceed the layer's capacity or the pool); 'decide'
   * hands out the scale's scratch, whose entries compact() can keep.
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
      this.#resize(l, len + n);
      this.#len[l] = len + n;
      this.#state[l] = 'appended';
      return { ...this.#pools(), offset: len, pageTable: this.#table(l) };
    }
    if (placement !== 'decide') fail('ERR_INVALID_ARG', `KvCache: placement must be 'append' or 'decide', got ${String(placement)}`);
    this.#state[l] = 'scratch';
    return { ...this.#scratchPair(), offset: 0 };
  }

  /** The keys/values layer `layer` attends over at this scale: its history, and the scratch when placed there. */
  attentionOperands(layer: number): { history?: KvHistory; current?: KVPair; kvFormat: KvFormat } {
    const l = this.#layer(layer);
    if (this.#state[l] === 'idle' || this.#state[l] === 'compacted') fail('ERR_INTERNAL', `KV cache layer ${l}: no scale placed to attend over`);
    return { history: this.history(l), current: this.#state[l] === 'scratch' ? this.#scratch : undefined, kvFormat: this.kvFormat };
  }

  /**
   * After a 'decide' placement: keeps the entries `keep` of [history ‖ current] at the front of the history, once per
   * layer and scale. `keep` holds per (row, head) lists of `count` strictly increasing positions (non-decreasing with
   * `repeats`: a repeated position is kept once per occurrence), as [rows, heads, count] host or device int32.
   */
  compact(layer: number, keep: Int32Array | Tensor, count: number, repeats = false): void {
    const l = this.#layer(layer);
    if (this.#state[l] !== 'scratch') fail('ERR_INTERNAL', `KV cache layer ${l}: compact() needs this scale placed with 'decide' and not yet compacted`);
    const len = this.#len[l];
    const keyLen = len + this.#tokens;
    if (!Number.isSafeInteger(count) || count < 0 || count > this.#cap[l] || count > keyLen)
      fail('ERR_BUDGET', `KV cache layer ${l}: keeping ${count} of ${keyLen} entries (history capacity ${this.#cap[l]})`);
    const listed = keep instanceof Int32Array ? keep.length : keep.shape.length === 3 && keep.shape[0] === this.rows && keep.shape[1] === this.heads ? keep.shape[2] * this.rows * this.heads : -1;
    if (listed !== this.rows * this.heads * count)
      fail('ERR_SHAPE', `KV cache layer ${l}: keep must hold ${this.rows} x ${this.heads} lists of ${count} positions`);
    this.#state[l] = 'compacted';
    if (count > len) this.#resize(l, count);
    if (count > 0) {
      const history = { ...this.#pools(), len, pageTable: this.#table(l) };
      this.engine.ops.evictCompact({ history, current: this.#scratch, keep, repeats, kvFormat: this.kvFormat });
    }
    // Pages past the kept entries go back to the pool at once: the queue runs this compaction before any later
    // write to them.
    if (count < len) this.#resize(l, count);
    this.#len[l] = count;
  }

  /** Releases the scale's scratch. */
  endScale(): void {
    if (this.#tokens > 0) this.#boundaryPages = Math.max(this.#boundaryPages, this.poolPages - this.#free.length);
    for (const t of [this.#scratch?.k, this.#scratch?.v, this.#scratch?.scales]) t?.dispose();
    this.#scratch = undefined;
    this.#tokens = 0;
    this.#state.fill('idle');
  }

  /** Bytes of the K and V pools and their scale bytes (the page tables are not counted). */
  get bytes(): number {
    return [this.#poolK, this.#poolV, this.#scales].reduce((a, t) => a + (t?.bytes ?? 0), 0);
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.endScale();
    for (const t of [this.#poolK, this.#poolV, this.#scales, ...this.#deviceTables]) t?.dispose();
  }

  #layer(layer: number): number {
    if (this.#disposed) fail('ERR_DISPOSED', 'KvCache: used after dispose()');
    if (!Number.isSafeInteger(layer) || layer < 0 || layer >= this.layers) fail('ERR_INVALID_ARG', `KvCache: layer ${layer} outside [0, ${this.layers})`);
    return layer;
  }

  /** The device copy of a layer's page table, written (in queue order) when the host copy changed. */
  #table(l: number): Tensor {
    const t = this.#deviceTables[l] as Tensor;
    if (this.#dirty[l]) {
      t.write(this.#tables[l]);
      this.#dirty[l] = false;
    }
    return t;
  }

  /** Gives every row of layer l pages for exactly `tokens` history tokens, taking or returning the difference. */
  #resize(l: number, tokens: number): void {
    const table = this.#tables[l];
    const tablePages = table.length / this.rows;
    const have = pagesFor(this.#len[l], this.pageTokens);
    const want = pagesFor(tokens, this.pageTokens);
    if (want === have) return;
    if (want > have && (want - have) * this.rows > this.#free.length)
      fail('ERR_BUDGET', `KV arena: layer ${l} needs ${(want - have) * this.rows} more pages of ${this.pageTokens} tokens but ${this.#free.length} of ${this.poolPages} are free`);
    for (let r = 0; r < this.rows; r++) {
      const row = r * tablePages;
      for (let i = have; i < want; i++) table[row + i] = this.#free.pop() as number;
      for (let i = have - 1; i >= want; i--) {
        this.#free.push(table[row + i]);
        table[row + i] = -1;
      }
    }
    this.#dirty[l] = true;
    this.#peakPages = Math.max(this.#peakPages, this.poolPages - this.#free.length);
  }

  get #kvDtype(): DType {
    return this.kvFormat === 'plain' ? this.dtype : 'u8';
  }

  #pools(): KVPair {
    return { k: this.#poolK as Tensor, v: this.#poolV as Tensor, scales: this.#scales };
  }

  #scratchPair(): KVPair {
    if (!this.#scratch) {
      const shape = [this.rows, this.heads, this.#tokens, this.headDim];
      const made: Tensor[] = [];
      const make = (dims: number[], dtype: DType) => {
        made.push(this.engine.empty(dims, dtype, { category: 'scratch' }));
        return made[made.length - 1];
      };
      try {
        const pair: KVPair = { k: make(shape, this.#kvDtype), v: make(shape, this.#kvDtype) };
        if (this.kvFormat !== 'plain') pair.scales = make(shape.slice(0, 3), 'u8');
        this.#scratch = pair;
      } catch (e) {
        for (const t of made) t.dispose();
        throw e;
      }
    }
    return this.#scratch;
  }
}
