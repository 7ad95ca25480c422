export { createEngine, backendInfo, Engine, Tensor, MEMORY_CATEGORIES } from './engine.js';
export type { BackendChoice, BackendName, EngineOptions, HostArray, MemoryCategory, MemoryStats, OpProfileEntry, TensorOptions } from './engine.js';
export type { AttentionArgs, EvictCompactArgs, IndexInput, KVPair, Ops, PoolingMode, ScoreMode, SelectionArgs } from './ops.js';
export type {
  ActivationArgs, CfgTauArgs, CrossAttentionArgs, Epilogue, GatedResidualArgs, GemmArgs, LayerNormArgs, QkNormRopeArgs,
  RowVectors, SampleBitsArgs, TopkTopPMaskArgs,
} from './ops.js';
export { final1MGrid, rope2dPositions } from './model/rope2d.js';
export type { ScaleGrid } from './model/rope2d.js';
export { bsqCodeValue } from './ops.js';
export type { BitsToCodesArgs, Conv2dArgs, GroupNormArgs, ImageToU8Args, ResizeBilinearArgs } from './ops.js';
export { VaeDecoder, normalizeVaeDecoderKey, vaeDecoderConfigFromManifest } from './model/vae.js';
export type { VaeDecoderConfig, VaeWeightSource } from './model/vae.js';
export { listAspectRatios, officialTriples, scaleSchedule, PN_SCALE_COUNTS, VAE_STRIDE } from './model/schedule.js';
export type { PixelBudget, ScaleSchedule, ScheduleOptions } from './model/schedule.js';
export {
  blockPrefix, checkWeightShapes, expectedVaeShapes, expectedWeightShapes, infinityConfig, infinityConfigFromManifest, isBufferKey,
  parameterCount, preset, PRESET_NAMES, VAE_2B, VAE_8B,
} from './model/presets.js';
export type { ConfigInput, InfinityConfig, ParameterCount, PresetName, ShapeProblems } from './model/presets.js';
export { createTinyModel, tinyConfig, GeneratedCheckpoint, TINY_VAE } from './model/tiny.js';
export type { TextFeatures, TinyModel } from './model/tiny.js';
export { configFromManifest } from './model/config.js';
export { InfinityModel, TextContext } from './model/infinity.js';
export type { InfinityLoadOptions, TextObservation, WeightSource as InfinityWeightSource } from './model/infinity.js';
export { generate, decodeImage } from './model/generate.js';
export type { DecodedImage, GenerateObserver, GenerateOptions, GenerateResult, ScaleTiming } from './model/generate.js';
export { captureObserver } from './model/capture.js';
export type { CaptureOptions } from './model/capture.js';
export {
  KvCache, FullKvPolicy, SelectionPolicy, SelectionSession, SlidingWindowPolicy, StreamingLlmPolicy, SnapKvPolicy, PyramidKvPolicy,
  kvPolicyFromSpec, builtinPlan,
} from './kv/index.js';
export type {
  AfterAttentionContext, KvCacheOptions, KvGeneration, KvPlacement, KvPolicy, KvPolicySession, KvStep, KvTraceRecord, SelectionPolicyOptions,
  SnapKvOptions,
} from './kv/index.js';
export { crc32, decodePng, encodePng, pngChunks } from './image/png.js';
export type { EncodeOptions as PngEncodeOptions, PngChunk, RawImage } from './image/png.js';
export { DTYPES, dtypeSize, f32ToBf16Bits, bf16BitsToF32, roundToBf16 } from './dtype.js';
export type { DType } from './dtype.js';
export { ScaleKVError } from './errors.js';
export type { ErrorCode } from './errors.js';
export { SafetensorsFile } from './safetensors.js';
export { openCheckpoint, infinityBlockKey, normalizeVaeKey } from './checkpoint/index.js';
export type { Checkpoint, CheckpointDType, CheckpointFormat, OpenOptions, TensorData, TensorInfo } from './checkpoint/index.js';
export { loadTensor } from './checkpoint/load.js';
export type { LoadDType, LoadOptions } from './checkpoint/load.js';
export { ScaleKvPolicy, observationWindow, planEntry, SCALE_TOKENS_1M_SQUARE } from './scalekv/index.js';
export type { ScaleKvLayerState, ScaleKvOptions } from './scalekv/index.js';
export { verifyFixture, VERIFY_KINDS } from './verify/index.js';
export type { Check, VerifyReport } from './verify/index.js';
export { Pipeline, parseAspect, readTextFeatures, concatTextFeatures, splitTextFeatures, repeatTextFeatures, presetConfig } from './pipeline.js';
export type { PipelineGenerateOptions, PipelineImage, PipelineLoadOptions, PipelineProgress, PipelineResult } from './pipeline.js';
