/**
 * Length-driven KV policies (ScaleKV in both modes and every baseline but the full cache): after each (layer, scale)
 * attention the policy looks at the key length keyLen = history + current tokens and decides, from lengths alone
 * (and a per-layer state of the generation), one of
 *   - keep everything (keyLen fits): the scale's K/V are written straight after the history, no copy,
 *   - keep explicit positions (sliding window, StreamingLLM),
 *   - keep `budget` entries chosen by window scoring (ScaleKV, SnapKV, PyramidKV),
 * then, for the last two, compacts [history ‖ current] with cache.compact. Because the decision depends only on
 * lengths, the session takes it before the attention (to place the K/V) and `capacity(layer, scaleTokens)` replays
 * it to find the most history the layer ever holds (the capacity the cache allocates, and the number the memory
 * planner uses). The last scale's K/V are never stored.
 */
import type { Tensor } from '../engine.js';
import { fail } from '../errors.js';
import type { KvCache } from './cache.js';
import type { AfterAttentionContext, KvGeneration, KvPlacement, KvPolicy, KvPolicySession, KvStep } from './policy.js';

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
  /** Kept positions [rows, heads, lenAfter] (with traceKept, for explicit positions and scored selections). */
  kept?: Int32Array;
  /** Window key positions (scored selections, and a ScaleKV budget equal to its window). */
  window?: Int32Array;
  /** [rows, heads, lenBefore] pooled scores before the window is masked again (with traceScores, scored selections). */
  pooledScores?: Float32Array;
}

export interface SelectionPolicyOptions {
  /** Called after every (layer, scale) step. */
  trace?: (r: KvTraceRecord) => void;
  /** Read the kept positions back for `trace` (a host round trip per compression). */
  traceKept?: boolean;
  /** Read the pooled scores of scored selections back for `trace`. */
  traceScores?: boolean;
  /** Also run (and trace) the selection at the last scale, whose K/V are never stored (the official code does). */
  traceLastScale?: boolean;
}

export type Decision =
  | { kind: 'all' }
  | { kind: 'positions'; positions: Int32Array; window?: Int32Array }
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

/** Base class: replays length decisions for capacities; its sessions perform them around the attention. */
export abstract class SelectionPolicy<S = undefined> implements KvPolicy {
  abstract readonly name: string;
  readonly opts: Readonly<SelectionPolicyOptions>;

  constructor(opts: SelectionPolicyOptions = {}) {
    this.opts = { ...opts };
  }

  /** The state of one layer at the start of a generation (decide() may update it). */
  abstract newLayerState(layer: number): S;

  /** What stays of keyLen entries after layer `layer` attended at scale `si` (tokens of every scale given). */
  abstract decide(layer: number, si: number, keyLen: number, scaleTokens: readonly number[], state: S): Decision;

  /** Window and scoring of a 'select' decision. */
  abstract scoring(ctx: AfterAttentionContext, keyLen: number): ScoringSetup;

  /** History length after a decision. */
  static keptCount(d: Decision, keyLen: number): number {
    return d.kind === 'all' ? keyLen : d.kind === 'positions' ? d.positions.length : Math.min(d.budget, keyLen);
  }

  /** The most history (tokens) the layer holds for this schedule: the table the cache gives it. */
  capacity(layer: number, scaleTokens: readonly number[]): number {
    return Math.max(0, ...this.historyLengths(layer, scaleTokens));
  }

  /** The layer's history length after each scale but the last, replaying the length-only decisions. */
  historyLengths(layer: number, scaleTokens: readonly number[]): number[] {
    const state = this.newLayerState(layer);
    const lengths: number[] = [];
    let hist = 0;
    for (let si = 0; si < scaleTokens.length - 1; si++) {
      const keyLen = hist + scaleTokens[si];
      hist = SelectionPolicy.keptCount(this.decide(layer, si, keyLen, scaleTokens, state), keyLen);
      lengths.push(hist);
    }
    return lengths;
  }

  begin(cache: KvCache, generation: KvGeneration): SelectionSession<S> {
    return new SelectionSession(this, cache, generation);
  }
}

/** One generation of a SelectionPolicy: the per-layer states and the decisions taken before each attention. */
export class SelectionSession<S> implements KvPolicySession {
  readonly policy: SelectionPolicy<S>;
  /** Per-layer state (e.g. ScaleKV's has_reached_base), fresh for every generation. */
  readonly layerStates: S[];
  readonly #cache: KvCache;
  readonly #scaleTokens: number[];
  readonly #pending: ({ decision: Decision; keyLen: number } | undefined)[];

  constructor(policy: SelectionPolicy<S>, cache: KvCache, generation: KvGeneration) {
    this.policy = policy;
    this.#cache = cache;
    this.#scaleTokens = generation.schedule.map(([h, w]) => h * w);
    this.layerStates = Array.from({ length: cache.layers }, (_, l) => policy.newLayerState(l));
    this.#pending = new Array(cache.layers).fill(undefined);
  }

  placement(step: KvStep): KvPlacement {
    const { trace, traceLastScale } = this.policy.opts;
    // The last scale's K/V are never read again: nothing to decide (the official code still compresses there, only
    // to reset its state, which a session does not carry over), unless the selection is traced for conformance.
    if (step.lastScale && !(trace && traceLastScale)) {
      this.#pending[step.layer] = undefined;
      return 'decide';
    }
    const keyLen = this.#cache.len(step.layer) + step.tokens;
    const decision = this.policy.decide(step.layer, step.scaleIndex, keyLen, this.#scaleTokens, this.layerStates[step.layer]);
    this.#pending[step.layer] = { decision, keyLen };
    return decision.kind === 'all' && !step.lastScale ? 'append' : 'decide';
  }

  async afterAttention(ctx: AfterAttentionContext): Promise<void> {
    const { cache, layer, scaleIndex: si } = ctx;
    const pending = this.#pending[layer];
    this.#pending[layer] = undefined;
    if (!pending) return;
    const { decision: d, keyLen } = pending;
    const { trace, traceKept, traceScores } = this.policy.opts;
    const count = SelectionPolicy.keptCount(d, keyLen);
    const record = (extra: Partial<KvTraceRecord> = {}) =>
      trace?.({ layer, scaleIndex: si, lenBefore: keyLen, lenAfter: count, compressed: d.kind !== 'all', ...extra });
    if (d.kind === 'all') {
      record();
      return;
    }
    if (d.kind === 'positions') {
      const ph = cache.rows * cache.heads;
      const keep = new Int32Array(ph * count);
      for (let p = 0; p < ph; p++) keep.set(d.positions, p * count);
      if (!ctx.lastScale) cache.compact(layer, keep, count);
      record({ ...(traceKept ? { kept: keep } : {}), ...(d.window ? { window: d.window } : {}) });
      return;
    }
    const sc = this.policy.scoring(ctx, keyLen);
    const sel = scoreAndSelect(ctx, sc, count, { pooledScores: Boolean(trace && traceScores) });
    try {
      if (!ctx.lastScale) cache.compact(layer, sel.keep, count, sc.repeats);
      if (trace) {
        const [kept, pooled] = await Promise.all([traceKept ? sel.keep.read() : undefined, sel.pooledScores?.read()]);
        record({ window: sc.window, ...(kept ? { kept: kept as Int32Array } : {}), ...(pooled ? { pooledScores: pooled as Float32Array } : {}) });
      }
    } finally {
      sel.keep.dispose();
      sel.pooledScores?.dispose();
    }
  }

  end(): void {
    this.#pending.fill(undefined);
  }
}

/**
 * Window scoring with the engine's ops: the attention kernel's window output (logits, and lse for softmax
 * probabilities) of the window query rows against [history ‖ current], then ops.selection (window keys masked,
 * pooling, top-(budget − window) ties to the lowest index, union with the window, sorted). Returns the kept
 * positions [rows, heads, budget] on the device, and with `pooledScores` the pooled scores [rows, heads, keyLen].
 */
export function scoreAndSelect(ctx: AfterAttentionContext, sc: ScoringSetup, budget: number, o: { pooledScores?: boolean } = {}): { keep: Tensor; pooledScores?: Tensor } {
  const { engine: e, cache, layer } = ctx;
  const { rows, heads, headDim } = cache;
  const n = ctx.tokens;
  const keyLen = ctx.historyLength + n;
  const nw = sc.window.length;
  if (budget < nw) fail('ERR_BUDGET', `layer ${layer}: budget ${budget} is smaller than the observation window (${nw})`);
  const temps: Tensor[] = [];
  const t = (x: Tensor) => (temps.push(x), x);
  try {
    let q = ctx.q;
    if (sc.query === 'raw') {
      // The official scoring query: x @ W_q (no bias, no normalisation, no RoPE), laid out [rows, heads, n, hd].
      q = t(e.empty([rows, heads, n, headDim], ctx.q.dtype, { category: 'scratch' }));
      e.ops.qkNormRope({ qkv: ctx.qkv, normalize: false, q });
    }
    const logits = t(e.empty([rows, heads, nw, keyLen], 'f32', { category: 'scratch' }));
    const lse = sc.mode === 'probs' ? t(e.empty([rows, heads, nw], 'f32', { category: 'scratch' })) : undefined;
    e.ops.attention({ q, ...cache.attentionOperands(layer), scale: sc.scale, window: { rows: sc.queryRows, logits, lse } });
    const keep = t(e.empty([rows, heads, budget], 'i32', { category: 'scratch' }));
    const pooledScores = o.pooledScores ? t(e.empty([rows, heads, keyLen], 'f32', { category: 'scratch' })) : undefined;
    e.ops.selection({
      logits, lse, windowKeys: sc.window, budget, mode: sc.mode,
      pooling: sc.pooling === 'maxpool' ? 'max' : 'avg', kernel: sc.kernel, out: keep, pooledScores,
    });
    temps.splice(temps.indexOf(keep), 1);
    if (pooledScores) temps.splice(temps.indexOf(pooledScores), 1);
    return { keep, pooledScores };
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

/**
 * The paper's scoring (ScaleKV paper mode, SnapKV, PyramidKV): the attention query itself (normalised, scaled,
 * rotated; logit scale 1 as Infinity's cosine attention), softmax probabilities, the grid window of the current map.
 */
export function gridScoring(ctx: AfterAttentionContext, windowSize: number, kernel: number, pooling: Pooling): ScoringSetup {
  const [h, w] = ctx.schedule[ctx.scaleIndex];
  const rel = gridWindow(h, w, windowSize);
  return { query: 'q', scale: 1, mode: 'probs', pooling, kernel, window: Int32Array.from(rel, (r) => r + ctx.historyLength), queryRows: rel };
}

export function positiveInt(v: number, what: string): number {
  if (!Number.isSafeInteger(v) || v < 1) fail('ERR_INVALID_ARG', `${what} must be a positive integer, got ${v}`);
  return v;
}
