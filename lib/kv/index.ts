/** KV policies (ScaleKV reference/paper, baselines), their spec grammar and the built-in budget plans. */
export { FullKvPolicy, KvCache, appendUnlessLast } from '../model/kv-cache.js';
export type { AfterAttentionContext, KvCacheOptions, KvPolicy } from '../model/kv-cache.js';
export {
  SelectionPolicy, ScaleKvPolicy, SlidingWindowPolicy, StreamingLlmPolicy, SnapKvPolicy, PyramidKvPolicy,
  scoreAndSelect, gridWindow, pyramidBudgets, avgPoolSafeBudget, cacheSizesFromPlan,
} from './policies.js';
export type { Decision, KvTraceRecord, Pooling, ScaleKvOptions, ScoringSetup, SelectionPolicyOptions, SnapKvOptions } from './policies.js';
export { kvPolicyFromSpec, builtinPlan, BUILTIN_DRAFTERS } from './spec.js';
