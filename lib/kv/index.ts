/** KV policies (ScaleKV reference/paper, baselines), their spec grammar and the built-in budget plans. */
export { FullKvPolicy, KvCache, appendUnlessLast } from '../model/kv-cache.js';
export type { AfterAttentionContext, KvCacheOptions, KvPolicy } from '../model/kv-cache.js';
export {
  SelectionPolicy, ScaleKvPolicy, SlidingWindowPolicy, StreamingLlmPolicy, SnapKvPolicy, PyramidKvPolicy,
  scoreAndSelect, gridWindow, pyramidBudgets, avgPoolSafeBudget, cacheSizesFromPlan,
} from './policies.js';
export type { Decision, KvTraceRecord, Pooling, ScaleKvOptions, ScoringSetup, SelectionPolicyOptions, SnapKvOptions } from './policies.js';
export { kvPolicyFromSpec, builtinPlan, BUILTIN_DRAFTERS } from './spec.js';

import type { KvPolicy } from '../model/kv-cache.js';
import { FullKvPolicy } from '../model/kv-cache.js';
import { SelectionPolicy } from './policies.js';

/** The history capacity (tokens) a policy allocates for a layer: the single source for memory planning. */
export function historyCapacity(policy: KvPolicy, layer: number, scaleTokens: readonly number[]): number {
  if (policy instanceof SelectionPolicy) return policy.historyCapacity(layer, scaleTokens);
  if (policy instanceof FullKvPolicy) return policy.capacity(layer, scaleTokens);
  return policy.capacity(layer, scaleTokens);
}
