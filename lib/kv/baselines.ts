/** The reference full cache and the baseline KV policies the paper compares ScaleKV with. */
import { fail } from '../errors.js';
import type { KvCache } from './cache.js';
import { appendUnlessLast, cumulativeLengths, type AfterAttentionContext, type KvPolicy, type KvPolicySession } from './policy.js';
import { avgPoolSafeBudget, Decision, gridScoring, Pooling, positiveInt, ScoringSetup, SelectionPolicy, SelectionPolicyOptions } from './selection.js';

/** The reference behaviour: keep every token; history capacity = all tokens but the last scale's. */
export class FullKvPolicy implements KvPolicy {
  readonly name = 'full';
  capacity(_layer: number, scaleTokens: readonly number[]): number {
    return scaleTokens.slice(0, -1).reduce((a, b) => a + b, 0);
  }
  historyLengths(_layer: number, scaleTokens: readonly number[]): number[] {
    return cumulativeLengths(scaleTokens);
  }
  begin(_cache: KvCache): KvPolicySession {
    return { placement: appendUnlessLast };
  }
}

/** Sliding window: keep the most recent `budget` entries of every layer. */
export class SlidingWindowPolicy extends SelectionPolicy {
  readonly name = 'window';
  constructor(readonly budget: number, opts: SelectionPolicyOptions = {}) {
    super(opts);
    positiveInt(budget, 'window budget');
  }
  newLayerState(): undefined {
    return undefined;
  }
  decide(_l: number, _si: number, keyLen: number): Decision {
    if (keyLen <= this.budget) return { kind: 'all' };
    return { kind: 'positions', positions: Int32Array.from({ length: this.budget }, (_, i) => keyLen - this.budget + i) };
  }
  scoring(): ScoringSetup {
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
  newLayerState(): undefined {
    return undefined;
  }
  decide(_l: number, _si: number, keyLen: number): Decision {
    const b = this.sinks + this.recent;
    if (keyLen <= b) return { kind: 'all' };
    const pos = new Int32Array(b);
    for (let i = 0; i < this.sinks; i++) pos[i] = i;
    for (let i = 0; i < this.recent; i++) pos[this.sinks + i] = keyLen - this.recent + i;
    return { kind: 'positions', positions: pos };
  }
  scoring(): ScoringSetup {
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
  newLayerState(): undefined {
    return undefined;
  }
  decide(layer: number, si: number, keyLen: number, scaleTokens: readonly number[]): Decision {
    const budget = this.budgets[Math.min(layer, this.budgets.length - 1)];
    if (keyLen <= budget) return { kind: 'all' };
    const nw = Math.min(this.windowSize, scaleTokens[si]);
    if (budget < nw) fail('ERR_BUDGET', `${this.name}: layer ${layer} budget ${budget} < window ${nw}`);
    return { kind: 'select', budget: avgPoolSafeBudget(budget, keyLen, nw, this.kernelSize, this.pooling) };
  }
  scoring(ctx: AfterAttentionContext): ScoringSetup {
    return gridScoring(ctx, this.windowSize, this.kernelSize, this.pooling);
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
