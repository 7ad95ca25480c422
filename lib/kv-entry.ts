/**
 * `scalekv/kv`: the KV-cache tier — the cache and the policy hook, ScaleKV (reference and paper modes) and the
 * baselines, policy specs, budget plans in the official JSON format, ASI calibration, the memory planner and the
 * fidelity metrics (PSNR, SSIM) a policy is judged by.
 *
 * ```ts
 * import { kvPolicyFromSpec, planMemory } from 'scalekv/kv';
 * const policy = kvPolicyFromSpec('scalekv:10%', { depth: 32, preset: 'infinity-2b' });
 * const plan = await planMemory({ preset: 'infinity-2b', batch: 8, policy });   // a dry run: no weights, no GPU
 * ```
 */
export * from './kv/index.js';
export * from './scalekv/index.js';
export { largestBatch, paperKvBytes, parseBytes, planMemory } from './kv/planner.js';
export type { MemoryPlan, PlanDtype, PlanMemoryOptions } from './kv/planner.js';
export { paperTokensForSpec } from './kv/resolve.js';
export { fidelity, pixelDiff, psnr, psnrImage, ssim, ssimImage } from './eval/metrics.js';
export type { Fidelity, ImagePair, PixelDiff } from './eval/metrics.js';
