/** The KV cache, the policy hook, the baselines, policy specs and the memory planner. */
export { KvCache } from './cache.js';
export type { KvCacheOptions, KvTarget } from './cache.js';
export { appendUnlessLast } from './policy.js';
export type { AfterAttentionContext, KvGeneration, KvPlacement, KvPolicy, KvPolicySession, KvStep } from './policy.js';
export { SelectionPolicy, SelectionSession, scoreAndSelect, gridWindow, gridScoring, avgPoolSafeBudget } from './selection.js';
export type { Decision, KvTraceRecord, Pooling, ScoringSetup, SelectionPolicyOptions } from './selection.js';
export { FullKvPolicy, SlidingWindowPolicy, StreamingLlmPolicy, SnapKvPolicy, PyramidKvPolicy, pyramidBudgets } from './baselines.js';
export type { SnapKvOptions } from './baselines.js';
export { kvPolicyFromSpec, builtinPlan, BUILTIN_DRAFTERS } from './spec.js';
