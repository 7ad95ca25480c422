import { fail } from '../errors.js';
import { SCALE_TOKENS_1M_SQUARE } from './window.js';

/**
 * A ScaleKV budget plan in the official JSON's terms. `Scale N` (1-based N) names the scale that *reads* the
 * compressed cache: the cache is compressed right after 0-based scale N − 2 (the last scale reuses the entry
 * of the one before it).
 */
export interface ScaleBudget {
  /** 1-based official scale number N. */
  scale: number;
  /** Layers that are drafters at this scale ("Block b": 1). */
  drafters: number[];
  /** Drafter budget (tokens per head, per layer, per sequence). */
  max: number;
  /** Refiner budget. */
  min: number;
  /** Upper bound on Max: a drafter's cache length before this compression (informational, as shipped). */
  limit: number;
}

export interface BudgetPlan {
  depth: number;
  scales: ScaleBudget[];
}

/** The last 0-based scale of the 13-scale 1M schedule, the only one the released update_kv was written for. */
const OFFICIAL_LAST_SCALE = SCALE_TOKENS_1M_SQUARE.length - 1;

/**
 * The "Scale N" convention of the budget plans, in one place: the compression right after 0-based scale si uses
 * entry N = si + 2 (the cache that scale si + 1 reads). `official`: the released update_kv also compresses after the
 * last 1M scale (si 12, whose cache nothing reads) with entry 13 again, and there re-arms its base-capacity check.
 */
export function planEntry(si: number, official = false): { scale: number; rearmsBase: boolean } {
  if (official && si === OFFICIAL_LAST_SCALE) return { scale: OFFICIAL_LAST_SCALE + 1, rearmsBase: true };
  return { scale: si + 2, rearmsBase: false };
}

/** Per-layer budget of (layer, 0-based scale index) or undefined when that scale is not compressed. */
export function layerBudget(plan: BudgetPlan, layer: number, scaleIndex: number): number | undefined {
  const entry = planEntry(scaleIndex).scale;
  const s = plan.scales.find((x) => x.scale === entry);
  if (!s) return undefined;
  return s.drafters.includes(layer) ? s.max : s.min;
}

const PLAN_FIELDS = ['High', 'Max', 'Min', 'Limit'];

/**
 * Parses the official JSON (`{"Scale N": {"Block b": 0|1, ..., "High", "Max", "Min", "Limit"}}`). Everything a
 * plan file could forge fails with ERR_FORMAT: text that is not JSON, a scale named twice ("Scale 1" and
 * "Scale 01"), blocks missing, out of range or flagged other than 0/1, unknown fields, counts that are not safe
 * non-negative integers.
 */
export function parseBudgetPlan(json: string | Record<string, unknown>): BudgetPlan {
  let raw: unknown = json;
  if (typeof json === 'string') {
    try {
      raw = JSON.parse(json);
    } catch (e) {
      fail('ERR_FORMAT', `budget plan: not JSON (${(e as Error).message})`);
    }
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) fail('ERR_FORMAT', 'budget plan: not a JSON object');
  const scales: ScaleBudget[] = [];
  let depth = -1;
  for (const [key, value] of Object.entries(raw)) {
    const m = /^Scale ([1-9]\d{0,8})$/.exec(key);
    if (!m || typeof value !== 'object' || value === null || Array.isArray(value)) fail('ERR_FORMAT', `budget plan: unexpected entry ${JSON.stringify(key)}`);
    const scale = Number(m[1]);
    if (scales.some((s) => s.scale === scale)) fail('ERR_FORMAT', `budget plan: Scale ${scale} is given twice`);
    const entry = value as Record<string, unknown>;
    const layers = Object.keys(entry).filter((k) => k.startsWith('Block ')).length;
    if (layers === 0) fail('ERR_FORMAT', `budget plan: ${key} lists no blocks`);
    if (depth >= 0 && layers !== depth) fail('ERR_FORMAT', `budget plan: ${key} lists ${layers} blocks, earlier scales ${depth}`);
    depth = layers;
    for (const k of Object.keys(entry)) {
      if (PLAN_FIELDS.includes(k)) continue;
      const b = /^Block (0|[1-9]\d*)$/.exec(k);
      if (!b) fail('ERR_FORMAT', `budget plan: ${key} has an unknown field ${JSON.stringify(k)}`);
      if (Number(b[1]) >= layers) fail('ERR_FORMAT', `budget plan: ${key} has ${k} but only ${layers} blocks (Block 0 to Block ${layers - 1})`);
      if (entry[k] !== 0 && entry[k] !== 1) fail('ERR_FORMAT', `budget plan: ${key}.${k} must be 0 (refiner) or 1 (drafter)`);
    }
    const num = (f: string) => {
      const v = entry[f];
      if (!Number.isSafeInteger(v) || (v as number) < 0) fail('ERR_FORMAT', `budget plan: ${key}.${f} must be a non-negative integer`);
      return v as number;
    };
    const drafters = Array.from({ length: layers }, (_, b) => b).filter((b) => entry[`Block ${b}`] === 1);
    const high = num('High');
    if (high !== drafters.length) fail('ERR_FORMAT', `budget plan: ${key}.High = ${high} but ${drafters.length} blocks are drafters`);
    scales.push({ scale, drafters, max: num('Max'), min: num('Min'), limit: num('Limit') });
  }
  if (!scales.length) fail('ERR_FORMAT', 'budget plan: no "Scale N" entries');
  scales.sort((a, b) => a.scale - b.scale);
  return { depth, scales };
}

/** The official JSON text: same key order and formatting as the shipped files. */
export function budgetPlanToJson(plan: BudgetPlan): string {
  const out: Record<string, Record<string, number>> = {};
  for (const s of plan.scales) {
    const entry: Record<string, number> = {};
    for (let b = 0; b < plan.depth; b++) entry[`Block ${b}`] = s.drafters.includes(b) ? 1 : 0;
    entry.High = s.drafters.length;
    entry.Max = s.max;
    entry.Min = s.min;
    entry.Limit = s.limit;
    out[`Scale ${s.scale}`] = entry;
  }
  return JSON.stringify(out, null, 2);
}

/**
 * Average tokens per layer for a budget fraction. The paper's 4 / 10 / 20 % are 265 / 650 / 1300 tokens (the
 * published memory figures reproduce only with these); other fractions take that share of the largest
 * history (6425 tokens, read by the last 1M scale).
 */
export function budgetTokens(fraction: number, largestHistory = 6425): number {
  if (!(fraction > 0 && fraction <= 1)) fail('ERR_BUDGET', `budget fraction must be in (0, 1], got ${fraction}`);
  const published: Record<string, number> = { '0.04': 265, '0.1': 650, '0.2': 1300 };
  return published[String(fraction)] ?? Math.max(1, Math.round(fraction * largestHistory));
}

export interface PlanOptions {
  depth: number;
  /** Average tokens per layer (see budgetTokens). */
  tokensPerLayer: number;
  /** Drafter layers per official scale number N (a layer list, or one list for every compressed scale). */
  drafters: Record<number, number[]> | number[];
  /** Tokens per 0-based scale (default: the 1M 1:1 schedule). */
  scaleTokens?: readonly number[];
  /** Smallest refiner budget. */
  refinerFloor?: number;
}

function compressedScales(tokensPerLayer: number, scaleTokens: readonly number[]): { first: number; cumulative: number[] } {
  const cumulative: number[] = [];
  scaleTokens.reduce((acc, n, i) => (cumulative[i] = acc + n), 0);
  // Compression starts at the first scale whose cumulative cache exceeds the base capacity.
  const first = cumulative.findIndex((c) => c > tokensPerLayer);
  if (first < 0 || first > scaleTokens.length - 2) fail('ERR_BUDGET', `a budget of ${tokensPerLayer} tokens never compresses this schedule`);
  return { first, cumulative };
}

function draftersFor(o: PlanOptions, scale: number): number[] {
  const list = Array.isArray(o.drafters) ? o.drafters : o.drafters[scale] ?? [];
  for (const b of list) if (!Number.isInteger(b) || b < 0 || b >= o.depth) fail('ERR_INVALID_ARG', `drafter layer ${b} is outside [0, ${o.depth})`);
  return [...new Set(list)].sort((a, b) => a - b);
}

interface ScaleStep {
  /** Compressed scales counted from 0. */
  k: number;
  /** Drafters at this scale and their count. */
  high: number;
  /** A drafter's cache length before this compression: the upper bound on Max. */
  limit: number;
  /** L × B: what every compressed scale holds in all. */
  total: number;
  depth: number;
}

/**
 * Walks the compressed scales of a schedule (from the first whose cumulative cache exceeds the budget to the
 * second-to-last: the last reuses its entry), asking `budgets` for each scale's Max and Min. A drafter's Limit is
 * its previous Max plus the new scale's tokens (at the first compressed scale: the whole cache so far).
 */
function walkCompressedScales(o: PlanOptions, budgets: (s: ScaleStep) => { max: number; min: number }): BudgetPlan {
  const table = o.scaleTokens ?? SCALE_TOKENS_1M_SQUARE;
  const { first, cumulative } = compressedScales(o.tokensPerLayer, table);
  const scales: ScaleBudget[] = [];
  let prevMax = 0;
  for (let si = first; si <= table.length - 2; si++) {
    const scale = planEntry(si).scale;
    const drafters = draftersFor(o, scale);
    const limit = si === first ? cumulative[si] : prevMax + table[si];
    const { max, min } = budgets({ k: si - first, high: drafters.length, limit, total: o.depth * o.tokensPerLayer, depth: o.depth });
    scales.push({ scale, drafters, max, min, limit });
    prevMax = max;
  }
  return { depth: o.depth, scales };
}

/**
 * The rule behind the shipped 10 % files (spec §2.3), which reproduces both field for field: every compressed
 * scale holds L × B tokens in all; drafters keep the most they can (Max ≤ Limit = their cache length before
 * this compression) such that the refiners' equal share Min is an integer; Min has a floor, and when the floor
 * binds, Max takes what is left.
 */
export function officialRulePlan(o: PlanOptions): BudgetPlan {
  const floor = o.refinerFloor ?? 200;
  return walkCompressedScales(o, ({ high, limit, total, depth: L }) => {
    if (high === 0) {
      const share = Math.floor(total / L);
      return { max: share, min: share };
    }
    if (high === L) {
      const max = Math.min(limit, Math.floor(total / L));
      return { max, min: max };
    }
    let max = limit;
    while (max > 0 && (total - high * max) % (L - high) !== 0) max--;
    const min = (total - high * max) / (L - high);
    if (min >= floor) return { max, min };
    return { max: Math.floor((total - (L - high) * floor) / high), min: floor };
  });
}

/**
 * The paper's rule (Eq. 4): refiners decay linearly, B_r(k) = B_r(0) − δ·k, with k counting compressed scales
 * from 0; drafters get what is left of the per-scale total L × B, capped by their cache length.
 */
export function linearDecayPlan(o: PlanOptions & { refinerStart: number; delta: number }): BudgetPlan {
  const floor = o.refinerFloor ?? 1;
  return walkCompressedScales(o, ({ k, high, limit, total, depth: L }) => {
    const min = Math.max(floor, Math.round(o.refinerStart - o.delta * k));
    const max = high === 0 ? min : Math.max(min, Math.min(limit, Math.floor((total - (L - high) * min) / high)));
    return { max, min };
  });
}
