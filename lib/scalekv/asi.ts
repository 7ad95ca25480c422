/**
 * Attention Selectivity Index calibration (spec sec. 1): which (layer, scale) pairs are drafters.
 *
 * The full-cache loop runs over the calibration prompts; a KvPolicy hook (`afterAttention`, after every layer's
 * attention) asks the attention kernel itself for the window output of the
 * current scale's query rows: scaled logits against every key [history ‖ current] and each row's log-sum-exp, so
 * α_ij = exp(logit_ij − lse_i) are exactly the probabilities the layer used (same q: normalised, scaled, rotated).
 *
 * Per (layer, scale k), averaged uniformly over the conditional rows (the first B of 2B with CFG), the heads and
 * the sampled queries, then over calibration prompts:
 *   current(l,k)  = E_i Σ_{j ∈ current map} α_ij
 *   historyTopK   = E_i Σ of the K′ largest α_ij over history j (K′ capped by the history length); with
 *                   `normalizeHistory`, divided per query by that query's history mass Σ_{j ∈ history} α_ij
 *   ASI           = current × historyTopK   (0 at scale 0, which has no history)
 * Query sampling: all rows when the scale has ≤ maxQueries tokens, else the deterministic, evenly spread subset
 * i_m = floor((m + 0.5) · n / maxQueries), m = 0..maxQueries−1 (default maxQueries 256).
 * Z(l,k) = (ASI − µ_k) / (σ_k + 1e-6) over the layers of each ranked scale (σ the population std); the N_d pairs
 * of lowest Z over all ranked scales are drafters (ties: lower scale, then lower layer first).
 * Scale mapping: ASI at 0-based scale si decides the budget of the cache that scale si reads, the plan entry of the
 * compression after scale si − 1 (budget.ts planEntry). Ranked scales default to those that read a compressed cache.
 */
import type { Engine, Tensor } from '../engine.js';
import { fail } from '../errors.js';
import { generate } from '../model/generate.js';
import type { InfinityModel, TextFeatures } from '../model/infinity.js';
import type { KvCache } from '../kv/cache.js';
import { appendUnlessLast, cumulativeLengths, AfterAttentionContext, KvGeneration, KvPolicy, KvPolicySession } from '../kv/policy.js';
import type { ScaleGrid } from '../model/rope2d.js';
import { BudgetPlan, budgetTokens, officialRulePlan, planEntry } from './budget.js';
import { SCALE_TOKENS_1M_SQUARE } from './window.js';

export interface AsiOptions {
  /** K′: history entries summed per query. Default 64. */
  topK?: number;
  /** Divide the top-K′ history mass by the query's total history mass. Default true. */
  normalizeHistory?: boolean;
  /** Queries sampled per scale at most. Default 256. */
  maxQueries?: number;
}

/** Deterministic query rows of a scale of n tokens. */
export function queryRows(n: number, maxQueries = 256): Int32Array {
  if (n <= maxQueries) return Int32Array.from({ length: n }, (_, i) => i);
  return Int32Array.from({ length: maxQueries }, (_, m) => Math.floor(((m + 0.5) * n) / maxQueries));
}

/** Sum of the k largest values of a[0..len) (partial selection, a is scratch and gets reordered). */
function topKSum(a: Float64Array, len: number, k: number): number {
  if (k >= len) {
    let s = 0;
    for (let i = 0; i < len; i++) s += a[i];
    return s;
  }
  // Small k: keep a min-heap of size k.
  const heap = new Float64Array(k);
  let size = 0;
  const down = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < size && heap[l] < heap[m]) m = l;
      if (r < size && heap[r] < heap[m]) m = r;
      if (m === i) return;
      [heap[i], heap[m]] = [heap[m], heap[i]];
      i = m;
    }
  };
  for (let i = 0; i < len; i++) {
    const v = a[i];
    if (size < k) {
      heap[size] = v;
      let j = size++;
      while (j > 0) {
        const p = (j - 1) >> 1;
        if (heap[p] <= heap[j]) break;
        [heap[p], heap[j]] = [heap[j], heap[p]];
        j = p;
      }
    } else if (v > heap[0]) {
      heap[0] = v;
      down(0);
    }
  }
  let s = 0;
  for (let i = 0; i < size; i++) s += heap[i];
  return s;
}

export interface AsiStats {
  depth: number;
  scales: number;
  /** [layer][scale] means (NaN where not measured). */
  current: number[][];
  historyTopK: number[][];
  asi: number[][];
}

/**
 * The profiling policy: keeps the full cache (FullKvPolicy's capacity and appends) and accumulates the ratios of
 * every (layer, scale) from the attention kernel's window output, over every generation it serves (its sessions
 * only add to the sums; each knows its own conditional rows).
 */
export class AsiProfiler implements KvPolicy {
  readonly name = 'asi-profiler';
  readonly topK: number;
  readonly normalizeHistory: boolean;
  readonly maxQueries: number;
  readonly #sum = new Map<string, { cur: number; top: number; n: number }>();
  depth = 0;
  scales = 0;

  constructor(o: AsiOptions = {}) {
    this.topK = o.topK ?? 64;
    this.normalizeHistory = o.normalizeHistory ?? true;
    this.maxQueries = o.maxQueries ?? 256;
    if (!Number.isSafeInteger(this.topK) || this.topK < 1) fail('ERR_INVALID_ARG', `K' must be a positive integer, got ${this.topK}`);
    if (!Number.isSafeInteger(this.maxQueries) || this.maxQueries < 1) fail('ERR_INVALID_ARG', `maxQueries must be a positive integer`);
  }

  capacity(_layer: number, scaleTokens: readonly number[]): number {
    return scaleTokens.slice(0, -1).reduce((a, b) => a + b, 0);
  }

  historyLengths(_layer: number, scaleTokens: readonly number[]): number[] {
    return cumulativeLengths(scaleTokens);
  }

  begin(cache: KvCache, generation: KvGeneration): KvPolicySession {
    this.depth = Math.max(this.depth, cache.layers);
    this.scales = Math.max(this.scales, generation.schedule.length);
    // The conditional rows: the first B of 2B with CFG (all B rows without).
    const condRows = generation.batch;
    return { placement: appendUnlessLast, afterAttention: (ctx) => this.#measure(ctx, condRows) };
  }

  async #measure(ctx: AfterAttentionContext, condRows: number): Promise<void> {
    const e: Engine = ctx.engine;
    const histLen = ctx.historyLength;
    const n = ctx.tokens;
    const rowsIdx = queryRows(n, this.maxQueries);
    const m = rowsIdx.length;
    const [rows, heads] = ctx.q.shape;
    const keys = histLen + n;
    const tensors: Tensor[] = [];
    try {
      const logits = e.empty([rows, heads, m, keys], 'f32', { category: 'scratch' });
      tensors.push(logits);
      const lse = e.empty([rows, heads, m], 'f32', { category: 'scratch' });
      tensors.push(lse);
      e.ops.attention({ q: ctx.q, ...ctx.cache.attentionOperands(ctx.layer), scale: 1, window: { rows: rowsIdx, logits, lse } });
      const L = (await logits.read()) as Float32Array;
      const S = (await lse.read()) as Float32Array;
      const cond = Math.min(condRows, rows);
      const p = new Float64Array(Math.max(1, histLen));
      let curSum = 0;
      let topSum = 0;
      let count = 0;
      for (let r = 0; r < cond; r++)
        for (let h = 0; h < heads; h++)
          for (let i = 0; i < m; i++) {
            const row = (r * heads + h) * m + i;
            const base = row * keys;
            const z = S[row];
            let cur = 0;
            for (let j = histLen; j < keys; j++) cur += Math.exp(L[base + j] - z);
            let hm = 0;
            for (let j = 0; j < histLen; j++) hm += p[j] = Math.exp(L[base + j] - z);
            let top = histLen ? topKSum(p, histLen, this.topK) : 0;
            if (this.normalizeHistory) top = hm > 0 ? top / hm : 0;
            curSum += cur;
            topSum += top;
            count++;
          }
      const key = `${ctx.layer}/${ctx.scaleIndex}`;
      const acc = this.#sum.get(key) ?? { cur: 0, top: 0, n: 0 };
      // One entry per generation: the prompt-level means are averaged uniformly over prompts.
      acc.cur += curSum / count;
      acc.top += topSum / count;
      acc.n++;
      this.#sum.set(key, acc);
    } finally {
      for (const t of tensors) t.dispose();
    }
  }

  stats(): AsiStats {
    const L = this.depth;
    const K = this.scales;
    const grid = () => Array.from({ length: L }, () => new Array<number>(K).fill(NaN));
    const current = grid();
    const historyTopK = grid();
    const asi = grid();
    for (const [key, a] of this.#sum) {
      const [l, k] = key.split('/').map(Number);
      current[l][k] = a.cur / a.n;
      historyTopK[l][k] = a.top / a.n;
      asi[l][k] = current[l][k] * historyTopK[l][k];
    }
    return { depth: L, scales: K, current, historyTopK, asi };
  }
}

/** Z-scores per scale over layers (NaN columns stay NaN). */
export function zScores(asi: number[][], eps = 1e-6): number[][] {
  const L = asi.length;
  const K = asi[0]?.length ?? 0;
  const z = asi.map((r) => r.map(() => NaN));
  for (let k = 0; k < K; k++) {
    const col = asi.map((r) => r[k]);
    if (col.some((v) => !Number.isFinite(v))) continue;
    const mu = col.reduce((a, b) => a + b, 0) / L;
    const sd = Math.sqrt(col.reduce((a, b) => a + (b - mu) ** 2, 0) / L);
    for (let l = 0; l < L; l++) z[l][k] = (col[l] - mu) / (sd + eps);
  }
  return z;
}

/** The N_d (layer, scale) pairs of lowest Z among `scales` (0-based). */
export function pickDrafters(z: number[][], scales: readonly number[], nd: number): { layer: number; scale: number; z: number }[] {
  const pairs: { layer: number; scale: number; z: number }[] = [];
  for (const k of scales) for (let l = 0; l < z.length; l++) if (Number.isFinite(z[l][k])) pairs.push({ layer: l, scale: k, z: z[l][k] });
  pairs.sort((a, b) => a.z - b.z || a.scale - b.scale || a.layer - b.layer);
  return pairs.slice(0, Math.max(0, nd));
}

export interface CalibrateOptions extends AsiOptions {
  /** Calibration prompts: precomputed text features, one generation each (B = 1). */
  prompts: readonly TextFeatures[];
  schedule: readonly ScaleGrid[];
  /** Budget as a fraction (0.1 = 10 %). Default 0.1. */
  budget?: number;
  /** N_d. Default max(1, round(L · ranked scales / 16)). */
  drafters?: number;
  /** 0-based scales to rank; default the ones the plan compresses (0-based si = N − 1 for every entry N). */
  scales?: readonly number[];
  cfg?: number;
  seed?: number;
  /** Smallest refiner budget of the plan. Default min(200, floor(tokensPerLayer / 2)): 200 as shipped at 10 %. */
  refinerFloor?: number;
  onProgress?(prompt: number, total: number): void;
}

export interface CalibrationResult {
  stats: AsiStats;
  z: number[][];
  tokensPerLayer: number;
  rankedScales: number[];
  drafters: { layer: number; scale: number; z: number }[];
  plan: BudgetPlan;
  options: { topK: number; normalizeHistory: boolean; maxQueries: number; budget: number; drafters: number; cfg: number; seed: number; prompts: number };
}

/** Tokens per layer of a budget fraction: the paper's 265 / 650 / 1300 on the 1M square schedule, else fraction × history. */
export function tokensForBudget(fraction: number, scaleTokens: readonly number[]): number {
  const hist = scaleTokens.slice(0, -1).reduce((a, b) => a + b, 0);
  if (!(fraction > 0 && fraction <= 1)) fail('ERR_BUDGET', `budget fraction must be in (0, 1], got ${fraction}`);
  const is1M = scaleTokens.length === SCALE_TOKENS_1M_SQUARE.length && scaleTokens.every((t, i) => t === SCALE_TOKENS_1M_SQUARE[i]);
  return is1M ? budgetTokens(fraction) : Math.max(1, Math.round(fraction * hist));
}

export async function calibrate(model: InfinityModel, o: CalibrateOptions): Promise<CalibrationResult> {
  if (!o.prompts.length) fail('ERR_INVALID_ARG', 'calibrate: no calibration prompts');
  const grids = o.schedule.map((s) => (s.length === 3 ? [s[1], s[2]] : [s[0], s[1]]) as [number, number]);
  const tokens = grids.map(([h, w]) => h * w);
  const fraction = o.budget ?? 0.1;
  const tokensPerLayer = tokensForBudget(fraction, tokens);
  const L = model.config.depth;
  const profiler = new AsiProfiler(o);
  profiler.depth = L;
  const cfg = o.cfg ?? 3;
  const seed = o.seed ?? 0;
  for (let i = 0; i < o.prompts.length; i++) {
    const r = await generate(model, { text: o.prompts[i], schedule: o.schedule, cfg, seed: seed + i, kvPolicy: profiler });
    r.summedCodes.dispose();
    o.onProgress?.(i, o.prompts.length);
  }
  const stats = profiler.stats();
  const z = zScores(stats.asi);
  // Which scales the plan compresses: a plan without drafters tells.
  const bare = officialRulePlan({ depth: L, tokensPerLayer, drafters: [], scaleTokens: tokens });
  const readsCompressed = (si: number) => si > 0 && bare.scales.some((s) => s.scale === planEntry(si - 1).scale);
  const rankedScales = [...(o.scales ?? tokens.map((_, si) => si).filter(readsCompressed))].filter((k) => k >= 0 && k < tokens.length);
  const nd = o.drafters ?? Math.max(1, Math.round((L * rankedScales.length) / 16));
  const drafters = pickDrafters(z, rankedScales, nd);
  const perScale: Record<number, number[]> = {};
  for (const d of drafters) (perScale[planEntry(d.scale - 1).scale] ??= []).push(d.layer);
  const refinerFloor = o.refinerFloor ?? Math.min(200, Math.floor(tokensPerLayer / 2));
  const plan = officialRulePlan({ depth: L, tokensPerLayer, drafters: perScale, scaleTokens: tokens, refinerFloor });
  return {
    stats,
    z,
    tokensPerLayer,
    rankedScales,
    drafters,
    plan,
    options: { topK: profiler.topK, normalizeHistory: profiler.normalizeHistory, maxQueries: profiler.maxQueries, budget: fraction, drafters: nd, cfg, seed, prompts: o.prompts.length },
  };
}
