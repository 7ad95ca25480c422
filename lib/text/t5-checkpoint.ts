/**
 * A T5 model directory in the Hugging Face layout, as Infinity's text encoder needs it (spec §4.1): `config.json`,
 * the weights (`model.safetensors`, sharded `model-*.safetensors` + `model.safetensors.index.json`, or
 * `pytorch_model.bin` and its shards + index through the safe unpickler) and `tokenizer.json`. Only the encoder's
 * tensors and the shared embedding are ever read — the decoder half of flan-t5-xl never is — one at a time.
 */
import { join } from 'node:path';
import { Checkpoint, openCheckpoint, TensorData } from '../checkpoint/index.js';
import { fail, ScaleKVError } from '../errors.js';
import { readJsonFile } from './json-file.js';

/** The encoder's hyper-parameters, from config.json (Hugging Face names in the comments). */
export interface T5Config {
  /** d_model */
  dModel: number;
  /** d_kv: per-head width (d_model / num_heads need not hold: flan-t5-xl has 32 heads of 64 over d_model 2048). */
  dKv: number;
  /** num_heads */
  heads: number;
  /** num_layers: encoder blocks. */
  layers: number;
  /** d_ff */
  dFf: number;
  /** relative_attention_num_buckets */
  buckets: number;
  /** relative_attention_max_distance (default 128) */
  maxDistance: number;
  /** layer_norm_epsilon (default 1e-6) */
  eps: number;
  /** vocab_size */
  vocab: number;
}

const FLOAT_DTYPES = new Set(['f32', 'bf16', 'f16']);

/** google/flan-t5-xl's encoder (Infinity 2B and 8B's text encoder, spec sec. 4.1). */
export const FLAN_T5_XL: Readonly<T5Config> = Object.freeze({ dModel: 2048, dKv: 64, heads: 32, layers: 24, dFf: 5120, buckets: 32, maxDistance: 128, eps: 1e-6, vocab: 32128 });

/**
 * Bounds far above any released T5 (flan-t5-xxl: d_model 4096, d_ff 10240, 24 layers; umT5: vocab 256,384) that
 * keep a forged config.json from making the encoder's tensor list (layers × 9 names) or its shapes absurd: a
 * num_layers of 2^53 was a hang before any weight was read.
 */
const MAX_T5_WIDTH = 1 << 20;
const MAX_T5_LAYERS = 1024;

/** The T5 encoder configuration of a parsed config.json; only the gated-GELU feed-forward of flan-t5 is supported. */
export function parseT5Config(json: unknown, source = 'config.json'): T5Config {
  const c = json as Record<string, unknown> | null;
  if (!c || typeof c !== 'object' || Array.isArray(c)) fail('ERR_FORMAT', `${source}: not a JSON object`);
  if (c.model_type !== undefined && c.model_type !== 't5') fail('ERR_FORMAT', `${source}: model_type ${JSON.stringify(c.model_type)?.slice(0, 40)} is not a T5 model`);
  const int = (key: string, fallback?: number, max = MAX_T5_WIDTH): number => {
    const v = c[key] ?? fallback;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1 || v > max)
      fail('ERR_FORMAT', `${source}: ${key} must be an integer in [1, ${max}], got ${JSON.stringify(c[key])?.slice(0, 40)}`);
    return v;
  };
  const proj = c.feed_forward_proj ?? 'relu';
  if (proj !== 'gated-gelu')
    fail('ERR_FORMAT', `${source}: feed_forward_proj ${JSON.stringify(proj)?.slice(0, 40)} is not supported (Infinity's flan-t5 encoders use 'gated-gelu')`);
  const eps = c.layer_norm_epsilon ?? 1e-6;
  if (typeof eps !== 'number' || !(eps > 0) || !Number.isFinite(eps)) fail('ERR_FORMAT', `${source}: layer_norm_epsilon must be a positive number`);
  return {
    dModel: int('d_model'),
    dKv: int('d_kv'),
    heads: int('num_heads'),
    layers: int('num_layers', undefined, MAX_T5_LAYERS),
    dFf: int('d_ff'),
    buckets: int('relative_attention_num_buckets', 32),
    maxDistance: int('relative_attention_max_distance', 128),
    eps,
    vocab: int('vocab_size'),
  };
}

/**
 * Every tensor the encoder reads, with its shape: the shared embedding, per block the attention (q, k, v, o; the
 * relative-position bias in block 0 only, shared by every layer), the gated-GELU FFN and two RMS norms, and the
 * final norm.
 */
export function t5EncoderShapes(c: T5Config): Map<string, number[]> {
  const inner = c.heads * c.dKv;
  const m = new Map<string, number[]>([['shared.weight', [c.vocab, c.dModel]]]);
  for (let i = 0; i < c.layers; i++) {
    const b = `encoder.block.${i}.layer`;
    for (const x of ['q', 'k', 'v']) m.set(`${b}.0.SelfAttention.${x}.weight`, [inner, c.dModel]);
    m.set(`${b}.0.SelfAttention.o.weight`, [c.dModel, inner]);
    if (i === 0) m.set(`${b}.0.SelfAttention.relative_attention_bias.weight`, [c.buckets, c.heads]);
    m.set(`${b}.0.layer_norm.weight`, [c.dModel]);
    m.set(`${b}.1.DenseReluDense.wi_0.weight`, [c.dFf, c.dModel]);
    m.set(`${b}.1.DenseReluDense.wi_1.weight`, [c.dFf, c.dModel]);
    m.set(`${b}.1.DenseReluDense.wo.weight`, [c.dModel, c.dFf]);
    m.set(`${b}.1.layer_norm.weight`, [c.dModel]);
  }
  m.set('encoder.final_layer_norm.weight', [c.dModel]);
  return m;
}

/** An opened T5 directory whose encoder tensors all exist with the shapes and dtypes config.json implies. */
export class T5Checkpoint {
  readonly dir: string;
  readonly config: T5Config;
  readonly tokenizerPath: string;
  /** The encoder's tensors and their shapes, in the order `tensors()` yields them. */
  readonly shapes: ReadonlyMap<string, readonly number[]>;
  readonly #ckpt: Checkpoint;
  /** Checkpoint name of each encoder tensor (the embedding may be stored as encoder.embed_tokens.weight). */
  readonly #source = new Map<string, string>();

  private constructor(dir: string, config: T5Config, ckpt: Checkpoint) {
    this.dir = dir;
    this.config = config;
    this.tokenizerPath = join(dir, 'tokenizer.json');
    this.#ckpt = ckpt;
    this.shapes = t5EncoderShapes(config);
    for (const [name, shape] of this.shapes) {
      const stored = name === 'shared.weight' && !ckpt.has(name) && ckpt.has('encoder.embed_tokens.weight') ? 'encoder.embed_tokens.weight' : name;
      if (!ckpt.has(stored)) fail('ERR_FORMAT', `${ckpt.path}: the T5 encoder needs ${name}, which the checkpoint lacks`);
      const info = ckpt.entry(stored);
      if (!FLOAT_DTYPES.has(info.dtype)) fail('ERR_DTYPE', `${ckpt.path}: ${stored} is ${info.dtype}; T5 weights are f32, bf16 or f16`);
      if (info.shape.length !== shape.length || info.shape.some((d, i) => d !== shape[i]))
        fail('ERR_SHAPE', `${ckpt.path}: ${stored} is [${info.shape.join(', ')}] where config.json implies [${shape.join(', ')}]`);
      this.#source.set(name, stored);
    }
    // A block beyond num_layers means config.json and the weights disagree.
    for (const n of ckpt.names) {
      const m = /^encoder\.block\.(\d+)\./.exec(n);
      if (m && Number(m[1]) >= config.layers)
        fail('ERR_FORMAT', `${ckpt.path}: ${n} belongs to encoder block ${m[1]}, but config.json has num_layers ${config.layers}`);
    }
  }

  /** Opens `dir` (config.json, the weights in any Hugging Face layout) and checks every encoder tensor. */
  static open(dir: string): T5Checkpoint {
    const configPath = join(dir, 'config.json');
    const json = readJsonFile(configPath, 'T5 config');
    const config = parseT5Config(json, configPath);
    const ckpt = openCheckpoint(dir);
    try {
      return new T5Checkpoint(dir, config, ckpt);
    } catch (e) {
      ckpt.close();
      throw e;
    }
  }

  /** One encoder tensor as stored (its dtype, shape and bytes). */
  read(name: string): Promise<TensorData> {
    const stored = this.#source.get(name);
    if (stored === undefined) return Promise.reject(new ScaleKVError('ERR_INVALID_ARG', `${name} is not a T5 encoder tensor`));
    return this.#ckpt.read(stored);
  }

  /** The encoder's tensors one at a time, so a loader holds at most one on the host. */
  async *tensors(): AsyncGenerator<[string, TensorData]> {
    for (const name of this.shapes.keys()) yield [name, await this.read(name)];
  }

  close(): void {
    this.#ckpt.close();
  }
}
