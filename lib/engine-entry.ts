/**
 * `scalekv/engine`: the engine tier, for benchmarkers and other TypeScript frameworks — backends, tensors, the
 * kernel ops, memory counters, static memory plans and op profiling, dtype helpers and the coded errors. No model
 * code.
 *
 * ```ts
 * import { createEngine } from 'scalekv/engine';
 * const engine = await createEngine({ backend: 'auto' });
 * const x = engine.tensor(new Float32Array([1, -2, 3, -4]), [1, 4], 'f32');
 * const y = engine.empty([1, 4], 'f32');
 * engine.ops.silu(x, y);
 * console.log(await y.read());
 * engine.dispose();
 * ```
 */
export { createEngine, backendInfo, Engine, Tensor, MEMORY_CATEGORIES } from './engine.js';
export type { BackendChoice, BackendInfo, BackendName, EngineOptions, HostArray, KernelLaunch, MemoryCategory, MemoryStats, OpProfileEntry, ProfilingOptions, TensorOptions } from './engine.js';
export { bsqCodeValue } from './ops.js';
export type {
  ActivationArgs, AttentionArgs, BitsToCodesArgs, CfgTauArgs, Conv2dArgs, CrossAttentionArgs, Epilogue, EvictCompactArgs, GatedResidualArgs,
  GemmArgs, GemmResidualArgs, GroupNormArgs, ImageToU8Args, IndexInput, KVPair, KvFormat, LayerNormArgs, Ops, PoolingMode, QkNormRopeArgs, ResizeBilinearArgs, RowVectors,
  SampleBitsArgs, ScoreMode, SelectionArgs, TopkTopPMaskArgs,
} from './ops.js';
export { DTYPES, dtypeSize, f32ToBf16Bits, bf16BitsToF32, f16BitsToF32, roundToBf16, bf16ToF32Array, f16ToF32Array } from './dtype.js';
export type { DType } from './dtype.js';
export { livePeak, packAllocations, planAllocations, plannedTextLength } from './memory-plan.js';
export type { AllocationTrace, MemoryPlanReport, StaticMemoryPlan } from './memory-plan.js';
export { ScaleKVError } from './errors.js';
export type { ErrorCode } from './errors.js';
