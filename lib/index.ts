/**
 * `scalekv`: the Pipeline (load a model once, turn prompts or T5 features into images), the model-level API it is
 * built from (InfinityModel, VaeDecoder, generate, checkpoints, schedules, presets, PNG), the whole engine tier and
 * the KV policies. The tiers are entry points of their own — `scalekv/engine`, `scalekv/kv`, `scalekv/verify` — and
 * the KV and verify tiers are here as namespaces too: `import { kv } from 'scalekv'; kv.calibrate(...)`.
 */
export { Pipeline, parseAspect, readTextFeatures, concatTextFeatures, splitTextFeatures, repeatTextFeatures, presetConfig } from './pipeline.js';
export type { Conditioning, PipelineGenerateOptions, PipelineImage, PipelineLoadOptions, PipelineProgress, PipelineResult } from './pipeline.js';

// The engine tier (scalekv/engine): backends, tensors, ops, memory and profiling, dtypes, errors.
export * from './engine-entry.js';

// The model.
export { final1MGrid, rope2dPositions } from './model/rope2d.js';
export type { ScaleGrid } from './model/rope2d.js';
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
export type { TinyModel } from './model/tiny.js';
export { tinyTokenizerJson, tinyT5Config } from './model/tiny.js';
export { configFromManifest } from './model/config.js';
export { InfinityModel, TextContext } from './model/infinity.js';
export type { InfinityLoadOptions, TextFeatures, TextObservation, WeightSource as InfinityWeightSource } from './model/infinity.js';
export { expandTextRows } from './model/infinity.js';
export { generate, decodeImage, decodeUnderPeak, kvFormatFor, vaeBatchWithin } from './model/generate.js';
export type { DecodedImage, DecodeOptions, GenerateObserver, GenerateOptions, GenerateResult, KvDtype, ScaleTiming } from './model/generate.js';
export { captureObserver, composeObservers } from './model/capture.js';
export type { CaptureOptions } from './model/capture.js';

// Text: the flan-t5 tokenizer (prompts -> T5 ids, as Infinity calls it), T5 model directories and the T5 encoder.
export { T5Tokenizer, T5_MAX_LENGTH } from './text/tokenizer.js';
export type { TokenizedPrompts } from './text/tokenizer.js';
export { parseT5Config, T5Checkpoint, t5EncoderShapes } from './text/t5-checkpoint.js';
export type { T5Config } from './text/t5-checkpoint.js';
export { loadTextEncoder, relativePositionBias, t5RelativeBucket, T5TextEncoder } from './text/t5-encoder.js';
export type { EncodedText, T5EncoderLoadOptions, T5WeightSource } from './text/t5-encoder.js';

// Checkpoints and images.
export { SafetensorsFile } from './safetensors.js';
export { openCheckpoint, infinityBlockKey, normalizeVaeKey } from './checkpoint/index.js';
export type { Checkpoint, CheckpointDType, CheckpointFormat, OpenOptions, TensorData, TensorInfo } from './checkpoint/index.js';
export { loadTensor } from './checkpoint/load.js';
export type { LoadDType, LoadOptions } from './checkpoint/load.js';
export { crc32, decodePng, encodePng, pngChunks } from './image/png.js';
export type { EncodeOptions as PngEncodeOptions, PngChunk, RawImage } from './image/png.js';

// The KV policies a generation takes (the rest of the KV tier: `kv` below, or scalekv/kv).
export {
  KvCache, FullKvPolicy, SelectionPolicy, SelectionSession, SlidingWindowPolicy, StreamingLlmPolicy, SnapKvPolicy, PyramidKvPolicy,
  kvPolicyFromSpec, builtinPlan,
} from './kv/index.js';
export type {
  AfterAttentionContext, KvCacheOptions, KvGeneration, KvPlacement, KvPolicy, KvPolicySession, KvStep, KvTraceRecord, SelectionPolicyOptions,
  SnapKvOptions,
} from './kv/index.js';
export { ScaleKvPolicy, observationWindow, planEntry, SCALE_TOKENS_1M_SQUARE } from './scalekv/index.js';
export type { ScaleKvLayerState, ScaleKvOptions } from './scalekv/index.js';

// Conformance (the rest: `verify` below, or scalekv/verify).
export { verifyFixture, VERIFY_KINDS } from './verify/index.js';
export type { Check, VerifyReport } from './verify/index.js';

// The server: `scalekv serve` / `scalekv worker` as an API.
export { createServer, startWorker, ApiError } from './serve/index.js';
export type { ScaleKVServer, ServerOptions, RunningWorker, WorkerOptions } from './serve/index.js';

// The tiers as namespaces.
export * as kv from './kv-entry.js';
export * as verify from './verify-entry.js';
