/** The KV cache, the policy hook, the baselines, policy specs and the memory planner. */
export { KvCache, kvBoundaryPages, kvPageTokensFor, kvPoolPages } from './cache.js';
export type { KvCacheOptions, KvHistory, KvTarget } from './cache.js';
export { decodeKvCode, dequantiseKvRows, fp8E4m3ToNumber, KV_SCALE_NON_FINITE, kvCodeMax, kvRowScale, kvScaleByte, numberToFp8E4m3, quantiseKvToken } from './quant.js';
export type { QuantisedKvFormat } from './quant.js';
export { appendUnlessLast, cumulativeLengths, policyHistoryLengths } from './policy.js';
export type { AfterAttentionContext, KvGeneration, KvPlacement, KvPolicy, KvPolicySession, KvStep } from './policy.js';
export { SelectionPolicy, SelectionSession, scoreAndSelect, gridWindow, gridScoring, avgPoolSafeBudget } from './selection.js';
export type { Decision, KvTraceRecord, Pooling, ScoringSetup, SelectionPolicyOptions } from './selection.js';
export { FullKvPolicy, SlidingWindowPolicy, StreamingLlmPolicy, SnapKvPolicy, PyramidKvPolicy, pyramidBudgets } from './baselines.js';
export type { SnapKvOptions } from './baselines.js';
export { kvPolicyFromSpec, builtinPlan, BUILTIN_DRAFTERS } from './spec.js';
