/**
 * ScaleKV as a KV policy, in two modes: 'reference' is the released `ScaleKVCluster.update_kv` exactly (spec §3.2,
 * quirks included; `scalekv verify update_kv_units` runs this class on the official unit calls), 'paper' the method
 * as the paper describes it (attention q, softmax probabilities, average pooling, grid window).
 */
import { fail } from '../errors.js';
import type { AfterAttentionContext } from '../kv/policy.js';
import {
  avgPoolSafeBudget, Decision, gridScoring, Pooling, positiveInt, ScoringSetup, SelectionPolicy, SelectionPolicyOptions,
} from '../kv/selection.js';
import { BudgetPlan, planEntry } from './budget.js';
import { observationWindow, SCALE_TOKENS_1M_SQUARE } from './window.js';

export interface ScaleKvOptions extends SelectionPolicyOptions {
  /** 'reference' = the released update_kv exactly (spec §3.2); 'paper' = proper q, softmax, avg pooling. */
  mode?: 'reference' | 'paper';
  /** The budget plan (official JSON terms) ... */
  plan?: BudgetPlan;
  /** ... or the official `cache_sizes` list, indexed by the plan entry N ("Scale N"; null rows = no budget). */
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

/** What a ScaleKV generation remembers per layer: the official `has_reached_base`. */
export interface ScaleKvLayerState {
  reachedBase: boolean;
}

/** `cache_sizes` of the official `enable_scale_kv`: index N = "Scale N" → per layer Max (drafter) or Min. */
export function cacheSizesFromPlan(plan: BudgetPlan): (number[] | null)[] {
  const top = Math.max(13, ...plan.scales.map((s) => s.scale));
  const out: (number[] | null)[] = Array.from({ length: top + 1 }, () => null);
  for (const s of plan.scales) out[s.scale] = Array.from({ length: plan.depth }, (_, l) => (s.drafters.includes(l) ? s.max : s.min));
  return out;
}

export class ScaleKvPolicy extends SelectionPolicy<ScaleKvLayerState> {
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
    if (o.cacheSizes && (!Array.isArray(o.cacheSizes) || o.cacheSizes.length === 0)) fail('ERR_INVALID_ARG', 'cacheSizes must be a non-empty list');
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

  newLayerState(): ScaleKvLayerState {
    return { reachedBase: false };
  }

  /** Official: cache_sizes[N][layer] for the entry N of the compression after scale si (index clamped as the official code does); a missing row is the official TypeError. */
  referenceCapacity(layer: number, si: number): number {
    const idx = Math.min(planEntry(si, true).scale, this.cacheSizes.length - 1);
    const row = this.cacheSizes[idx];
    if (row === null || row === undefined)
      fail('ERR_BUDGET', `ScaleKV: no budget for scale ${si} (cache_sizes[${idx}] is None: the official code raises TypeError); raise the base capacity`);
    return layer < row.length ? row[layer] : this.baseCapacity;
  }

  /** Paper mode: the plan entry of the compression after scale si; beyond the plan its last entry; before it the base capacity. */
  paperBudget(layer: number, si: number): number {
    const idx = planEntry(si).scale;
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

  /** The official observation window of keyLen keys at scale si: the current scale taken from the hard-coded SCALE table (quirk D11). */
  referenceWindow(si: number, keyLen: number): Int32Array {
    const table = this.scaleTable;
    const current = table[Math.max(0, Math.min(table.length - 1, si))];
    const currentStart = Math.max(0, keyLen - current);
    return observationWindow(keyLen - currentStart, currentStart, keyLen, this.windowSize).keys;
  }

  decide(layer: number, si: number, keyLen: number, scaleTokens: readonly number[], state: ScaleKvLayerState): Decision {
    if (this.mode === 'reference') {
      if (keyLen <= this.baseCapacity && !state.reachedBase) return { kind: 'all' };
      state.reachedBase = !planEntry(si, true).rearmsBase;
      const cap = this.referenceCapacity(layer, si);
      if (keyLen <= cap) return { kind: 'all' };
      const window = this.referenceWindow(si, keyLen);
      if (cap < window.length)
        fail('ERR_BUDGET', `ScaleKV: layer ${layer} scale ${si}: capacity ${cap} < window ${window.length} (the official code raises UnboundLocalError)`);
      // keep_size 0: the official code keeps the window alone, without scoring.
      if (cap === window.length) return { kind: 'positions', positions: window, window };
      return { kind: 'select', budget: cap };
    }
    const budget = this.paperBudget(layer, si);
    if (keyLen <= budget) return { kind: 'all' };
    const nw = Math.min(this.windowSize, scaleTokens[si]);
    if (budget < nw) fail('ERR_BUDGET', `ScaleKV: layer ${layer} scale ${si}: budget ${budget} < window ${nw}`);
    return { kind: 'select', budget: avgPoolSafeBudget(budget, keyLen, nw, this.kernelSize, this.pooling) };
  }

  scoring(ctx: AfterAttentionContext, keyLen: number): ScoringSetup {
    if (this.mode === 'paper') return gridScoring(ctx, this.windowSize, this.kernelSize, this.pooling);
    // The official scoring: raw queries of the window positions (clamped into the current scale), logits / √hd.
    const window = this.referenceWindow(ctx.scaleIndex, keyLen);
    const queryRows = Int32Array.from(window, (w) => Math.max(0, Math.min(ctx.tokens - 1, w - ctx.historyLength)));
    return {
      query: 'raw', scale: 1 / Math.sqrt(ctx.cache.headDim), mode: 'logits', pooling: this.pooling, kernel: this.kernelSize, window, queryRows,
      repeats: this.pooling === 'avgpool',
    };
  }
}
