/**
 * KV policies on the KvCache contract (lib/model/kv-cache.ts): ScaleKV in two modes and the baselines.
 *
 * Every policy here is a `SelectionPolicy`: after each (layer, scale) attention it looks at the key length
 * keyLen = history + current tokens and decides, from lengths alone, one of
 *   - append everything (keyLen fits),
 *   - keep explicit positions (sliding window, StreamingLLM),
 *   - keep `budget` entries chosen by window scoring (ScaleKV, SnapKV, PyramidKV),
 * then runs ops.evictCompact(history, current, keep) via cache.compact. Because the decision depends only on
 * lengths, `capacity(layer, scaleTokens)` replays it to find the most history the layer ever holds (the
 * capacity the cache allocates, and the number the memory planner uses). The last scale's K/V are never stored.
 */
import type { Tensor } from '../engine.js';
import { fail } from '../errors.js';
import type { AfterAttentionContext, KvCache, KvPolicy } from '../model/kv-cache.js';
import { BudgetPlan } from '../scalekv/budget.js';
import { observationWindow, SCALE_TOKENS_1M_SQUARE } from '../scalekv/window.js';

export type Pooling = 'maxpool' | 'avgpool';

/** One (layer, scale) step, reported to `trace` (conformance and diagnostics). */
export interface KvTraceRecord {
  layer: number;
  scaleIndex: number;
  /** History + current tokens seen by the step (the official `key_len`). */
  lenBefore: number;
  /** Entries kept (the history length afterwards; at the last scale what would have been kept). */
  lenAfter: number;
  /** True when entries were selected/evicted. */
  compressed: boolean;
  /** Kept positions [rows, heads, lenAfter] (only with traceKept and a scored selection). */
  kept?: Int32Array;
  /** Window key positions (scored selections). */
  window?: Int32Array;
}

export interface SelectionPolicyOptions {
  /** Called after every (layer, scale) step. */
  trace?: (r: KvTraceRecord) => void;
  /** Read the kept positions back for `trace` (a host round trip per compression). */
  traceKept?: boolean;
  /** Also run (and trace) the selection at the last scale, whose K/V are never stored (the official code does). */
  traceLastScale?: boolean;
}

export type Decision =
  | { kind: 'all' }
  | { kind: 'positions'; positions: Int32Array }
  | { kind: 'select'; budget: number };

/** Scoring setup of a 'select' decision. */
export interface ScoringSetup {
  /** 'raw': the first C columns of qkv (official ScaleKV); 'q': the attention query (normalised, scaled, rotated). */
  query: 'raw' | 'q';
  /** Logit scale: 1/√headDim for 'raw' (official), 1 for 'q' (Infinity's cosine attention). */
  scale: number;
  mode: 'logits' | 'probs';
  pooling: Pooling;
  kernel: number;
  /** Window key positions in [0, keyLen). */
  window: Int32Array;
  /** Query rows of the current scale for every window key. */
  queryRows: Int32Array;
  /** Keep repeated positions (the official avgpool gather copies a position once per occurrence). */
  repeats?: boolean;
}

/** Base class: replays length decisions for capacities, performs them after attention. */
export abstract class SelectionPolicy implements KvPolicy {
  abstract readonly name: string;
  protected readonly opts: SelectionPolicyOptions;
  #state: unknown[] = [];

  constructor(opts: SelectionPolicyOptions = {}) {
    this.opts = opts;
  }

  /** Fresh per-layer state for a generation. */
  protected newState(_layer: number): unknown {
    return undefined;
  }

  /** What stays of keyLen entries after layer `layer` attended at scale `si` (S scales, tokens of each). */
  protected abstract decide(layer: number, si: number, keyLen: number, scaleTokens: readonly number[], state: unknown): Decision;

  /** Window and scoring of a 'select' decision. */
  protected abstract scoring(ctx: AfterAttentionContext, keyLen: number): ScoringSetup;

  /** History length after a decision. */
  static keptCount(d: Decision, keyLen: number): number {
    return d.kind === 'all' ? keyLen : d.kind === 'positions' ? d.positions.length : Math.min(d.budget, keyLen);
  }

  /** The most history (tokens) the layer holds for this schedule: the allocation the cache needs. */
  capacity(layer: number, scaleTokens: readonly number[]): number {
    const state = this.newState(layer);
    let hist = 0;
    let most = 0;
    for (let si = 0; si < scaleTokens.length - 1; si++) {
      const keyLen = hist + scaleTokens[si];
      hist = SelectionPolicy.keptCount(this.decide(layer, si, keyLen, scaleTokens, state), keyLen);
      most = Math.max(most, hist);
    }
    return most;
  }

  begin(cache: KvCache): void {
    this.#state = Array.from({ length: cache.layers }, (_, l) => this.newState(l));
  }

  end(): void {
    this.#state = [];
  }

  async afterAttention(ctx: AfterAttentionContext): Promise<void> {
    const { cache, layer, scaleIndex: si } = ctx;
    const hist = cache.len(layer);
    const keyLen = hist + ctx.tokens;
    const trace = this.opts.trace;
    // The last scale's K/V are never read again: nothing to decide (the official code still compresses there,
    // only to reset its state; begin() resets ours), unless the selection is traced for conformance.
    if (ctx.lastScale && !(trace && this.opts.traceLastScale)) return;
    const scaleTokens = ctx.schedule.map(([h, w]) => h * w);
    const d = this.decide(layer, si, keyLen, scaleTokens, this.#state[layer]);
    const count = SelectionPolicy.keptCount(d, keyLen);
    const record = (extra: Partial<KvTraceRecord> = {}) =>
      trace?.({ layer, scaleIndex: si, lenBefore: keyLen, lenAfter: count, compressed: d.kind !== 'all', ...extra });
    if (d.kind === 'all') {
      if (!ctx.lastScale) cache.appendCurrent(layer);
      record();
      return;
    }
    const ph = cache.rows * cache.heads;
    if (d.kind === 'positions') {
      const keep = new Int32Array(ph * count);
      for (let p = 0; p < ph; p++) keep.set(d.positions, p * count);
      if (!ctx.lastScale) cache.compact(layer, keep, count);
      record(this.opts.traceKept ? { kept: keep } : {});
      return;
    }
    const sc = this.scoring(ctx, keyLen);
    const keep = scoreAndSelect(ctx, sc, count);
    try {
      if (!ctx.lastScale) cache.compact(layer, keep, count, sc.repeats);
      if (trace) record({ window: sc.window, ...(this.opts.traceKept ? { kept: (await keep.read()) as Int32Array } : {}) });
    } finally {
      keep.dispose();
    }
  }
}

/**
 * Window scoring with the engine's ops: the attention kernel's window output (logits, and lse for softmax
 * probabilities) of the window query rows against [history ‖ current], then ops.selection (window keys masked,
 * pooling, top-(budget − window) ties to the lowest index, union with the window, sorted). Returns the kept
 * positions [rows, heads, budget] on the device.
 */
export function scoreAndSelect(ctx: AfterAttentionContext, sc: ScoringSetup, budget: number): Tensor {
  const { engine: e, cache, layer } = ctx;
  const { rows, heads, headDim } = cache;
  const hist = cache.len(layer);
  const n = ctx.tokens;
  const keyLen = hist + n;
  const nw = sc.window.length;
  if (budget < nw) fail('ERR_BUDGET', `layer ${layer}: budget ${budget} is smaller than the observation window (${nw})`);
  const temps: Tensor[] = [];
  const t = (x: Tensor) => (temps.push(x), x);
  try {
    let q = ctx.q;
    if (sc.query === 'raw') {
      // The official scoring query: x @ W_q (no bias, no normalisation, no RoPE), laid out [rows, heads, n, hd].
      const shape = [rows, heads, n, headDim];
      q = t(e.empty(shape, ctx.q.dtype, { category: 'scratch' }));
      e.ops.qkNormRope({ qkv: ctx.qkv, normalize: false, q });
    }
    const logits = t(e.empty([rows, heads, nw, keyLen], 'f32', { category: 'scratch' }));
    const lse = sc.mode === 'probs' ? t(e.empty([rows, heads, nw], 'f32', { category: 'scratch' })) : undefined;
    e.ops.attention({
      q, history: cache.history(layer), current: cache.current(), scale: sc.scale,
      window: { rows: sc.queryRows, logits, lse },
    });
    const out = e.empty([rows, heads, budget], 'i32', { category: 'scratch' });
    try {
      e.ops.selection({
        logits, lse, windowKeys: sc.window, budget, mode: sc.mode,
        pooling: sc.pooling === 'maxpool' ? 'max' : 'avg', kernel: sc.kernel, out,
      });
    } catch (err) {
      out.dispose();
      throw err;
    }
    return out;
  } finally {
    for (const x of temps) x.dispose();
  }
}

/**
 * With average pooling, −inf window scores spread to kernel−1 neighbours each; when the budget exceeds the finite
 * candidates, top-k returns −inf-tied entries, window positions among them, so the union with the window repeats
 * them (golden README item 9). ScaleKV's reference mode keeps those copies, as the official cache does. The paper
 * mode and SnapKV / PyramidKV cap an avg-pooled budget at keyLen − window·(kernel−1) instead: every kept entry is
 * then a distinct finite-score token, and no key is counted twice by the attention that follows.
 */
export function avgPoolSafeBudget(budget: number, keyLen: number, windowSize: number, kernel: number, pooling: Pooling): number {
  if (pooling !== 'avgpool' || kernel <= 1) return budget;
  return Math.max(Math.min(windowSize, keyLen), Math.min(budget, keyLen - windowSize * (kernel - 1)));
}

/**
 * The paper's observation window for any map: the centres of a g_r × g_c grid (g_r = ⌊√w⌋, g_c = ⌈w / g_r⌉) over
 * the current h × w map, i.e. row ⌊(i + ½)·h / g_r⌋, column ⌊(j + ½)·w / g_c⌋; maps smaller than the grid use their
 * last min(w, h·w) tokens. Returns positions relative to the current scale, ascending, distinct.
 */
export function gridWindow(h: number, w: number, windowSize: number): Int32Array {
  const n = h * w;
  const gr = Math.max(1, Math.floor(Math.sqrt(windowSize)));
  const gc = Math.max(1, Math.ceil(windowSize / gr));
  if (h < gr || w < gc) {
    const m = Math.min(windowSize, n);
    return Int32Array.from({ length: m }, (_, i) => n - m + i);
  }
  const set = new Set<number>();
  for (let i = 0; i < gr; i++)
    for (let j = 0; j < gc; j++) {
      if (set.size >= windowSize) break;
      set.add(Math.floor(((i + 0.5) * h) / gr) * w + Math.floor(((j + 0.5) * w) / gc));
    }
  return Int32Array.from(set).sort();
}

function positiveInt(v: number, what: string): number {
  if (!Number.isSafeInteger(v) || v < 1) fail('ERR_INVALID_ARG', `${what} must be a positive integer, got ${v}`);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// ScaleKV

export interface ScaleKvOptions extends SelectionPolicyOptions {
  /** 'reference' = the released update_kv exactly (spec §3.2); 'paper' = proper q, softmax, avg pooling. */
  mode?: 'reference' | 'paper';
  /** The budget plan (official JSON terms) ... */
  plan?: BudgetPlan;
  /** ... or the official `cache_sizes` list, indexed by 0-based scale + 2 (null rows = no budget). */
  cacheSizes?: (readonly number[] | null)[];
  /** Official `max_capacity` (`base_capacity`): 650 in infer_2b.py. Paper mode: the budget of scales the plan does not cover. */
  baseCapacity?: number;
  windowSize?: number;
  kernelSize?: number;
  /** Default: 'maxpool' (reference), 'avgpool' (paper). */
  pooling?: Pooling;
  /** Reference mode: the official hard-coded SCALE table (default the 1M 1:1 token counts, quirk D11). */
  scaleTable?: readonly number[];
}

/** `cache_sizes` of the official `enable_scale_kv`: index N = "Scale N" → per layer Max (drafter) or Min. */
export function cacheSizesFromPlan(plan: BudgetPlan): (number[] | null)[] {
  const top = Math.max(13, ...plan.scales.map((s) => s.scale));
  const out: (number[] | null)[] = Array.from({ length: top + 1 }, () => null);
  for (const s of plan.scales) out[s.scale] = Array.from({ length: plan.depth }, (_, l) => (s.drafters.includes(l) ? s.max : s.min));
  return out;
}

export class ScaleKvPolicy extends SelectionPolicy {
  readonly name: string;
  readonly mode: 'reference' | 'paper';
  readonly cacheSizes: (readonly number[] | null)[];
  readonly plan?: BudgetPlan;
  readonly baseCapacity: number;
  readonly windowSize: number;
  readonly kernelSize: number;
  readonly pooling: Pooling;
  readonly scaleTable: readonly number[];

  constructor(o: ScaleKvOptions) {
    super(o);
    this.mode = o.mode ?? 'reference';
    if (this.mode !== 'reference' && this.mode !== 'paper') fail('ERR_INVALID_ARG', `ScaleKV mode must be 'reference' or 'paper'`);
    if (!o.plan && !o.cacheSizes) fail('ERR_INVALID_ARG', 'ScaleKV needs a budget plan or cacheSizes');
    this.plan = o.plan;
    this.cacheSizes = o.cacheSizes ?? cacheSizesFromPlan(o.plan as BudgetPlan);
    this.baseCapacity = positiveInt(o.baseCapacity ?? 650, 'baseCapacity');
    this.windowSize = positiveInt(o.windowSize ?? 16, 'windowSize');
    this.kernelSize = positiveInt(o.kernelSize ?? 5, 'kernelSize');
    if (this.kernelSize % 2 !== 1) fail('ERR_INVALID_ARG', `kernelSize must be odd, got ${this.kernelSize}`);
    this.pooling = o.pooling ?? (this.mode === 'reference' ? 'maxpool' : 'avgpool');
    if (this.pooling !== 'maxpool' && this.pooling !== 'avgpool') fail('ERR_INVALID_ARG', `pooling must be 'maxpool' or 'avgpool'`);
    this.scaleTable = o.scaleTable ?? SCALE_TOKENS_1M_SQUARE;
    this.name = this.mode === 'reference' ? 'scalekv' : 'scalekv-paper';
  }

  protected override newState(): unknown {
    return { reached: false };
  }

  /** Official: cache_sizes[(si == 12 ? 11 : si) + 2][layer]; a missing row is the official TypeError. */
  referenceCapacity(layer: number, si: number): number {
    const idx = (si === 12 ? 11 : si) + 2;
    const row = this.cacheSizes[Math.min(idx, this.cacheSizes.length - 1)];
    if (row === null || row === undefined)
      fail('ERR_BUDGET', `ScaleKV: no budget for scale ${si} (cache_sizes[${idx}] is None: the official code raises TypeError); raise the base capacity`);
    return layer < row.length ? row[layer] : this.baseCapacity;
  }

  /** Paper mode: the plan's "Scale si+2" budget; beyond the plan its last entry; before it the base capacity. */
  paperBudget(layer: number, si: number): number {
    const idx = si + 2;
    if (idx < this.cacheSizes.length) {
      const row = this.cacheSizes[idx];
      if (row) return layer < row.length ? row[layer] : this.baseCapacity;
      const later = this.cacheSizes.slice(idx).some((r) => r);
      if (later) return this.baseCapacity;
    }
    for (let i = this.cacheSizes.length - 1; i >= 0; i--) {
      const row = this.cacheSizes[i];
      if (row) return layer < row.length ? row[layer] : this.baseCapacity;
    }
    return this.baseCapacity;
  }

  protected decide(layer: number, si: number, keyLen: number, scaleTokens: readonly number[], state: unknown): Decision {
    const st = state as { reached: boolean };
    if (this.mode === 'reference') {
      if (keyLen <= this.baseCapacity && !st.reached) return { kind: 'all' };
      st.reached = true;
      if (si === 12) st.reached = false;
      const cap = this.referenceCapacity(layer, si);
      if (keyLen <= cap) return { kind: 'all' };
      if (cap < this.windowSize) fail('ERR_BUDGET', `ScaleKV: capacity ${cap} < window ${this.windowSize} (the official code raises UnboundLocalError)`);
      return { kind: 'select', budget: cap };
    }
    const budget = this.paperBudget(layer, si);
    if (keyLen <= budget) return { kind: 'all' };
    const nw = Math.min(this.windowSize, scaleTokens[si]);
    if (budget < nw) fail('ERR_BUDGET', `ScaleKV: budget ${budget} < window ${nw}`);
    return { kind: 'select', budget: avgPoolSafeBudget(budget, keyLen, nw, this.kernelSize, this.pooling) };
  }

  protected scoring(ctx: AfterAttentionContext, keyLen: number): ScoringSetup {
    if (this.mode === 'reference') {
      // Official window: the current scale per the hard-coded SCALE table (quirk D11), grid centres or the last positions.
      const table = this.scaleTable;
      const si = Math.max(0, Math.min(table.length - 1, ctx.scaleIndex));
      const currentStart = Math.max(0, keyLen - table[si]);
      const window = observationWindow(keyLen - currentStart, currentStart, keyLen, this.windowSize).keys;
      const offset = keyLen - ctx.tokens;
      const queryRows = Int32Array.from(window, (w) => Math.max(0, Math.min(ctx.tokens - 1, w - offset)));
      return {
        query: 'raw', scale: 1 / Math.sqrt(ctx.cache.headDim), mode: 'logits', pooling: this.pooling, kernel: this.kernelSize, window, queryRows,
        repeats: this.pooling === 'avgpool',
      };
    }
    return paperScoring(ctx, keyLen, this.windowSize, this.kernelSize, this.pooling);
  }
}

function paperScoring(ctx: AfterAttentionContext, keyLen: number, windowSize: number, kernel: number, pooling: Pooling): ScoringSetup {
  const [h, w] = ctx.schedule[ctx.scaleIndex];
  const rel = gridWindow(h, w, windowSize);
  const offset = keyLen - ctx.tokens;
  return { query: 'q', scale: 1, mode: 'probs', pooling, kernel, window: Int32Array.from(rel, (r) => r + offset), queryRows: rel };
}

// ---------------------------------------------------------------------------------------------------------------
// Baselines

/** Sliding window: keep the most recent `budget` entries of every layer. */
export class SlidingWindowPolicy extends SelectionPolicy {
  readonly name = 'window';
  constructor(readonly budget: number, opts: SelectionPolicyOptions = {}) {
    super(opts);
    positiveInt(budget, 'window budget');
  }
  protected decide(_l: number, _si: number, keyLen: number): Decision {
    if (keyLen <= this.budget) return { kind: 'all' };
    return { kind: 'positions', positions: Int32Array.from({ length: this.budget }, (_, i) => keyLen - this.budget + i) };
  }
  protected scoring(): ScoringSetup {
    return fail('ERR_INTERNAL', 'window policy does not score');
  }
}

/** StreamingLLM: the first `sinks` entries (attention sinks) plus the most recent `recent`. */
export class StreamingLlmPolicy extends SelectionPolicy {
  readonly name = 'streamingllm';
  constructor(readonly sinks: number, readonly recent: number, opts: SelectionPolicyOptions = {}) {
    super(opts);
    if (!Number.isSafeInteger(sinks) || sinks < 0) fail('ERR_INVALID_ARG', `sinks must be a non-negative integer, got ${sinks}`);
    positiveInt(recent, 'recent');
  }
  protected decide(_l: number, _si: number, keyLen: number): Decision {
    const b = this.sinks + this.recent;
    if (keyLen <= b) return { kind: 'all' };
    const pos = new Int32Array(b);
    for (let i = 0; i < this.sinks; i++) pos[i] = i;
    for (let i = 0; i < this.recent; i++) pos[this.sinks + i] = keyLen - this.recent + i;
    return { kind: 'positions', positions: pos };
  }
  protected scoring(): ScoringSetup {
    return fail('ERR_INTERNAL', 'streamingllm policy does not score');
  }
}

export interface SnapKvOptions extends SelectionPolicyOptions {
  windowSize?: number;
  kernelSize?: number;
  pooling?: Pooling;
}

/**
 * SnapKV: a fixed budget per layer (`budgets[layer]`), window selection as ScaleKV's paper mode (attention q,
 * softmax probabilities, average pooling, grid-centre window) whenever the cache exceeds it.
 */
export class SnapKvPolicy extends SelectionPolicy {
  readonly name: string;
  readonly windowSize: number;
  readonly kernelSize: number;
  readonly pooling: Pooling;
  constructor(readonly budgets: readonly number[], o: SnapKvOptions & { name?: string } = {}) {
    super(o);
    this.name = o.name ?? 'snapkv';
    this.windowSize = positiveInt(o.windowSize ?? 16, 'windowSize');
    this.kernelSize = positiveInt(o.kernelSize ?? 5, 'kernelSize');
    this.pooling = o.pooling ?? 'avgpool';
    for (const b of budgets) positiveInt(b, 'layer budget');
  }
  static uniform(depth: number, budget: number, o: SnapKvOptions = {}): SnapKvPolicy {
    return new SnapKvPolicy(new Array(depth).fill(budget), o);
  }
  protected decide(layer: number, si: number, keyLen: number, scaleTokens: readonly number[]): Decision {
    const budget = this.budgets[Math.min(layer, this.budgets.length - 1)];
    if (keyLen <= budget) return { kind: 'all' };
    const nw = Math.min(this.windowSize, scaleTokens[si]);
    if (budget < nw) fail('ERR_BUDGET', `${this.name}: layer ${layer} budget ${budget} < window ${nw}`);
    return { kind: 'select', budget: avgPoolSafeBudget(budget, keyLen, nw, this.kernelSize, this.pooling) };
  }
  protected scoring(ctx: AfterAttentionContext, keyLen: number): ScoringSetup {
    return paperScoring(ctx, keyLen, this.windowSize, this.kernelSize, this.pooling);
  }
}

/**
 * PyramidKV budgets: linear in depth from (2 − ratio)·B at layer 0 down to ratio·B at the last layer (default
 * ratio 0.5: 1.5B → 0.5B), rounded, the rounding remainder spread from layer 0 so the total is exactly L × B;
 * every layer keeps at least `minimum` (the window).
 */
export function pyramidBudgets(depth: number, budget: number, ratio = 0.5, minimum = 16): number[] {
  positiveInt(depth, 'depth');
  positiveInt(budget, 'budget');
  const total = depth * budget;
  const hi = (2 - ratio) * budget;
  const lo = ratio * budget;
  const b = Array.from({ length: depth }, (_, l) => Math.max(minimum, Math.round(depth === 1 ? budget : hi + ((lo - hi) * l) / (depth - 1))));
  let diff = total - b.reduce((a, x) => a + x, 0);
  for (let i = 0; diff !== 0 && i < 10 * depth; i++) {
    const l = i % depth;
    const step = diff > 0 ? 1 : -1;
    if (step < 0 && b[l] <= minimum) continue;
    b[l] += step;
    diff -= step;
  }
  return b;
}

export class PyramidKvPolicy extends SnapKvPolicy {
  constructor(depth: number, budget: number, o: SnapKvOptions = {}) {
    super(pyramidBudgets(depth, budget, 0.5, o.windowSize ?? 16), { ...o, name: 'pyramidkv' });
  }
}
