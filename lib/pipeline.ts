/**
 * `Pipeline`: load a model once (engine, Infinity weights or the built-in tiny model, VAE decoder), then turn text
 * features into images as often as needed: sampling loop -> VAE decode -> pixels (and PNG files' bytes). What the
 * `demo`, `generate` and `eval` commands run.
 *
 * ```ts
 * const pipe = await Pipeline.load({ backend: 'auto' });             // the built-in tiny model, no download
 * const { images } = await pipe.generate({ prompts: ['a red fox'], seed: 1, kv: 'scalekv:10%', png: true });
 * writeFileSync('fox.png', images[0].png!);
 * await pipe.dispose();
 * ```
 *
 * Prompts as text run through the T5 text encoder on the same engine: with real weights, a Hugging Face flan-t5-xl
 * directory (`t5`); the built-in tiny model has its own tiny random T5 and tokenizer. Precomputed T5 features (in
 * memory, or the safetensors file `scalekv generate --text` reads) are taken as well.
 */
import { Checkpoint, openCheckpoint } from './checkpoint/index.js';
import { toHostArray } from './checkpoint/load.js';
import { BackendChoice, createEngine, Engine, MemoryStats } from './engine.js';
import { fail, ScaleKVError } from './errors.js';
import { encodePng, RawImage } from './image/png.js';
import { kvPolicyFromSpec } from './kv/spec.js';
import { kvPageTokensFor } from './kv/cache.js';
import { decodeImage, decodeUnderPeak, generate, type GenerateOptions, type KvDtype } from './model/generate.js';
import { planAllocations, plannedTextLength, type StaticMemoryPlan } from './memory-plan.js';
import { InfinityModel, sameText, TextFeatures, WeightSource } from './model/infinity.js';
import type { KvPolicy } from './kv/policy.js';
import { InfinityConfig, preset, PRESET_NAMES, PresetName } from './model/presets.js';
import { PixelBudget, scaleSchedule } from './model/schedule.js';
import { createTinyModel, TINY_VAE, tinyConfig, TinyModel } from './model/tiny.js';
import { VaeDecoder } from './model/vae.js';
import { SafetensorsFile } from './safetensors.js';
import { T5Checkpoint } from './text/t5-checkpoint.js';
import { EncodedText, T5TextEncoder, T5WeightSource } from './text/t5-encoder.js';
import { T5Tokenizer } from './text/tokenizer.js';

export interface PipelineLoadOptions {
  /** Run on this engine (the pipeline does not dispose it). Default: a new engine of `backend`, owned by the pipeline. */
  engine?: Engine;
  /** Backend of the pipeline's own engine. Default 'auto' (or env SCALEKV_BACKEND). */
  backend?: BackendChoice;
  /** CPU backend: intra-op threads. Default: all cores. */
  threads?: number;
  /**
   * Infinity weights: a checkpoint path (.pth, .safetensors, a sharded directory) or an open checkpoint (left open).
   * Default: the built-in tiny random-weight model.
   */
  weights?: string | WeightSource;
  /**
   * The VAE: a checkpoint path (a .pth holding it under 'vae.' is found by itself) or an open checkpoint with the
   * decoder.* tensors (left open). Required with `weights` unless `decode` is false.
   */
  vae?: string | Checkpoint;
  /** A preset name, 'tiny' (the tiny model's configuration) or a configuration. Default 'infinity-2b' with `weights`. */
  preset?: PresetName | 'tiny' | InfinityConfig;
  /** Block Linear weights and KV cache: default 'bf16' on CUDA, 'f32' elsewhere (InfinityModel.load). */
  dtype?: 'bf16' | 'f32';
  /** Load the VAE decoder. Without it `generate` cannot run (the model serves e.g. calibration). Default true. */
  decode?: boolean;
  /** Seed of the built-in tiny model's weights (its T5 included). Default 0. */
  tinySeed?: number;
  /**
   * A Hugging Face T5 directory (google/flan-t5-xl for Infinity: config.json, the weights, tokenizer.json), so that
   * `generate` takes prompts as text. Only its encoder half is read. The built-in tiny model has its own tiny T5.
   */
  t5?: string;
  /**
   * Keep the text encoder's weights on the engine between generations (a server will). Default false: each
   * generation loads it, encodes its prompts and frees it before sampling, so it never shares memory with the KV cache.
   */
  keepTextEncoder?: boolean;
  /** The T5 Linear weights: default `dtype` when given, else 'bf16' on CUDA and 'f32' elsewhere (never f16: T5 overflows it). */
  t5Dtype?: 'bf16' | 'f32';
  /**
   * Run each generation and its decode from a static memory plan (lib/memory-plan.ts): a dry run of the same shape
   * on a counting twin of the model places every allocation in one arena, so the engine reserves the plan's peak
   * instead of a caching allocator's 2-3x. Plans are kept per shape (schedule, batch, guidance, KV policy, prompt
   * lengths rounded up to 64 tokens). Default true.
   */
  memoryPlan?: boolean;
}

export interface PipelineProgress {
  stage: 'sampling' | 'decode';
  /** Steps done of `total`: scales while sampling, then 1 of 1 once the batch is decoded. */
  done: number;
  total: number;
}

export interface PipelineGenerateOptions {
  /**
   * Precomputed T5 features of the prompts: { kv [tokens, Ct5] f32 (prompts concatenated), lens [prompts] }, or a
   * safetensors file of that layout ('kv' f32, 'lens' int).
   */
  textFeatures?: TextFeatures | string;
  /** Prompts as text, through the T5 encoder (the tiny model's, or the `t5` directory the pipeline was loaded with). */
  prompts?: readonly string[];
  /**
   * Negative prompts (spec sec. 4.2): with CFG the unconditional rows attend to their T5 features instead of the
   * learned cfg_uncond. One string for every prompt, or one per prompt. Needs `prompts`.
   */
  negativePrompts?: string | readonly string[];
  /** Negative prompts as precomputed T5 features (one per prompt of textFeatures), or their safetensors file. */
  negativeTextFeatures?: TextFeatures | string;
  /** Images per prompt: images b·batch .. b·batch + batch − 1 share prompt b, each samples its own bits. Default 1. */
  batch?: number;
  /** Sampler seed (integer). Default 0. */
  seed?: number;
  /** Classifier-free guidance, one value or one per scale. Default 3. */
  cfg?: number | readonly number[];
  /** Temperature, one value or one per scale. Default 1. */
  tau?: number | readonly number[];
  /** Default 900. */
  topK?: number;
  /** Default 0.97. */
  topP?: number;
  /** Height / width: a number or a ratio string ('4/3', '3:4'). Default 1. */
  aspect?: number | string;
  /** Pixel budget. Default '0.06M' on the built-in tiny model, '1M' otherwise. */
  pn?: PixelBudget;
  /** KV policy: a policy object (one may serve many generations: each gets its own session), or a spec such as 'full', 'scalekv:10%', 'window:650'. Default 'full'. */
  kv?: KvPolicy | string;
  /** K/V storage: the model's dtype (default), or 'int8' / 'fp8' with a scale byte per (token, head): about half the bytes. */
  kvDtype?: KvDtype;
  /** Also encode every image as PNG (`PipelineImage.png`). Default false. */
  png?: boolean;
  /**
   * Images the VAE decodes at once. Default: with memory plans, the most whose decode stays under the sampling
   * loop's peak (decodeUnderPeak on the plan's dry run); without, the whole batch.
   */
  vaeBatch?: number;
  onProgress?(p: PipelineProgress): void;
  /** Cancels the generation: it rejects with ERR_ABORTED (cause: the signal's reason) and frees what it allocated. */
  signal?: AbortSignal;
}

export interface PipelineImage extends RawImage {
  channels: 3;
  /** The PNG file's bytes, when `png` was asked. */
  png?: Buffer;
}

export interface PipelineResult {
  /** One RGB image per generated image, prompt-major (see `batch`). */
  images: PipelineImage[];
  /** The token grids (h, w) that were sampled. */
  schedule: [number, number][];
  seed: number;
  /** textMs: the T5 encoder (loading it too unless kept); encodeMs: PNG encoding. */
  timings: { textMs: number; samplingMs: number; decodeMs: number; encodeMs: number; totalMs: number; perScaleMs: number[] };
  /** Prompts (and negative prompts) the tokenizer cut at 511 pieces (with prompts as text). */
  truncated?: boolean[];
  negativeTruncated?: boolean[];
  /** The engine's counters after the decode (peaks since the engine was created) and the KV cache bytes held. */
  memory: MemoryStats;
  kvBytes: number;
  /**
   * The static memory plan the generation and decode ran from (absent with `memoryPlan: false`): its arena, how many
   * allocations it placed, and whether the work left it (then the rest came from the caching allocator).
   */
  memoryPlan?: { arenaBytes: number; placed: number; diverged: boolean };
}

/** A ratio h / w from '1', '0.75', '4/3' or '3:4'. */
export function parseAspect(s: string | number | undefined): number {
  if (s === undefined) return 1;
  const m = typeof s === 'number' ? null : /^(\d+(?:\.\d+)?)(?:[/:](\d+(?:\.\d+)?))?$/.exec(s.trim());
  const v = typeof s === 'number' ? s : m ? (m[2] ? Number(m[1]) / Number(m[2]) : Number(m[1])) : NaN;
  if (!(v > 0) || !Number.isFinite(v)) fail('ERR_INVALID_ARG', `aspect must be a ratio h/w such as 1, 4/3 or 0.75, got '${s}'`);
  return v;
}

/** The prompts of several feature sets, in order. */
export function concatTextFeatures(parts: readonly TextFeatures[]): TextFeatures {
  const kv = new Float32Array(parts.reduce((n, p) => n + p.kv.length, 0));
  let at = 0;
  for (const p of parts) {
    kv.set(p.kv, at);
    at += p.kv.length;
  }
  return { kv, lens: parts.flatMap((p) => [...p.lens]) };
}

/** One single-prompt feature set per prompt. */
export function splitTextFeatures(t: TextFeatures): TextFeatures[] {
  const channels = t.kv.length / t.lens.reduce((a, b) => a + b, 0);
  const out: TextFeatures[] = [];
  let at = 0;
  for (const n of t.lens) {
    out.push({ kv: t.kv.slice(at * channels, (at + n) * channels), lens: [n] });
    at += n;
  }
  return out;
}

/** Each prompt `batch` times in a row. */
export function repeatTextFeatures(t: TextFeatures, batch: number): TextFeatures {
  if (!Number.isSafeInteger(batch) || batch < 1) fail('ERR_INVALID_ARG', `batch must be a positive integer, got ${batch}`);
  if (batch === 1) return t;
  return concatTextFeatures(splitTextFeatures(t).flatMap((p) => new Array<TextFeatures>(batch).fill(p)));
}

/** The first `n` prompts of a feature set and the rest. */
function splitAt(t: TextFeatures, n: number): [TextFeatures, TextFeatures] {
  const parts = splitTextFeatures(t);
  return [concatTextFeatures(parts.slice(0, n)), parts.length > n ? concatTextFeatures(parts.slice(n)) : { kv: new Float32Array(0), lens: [] }];
}

/** Precomputed T5 features from a safetensors file: 'kv' [tokens, channels] and 'lens' [prompts] summing to tokens. */
export function readTextFeatures(path: string, channels: number): TextFeatures {
  const f = new SafetensorsFile(path);
  try {
    if (!f.has('kv') || !f.has('lens')) fail('ERR_FORMAT', `${path}: text features need tensors 'kv' [tokens, ${channels}] and 'lens' [prompts]`);
    const shape = f.entry('kv').shape;
    if (shape.length !== 2 || shape[1] !== channels) fail('ERR_SHAPE', `${path}: 'kv' must be [tokens, ${channels}], got ${JSON.stringify(shape)}`);
    const lens = Array.from(f.i32('lens'));
    if (!lens.length || lens.some((n) => n < 1) || lens.reduce((a, b) => a + b, 0) !== shape[0])
      fail('ERR_SHAPE', `${path}: 'lens' must be positive and sum to the ${shape[0]} rows of 'kv'`);
    return { kv: f.f32('kv'), lens };
  } finally {
    f.close();
  }
}

/** The VAE decoder's tensors of a checkpoint as f32 host arrays (the decoder is small next to the transformer). */
async function readVaeDecoder(ckpt: Checkpoint): Promise<Map<string, Float32Array>> {
  const out = new Map<string, Float32Array>();
  for (const name of ckpt.names) {
    if (!name.startsWith('decoder.')) continue;
    out.set(name, toHostArray(await ckpt.read(name), 'f32', name) as Float32Array);
  }
  if (!out.size) fail('ERR_FORMAT', `${ckpt.path}: no VAE decoder tensors (decoder.*)`);
  return out;
}

// In the transformer's dtype: a bf16 pipeline decodes in bf16 (weights and activations; GroupNorm statistics stay
// f32), as the reference does under its bf16 autocast, so the convolutions run on tensor cores.
async function loadVae(engine: Engine, source: string | Checkpoint, config: InfinityConfig, dtype: 'f32' | 'bf16'): Promise<VaeDecoder> {
  const vaeConfig = { ...config.vae, weightDtype: dtype, dtype };
  if (typeof source !== 'string') return VaeDecoder.load(engine, await readVaeDecoder(source), vaeConfig);
  const file = openCheckpoint(source);
  let prefixed: Checkpoint | undefined;
  try {
    if (file.names.some((n) => n.startsWith('vae.'))) prefixed = openCheckpoint(source, { prefix: 'vae.' });
    return await VaeDecoder.load(engine, await readVaeDecoder(prefixed ?? file), vaeConfig);
  } finally {
    prefixed?.close();
    file.close();
  }
}

/**
 * The configuration of a preset name ('tiny': the built-in tiny model's, for checkpoints written from it) or the
 * configuration given; `presetName` when it names an official preset.
 */
export function presetConfig(p: string | InfinityConfig = 'infinity-2b'): { config: InfinityConfig; presetName?: PresetName } {
  if (typeof p !== 'string') return { config: p };
  if (p === 'tiny') return { config: { ...tinyConfig(), vae: { ...TINY_VAE, chMult: [...TINY_VAE.chMult] } } };
  if (!PRESET_NAMES.includes(p as PresetName)) fail('ERR_INVALID_ARG', `unknown preset '${p}' (${[...PRESET_NAMES, 'tiny'].join(', ')})`);
  return { config: preset(p as PresetName), presetName: p as PresetName };
}

function abortError(signal: AbortSignal): ScaleKVError {
  return new ScaleKVError('ERR_ABORTED', 'generation aborted', { cause: signal.reason });
}

type TextOptions = Pick<PipelineGenerateOptions, 'textFeatures' | 'prompts' | 'negativePrompts' | 'negativeTextFeatures' | 'signal'>;

/** What a generation conditions on: its prompts' features, its negative prompts' (with CFG), what was truncated. */
export interface Conditioning {
  text: TextFeatures;
  negative?: TextFeatures;
  /** Per prompt (and per negative prompt): cut at 511 pieces. Only with prompts as text. */
  truncated?: boolean[];
  negativeTruncated?: boolean[];
}

/** A text encoder the pipeline can load: its weights, its tokenizer, and the encoder when kept loaded. */
interface TextEncoderSource {
  weights: T5WeightSource;
  tokenizer: T5Tokenizer;
  dtype?: 'bf16' | 'f32';
  close(): void;
}

/** A generation shape's static memory plan, and the images its decode takes at once. */
interface PlannedShape {
  plan: StaticMemoryPlan;
  vaeBatch: number;
}

/** Static memory plans a pipeline keeps (one per generation shape, the least recently used dropped first). */
const MEMORY_PLANS_KEPT = 16;
let nextPolicyId = 0;

export class Pipeline {
  readonly engine: Engine;
  readonly model: InfinityModel;
  /** Undefined when loaded with `decode: false`. */
  readonly vae?: VaeDecoder;
  readonly config: Readonly<InfinityConfig>;
  /** The preset the weights follow (it picks the built-in ScaleKV drafters), when one was named. */
  readonly presetName?: PresetName;
  readonly #text?: TextEncoderSource;
  /** The loaded text encoder when `keepTextEncoder`. */
  #encoder?: T5TextEncoder;
  readonly #tiny: boolean;
  readonly #ownsEngine: boolean;
  /** Generations run one at a time, in call order; this settles when the last one queued has. */
  #queue: Promise<unknown> = Promise.resolve();
  #disposed = false;
  readonly #memoryPlans: boolean;
  /** Static memory plans by generation shape (the most recent last), and the counting twin that makes them. */
  readonly #plans = new Map<string, PlannedShape>();
  #twin?: Promise<{ engine: Engine; model: InfinityModel; vae: VaeDecoder }>;
  readonly #policyIds = new WeakMap<KvPolicy, number>();

  private constructor(p: { engine: Engine; model: InfinityModel; vae?: VaeDecoder; presetName?: PresetName; tiny: boolean; text?: TextEncoderSource; encoder?: T5TextEncoder; ownsEngine: boolean; memoryPlans: boolean }) {
    this.#memoryPlans = p.memoryPlans;
    this.engine = p.engine;
    this.model = p.model;
    this.vae = p.vae;
    this.config = p.model.config;
    this.presetName = p.presetName;
    this.#tiny = p.tiny;
    this.#text = p.text;
    this.#encoder = p.encoder;
    this.#ownsEngine = p.ownsEngine;
  }

  /** Loads the model (the VAE decoder, and the text encoder when kept) onto the engine; on failure frees what it loaded. */
  static async load(opts: PipelineLoadOptions = {}): Promise<Pipeline> {
    const decode = opts.decode ?? true;
    let tiny: TinyModel | undefined;
    let config: InfinityConfig;
    let presetName: PresetName | undefined;
    if (opts.weights === undefined) {
      if (opts.vae !== undefined) fail('ERR_INVALID_ARG', 'Pipeline.load: a VAE needs weights (without them the built-in tiny model runs)');
      if (opts.preset !== undefined && opts.preset !== 'tiny') fail('ERR_INVALID_ARG', 'Pipeline.load: a preset needs weights (without them the built-in tiny model runs)');
      if (opts.t5 !== undefined) fail('ERR_INVALID_ARG', 'Pipeline.load: t5 needs weights (the built-in tiny model has its own tiny T5)');
      tiny = createTinyModel(opts.tinySeed ?? 0);
      config = tiny.config;
    } else {
      if (decode && opts.vae === undefined) fail('ERR_INVALID_ARG', 'Pipeline.load: weights need a VAE (or decode: false)');
      ({ config, presetName } = presetConfig(opts.preset));
    }
    if (opts.engine && (opts.backend !== undefined || opts.threads !== undefined)) fail('ERR_INVALID_ARG', 'Pipeline.load: give an engine or a backend (and threads), not both');
    if (opts.t5Dtype !== undefined && opts.t5Dtype !== 'bf16' && opts.t5Dtype !== 'f32') fail('ERR_DTYPE', `t5Dtype must be 'bf16' or 'f32' (T5 overflows f16), got ${String(opts.t5Dtype)}`);
    // The text encoder's files are checked before any weight is loaded.
    let text: TextEncoderSource | undefined;
    if (tiny) {
      text = { weights: tiny.t5, tokenizer: tiny.tokenizer, dtype: opts.t5Dtype ?? opts.dtype, close: () => undefined };
    } else if (opts.t5 !== undefined) {
      const ckpt = T5Checkpoint.open(opts.t5);
      try {
        if (ckpt.config.dModel !== config.textChannels)
          fail('ERR_SHAPE', `${opts.t5}: the T5 d_model ${ckpt.config.dModel} is not the model's text_channels ${config.textChannels}`);
        const tokenizer = T5Tokenizer.fromFile(ckpt.tokenizerPath);
        if (tokenizer.vocabSize > ckpt.config.vocab)
          fail('ERR_FORMAT', `${opts.t5}: tokenizer.json has ${tokenizer.vocabSize} tokens, more than the model's vocab_size ${ckpt.config.vocab}`);
        text = { weights: ckpt, tokenizer, dtype: opts.t5Dtype ?? opts.dtype, close: () => ckpt.close() };
      } catch (e) {
        ckpt.close();
        throw e;
      }
    }
    const ownsEngine = opts.engine === undefined;
    let engine: Engine | undefined;
    let model: InfinityModel | undefined;
    let vae: VaeDecoder | undefined;
    let encoder: T5TextEncoder | undefined;
    try {
      engine = opts.engine ?? (await createEngine({ backend: opts.backend, threads: opts.threads }));
      const weights = tiny ? tiny.weights : opts.weights ?? fail('ERR_INTERNAL', 'no weights');
      if (typeof weights === 'string') {
        const ckpt = openCheckpoint(weights);
        try {
          model = await InfinityModel.load(engine, ckpt, config, { dtype: opts.dtype });
        } finally {
          ckpt.close();
        }
      } else {
        model = await InfinityModel.load(engine, weights, config, { dtype: opts.dtype });
      }
      if (decode) vae = await loadVae(engine, tiny ? tiny.vae : (opts.vae as string | Checkpoint), config, model.dtype);
      if (text && opts.keepTextEncoder) encoder = await T5TextEncoder.load(engine, text.weights, text.tokenizer, { dtype: text.dtype });
      return new Pipeline({ engine, model, vae, presetName, tiny: tiny !== undefined, text, encoder, ownsEngine, memoryPlans: opts.memoryPlan ?? true });
    } catch (e) {
      encoder?.dispose();
      vae?.dispose();
      model?.dispose();
      text?.close();
      if (ownsEngine) engine?.dispose();
      throw e;
    }
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Whether `prompts` can be given as text (the built-in tiny model, or a pipeline loaded with `t5`). */
  get encodesPrompts(): boolean {
    return this.#text !== undefined;
  }

  /**
   * The T5 features of prompts (and which were truncated): the encoder kept loaded, or loaded for this call and
   * freed after it.
   */
  encodeText(prompts: readonly string[], opts: { signal?: AbortSignal } = {}): Promise<EncodedText> {
    return this.#enqueue(() => this.#encodeText(prompts, opts));
  }

  // Unchecked: generations queued before dispose() still run.
  async #encodeText(prompts: readonly string[], opts: { signal?: AbortSignal }): Promise<EncodedText> {
    const src = this.#text ?? fail('ERR_INVALID_ARG', 'prompts as text need a T5 encoder: load the pipeline with t5 (a flan-t5-xl directory), or pass textFeatures');
    if (!Array.isArray(prompts) || !prompts.length || prompts.some((p) => typeof p !== 'string')) fail('ERR_INVALID_ARG', 'prompts must be a non-empty array of strings');
    const encoder = this.#encoder ?? (await T5TextEncoder.load(this.engine, src.weights, src.tokenizer, { dtype: src.dtype }));
    try {
      return await encoder.encode(prompts, opts);
    } finally {
      if (encoder !== this.#encoder) encoder.dispose();
    }
  }

  /**
   * The text features of a generation and of its negative prompts: `textFeatures` as given or read from its file,
   * or the `prompts` encoded (`negativePrompts` with them).
   */
  text(o: TextOptions): Promise<Conditioning> {
    return this.#enqueue(() => this.#conditioning(o, true));
  }

  // `useCfg` false: negative prompts would go unused (no unconditional rows), so they are not encoded.
  async #conditioning(o: TextOptions, useCfg: boolean): Promise<Conditioning> {
    if ((o.textFeatures === undefined) === (o.prompts === undefined)) fail('ERR_INVALID_ARG', 'give either textFeatures or prompts');
    const read = (f: TextFeatures | string) => (typeof f === 'string' ? readTextFeatures(f, this.config.textChannels) : f);
    if (o.textFeatures !== undefined) {
      if (o.negativePrompts !== undefined) fail('ERR_INVALID_ARG', 'negativePrompts go with prompts; with textFeatures give negativeTextFeatures');
      return { text: read(o.textFeatures), negative: o.negativeTextFeatures === undefined ? undefined : read(o.negativeTextFeatures) };
    }
    if (o.negativeTextFeatures !== undefined) fail('ERR_INVALID_ARG', 'negativeTextFeatures go with textFeatures; with prompts give negativePrompts');
    const prompts = o.prompts as readonly string[];
    if (!Array.isArray(prompts) || !prompts.length || prompts.some((p) => typeof p !== 'string')) fail('ERR_INVALID_ARG', 'prompts must be a non-empty array of strings');
    let negatives: readonly string[] = [];
    if (o.negativePrompts !== undefined && useCfg) {
      negatives = typeof o.negativePrompts === 'string' ? prompts.map(() => o.negativePrompts as string) : o.negativePrompts;
      if (!Array.isArray(negatives) || negatives.length !== prompts.length || negatives.some((p) => typeof p !== 'string'))
        fail('ERR_INVALID_ARG', `negativePrompts must be one string, or one string per prompt (${prompts.length})`);
    }
    // One pass for both sets: one encoder load.
    const all = await this.#encodeText([...prompts, ...negatives], { signal: o.signal });
    const [text, negative] = splitAt(all, prompts.length);
    return {
      text,
      negative: negatives.length ? negative : undefined,
      truncated: all.truncated.slice(0, prompts.length),
      negativeTruncated: negatives.length ? all.truncated.slice(prompts.length) : undefined,
    };
  }

  /** The KV policy of a spec ('full', 'scalekv:10%', ...) for this model, or the policy given. */
  kvPolicy(kv: KvPolicy | string | undefined): KvPolicy {
    if (kv === undefined || typeof kv === 'string') return kvPolicyFromSpec(kv ?? 'full', { depth: this.config.depth, preset: this.presetName });
    return kv;
  }

  /**
   * Samples and decodes one batch. Calls run one at a time in call order (each holds its KV cache and activations
   * until it ends). Rejects with ERR_ABORTED on `signal`, ERR_DISPOSED when called after `dispose`.
   */
  generate(o: PipelineGenerateOptions): Promise<PipelineResult> {
    return this.#enqueue(() => this.#generate(o));
  }

  // Generations and encodings run one at a time in call order, so a text encoder loaded for one never shares the
  // engine with another's KV cache, and dispose() waits for all of them.
  #enqueue<T>(work: () => Promise<T>): Promise<T> {
    try {
      this.#check();
    } catch (e) {
      return Promise.reject(e);
    }
    const run = this.#queue.then(work);
    this.#queue = run.catch(() => undefined);
    return run;
  }

  async #generate(o: PipelineGenerateOptions): Promise<PipelineResult> {
    if (o.signal?.aborted) throw abortError(o.signal);
    const vae = this.vae ?? fail('ERR_INVALID_ARG', 'Pipeline.generate: this pipeline was loaded with decode: false');
    const started = performance.now();
    // The cheap checks first: a typo must not cost a text-encoder load.
    const pn = o.pn ?? (this.#tiny ? '0.06M' : '1M');
    const schedule = scaleSchedule({ aspect: parseAspect(o.aspect), pn, patchify: this.config.patchify }).scales.map(([h, w]) => [h, w] as [number, number]);
    const kvPolicy = this.kvPolicy(o.kv);
    const batch = o.batch ?? 1;
    if (!Number.isSafeInteger(batch) || batch < 1) fail('ERR_INVALID_ARG', `batch must be a positive integer, got ${batch}`);
    const cfg = o.cfg ?? 3;
    const useCfg = (typeof cfg === 'number' ? [cfg] : [...cfg]).some((c) => c !== 1);
    const conditioning = await this.#conditioning(o, useCfg);
    const text = repeatTextFeatures(conditioning.text, batch);
    const negativeText = conditioning.negative && repeatTextFeatures(conditioning.negative, batch);
    const textMs = performance.now() - started;
    const seed = o.seed ?? 0;
    // The page size is this engine's: the plan's dry run is on a 'count' twin, and it must make the same arena.
    const sampling = { textFeatures: text, negativeText, schedule, cfg, tau: o.tau ?? 1, topK: o.topK, topP: o.topP, kvPolicy, kvDtype: o.kvDtype, kvPageTokens: kvPageTokensFor(this.engine.backend) };
    const shape = this.#memoryPlans ? await this.#planFor(sampling, o.kv, o.vaeBatch) : undefined;
    const plan = shape?.plan;
    const vaeBatch = o.vaeBatch ?? shape?.vaeBatch;
    let samplingMs = 0;
    let decodeStart = 0;
    const work = async () => {
      const sampled = await generate(this.model, {
        ...sampling,
        seed,
        signal: o.signal,
        onProgress: o.onProgress && ((si, total) => o.onProgress?.({ stage: 'sampling', done: si + 1, total })),
      });
      samplingMs = performance.now() - started - textMs;
      decodeStart = performance.now();
      try {
        if (o.signal?.aborted) throw abortError(o.signal);
        return { sampled, decoded: await decodeImage(vae, sampled.summedCodes, { vaeBatch }) };
      } finally {
        sampled.summedCodes.dispose();
      }
    };
    let memoryPlan: PipelineResult['memoryPlan'];
    let run: Awaited<ReturnType<typeof work>>;
    if (plan) {
      const r = await this.engine.withMemoryPlan(plan, work);
      run = r.result;
      memoryPlan = { arenaBytes: plan.total, ...r.plan };
    } else {
      run = await work();
    }
    const { sampled, decoded } = run;
    const decodeMs = performance.now() - decodeStart;
    o.onProgress?.({ stage: 'decode', done: 1, total: 1 });
    if (o.signal?.aborted) throw abortError(o.signal);
    const encodeStart = performance.now();
    const [B, H, W] = decoded.shape;
    const bytes = H * W * 3;
    const images: PipelineImage[] = [];
    for (let b = 0; b < B; b++) {
      const image: PipelineImage = { width: W, height: H, channels: 3, data: decoded.pixels.subarray(b * bytes, (b + 1) * bytes) };
      if (o.png) image.png = encodePng(image);
      images.push(image);
    }
    const memory = this.engine.memory();
    return {
      images,
      schedule,
      seed,
      truncated: conditioning.truncated,
      negativeTruncated: conditioning.negativeTruncated,
      timings: { textMs, samplingMs, decodeMs, encodeMs: performance.now() - encodeStart, totalMs: performance.now() - started, perScaleMs: sampled.timings.map((t) => t.ms) },
      memory,
      kvBytes: sampled.kvBytes,
      memoryPlan,
    };
  }

  /**
   * The static memory plan of a generation and its decode: from the cache, or from a dry run of the same calls on
   * the counting twin, for prompt lengths rounded up by plannedTextLength.
   */
  async #planFor(sampling: Omit<GenerateOptions, 'seed' | 'signal' | 'onProgress'>, kv: KvPolicy | string | undefined, vaeBatch: number | undefined): Promise<PlannedShape> {
    // The dry run's prompts: the real ones' lengths rounded up, and the same ones equal (the engine stores each
    // distinct text once), which the key records.
    const channels = this.config.textChannels;
    const texts: Float32Array[] = [];
    const padded = (t: TextFeatures | undefined) => {
      if (!t) return undefined;
      const lens = t.lens.map((n) => plannedTextLength(n, this.config.textMaxlen));
      const kv = new Float32Array(lens.reduce((a, b) => a + b, 0) * channels);
      const ids: number[] = [];
      let from = 0;
      let to = 0;
      t.lens.forEach((n, b) => {
        const prompt = t.kv.subarray(from * channels, (from + n) * channels);
        let id = texts.findIndex((x) => sameText(x, prompt));
        if (id < 0) id = texts.push(prompt) - 1;
        kv[to * channels] = id + 1;
        ids.push(id);
        from += n;
        to += lens[b];
      });
      return { features: { kv, lens }, ids };
    };
    const positive = padded(sampling.textFeatures);
    const negative = padded(sampling.negativeText);
    const textFeatures = positive?.features;
    const negativeText = negative?.features;
    const policy = typeof kv === 'string' || kv === undefined ? `spec:${kv ?? 'full'}` : `object:${this.#policyId(kv)}`;
    const key = JSON.stringify({
      schedule: sampling.schedule, cfg: sampling.cfg, text: textFeatures?.lens, textIds: positive?.ids, negative: negativeText?.lens, negativeIds: negative?.ids,
      policy, topK: sampling.topK, topP: sampling.topP, vaeBatch, kvDtype: sampling.kvDtype,
    });
    const cached = this.#plans.get(key);
    if (cached) {
      this.#plans.delete(key);
      this.#plans.set(key, cached);
      return cached;
    }
    this.#twin ??= (async () => {
      const engine = await createEngine({ backend: 'count' });
      const model = await InfinityModel.allocate(engine, this.config, { dtype: this.model.dtype });
      const vae = await VaeDecoder.allocate(engine, (this.vae as VaeDecoder).config);
      return { engine, model, vae };
    })();
    const twin = await this.#twin;
    let images = vaeBatch ?? 0;
    const plan = await planAllocations(twin.engine, async () => {
      const r = await generate(twin.model, { ...sampling, textFeatures, negativeText });
      try {
        images = (await decodeUnderPeak(twin.vae, r.summedCodes, vaeBatch)).vaeBatch;
      } finally {
        r.summedCodes.dispose();
      }
    });
    const shape = { plan, vaeBatch: images };
    this.#plans.set(key, shape);
    if (this.#plans.size > MEMORY_PLANS_KEPT) this.#plans.delete(this.#plans.keys().next().value as string);
    return shape;
  }

  #policyId(policy: KvPolicy): number {
    let id = this.#policyIds.get(policy);
    if (id === undefined) this.#policyIds.set(policy, (id = nextPolicyId++));
    return id;
  }

  /**
   * Lets the generations already asked for finish (cancel them through their signals to stop sooner), then frees
   * the model, the VAE and, when the pipeline created it, the engine. Later calls reject with ERR_DISPOSED.
   * Idempotent.
   */
  async dispose(): Promise<void> {
    if (this.#disposed) return;
    this.#disposed = true;
    await this.#queue;
    this.#encoder?.dispose();
    this.#text?.close();
    this.vae?.dispose();
    this.model.dispose();
    if (this.#ownsEngine) this.engine.dispose();
    const twin = await this.#twin?.catch(() => undefined);
    twin?.engine.dispose();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.dispose();
  }

  #check(): void {
    if (this.#disposed) fail('ERR_DISPOSED', 'Pipeline was disposed');
  }
}
