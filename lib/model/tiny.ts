/**
 * A built-in tiny Infinity model with deterministic random weights, for `scalekv demo` and tests: no download.
 * Same layout and sizes as the golden fixture's model (../shared/golden/forward_fullcache): depth 4, C 128, 2 heads
 * of 64, text_channels 128, 2 block chunks, d 32; VAE base_ch 32, ch_mult [1,1,1,1,2], patch 16. Its text encoder
 * is a tiny random T5 (d_model 128 = text_channels, 2 layers, gated-GELU, the flan-t5 bias buckets) behind the
 * package's own small Unigram tokenizer, made here as a tokenizer.json: prompts run the same tokenizer + encoder
 * path as with flan-t5-xl.
 *
 * Every tensor is a pure function of (seed, name, element index) through a counter-based generator: integer hashing
 * plus exact float arithmetic (an Irwin-Hall sum of four uniforms, no transcendental functions), so the bytes are the
 * same on every platform and independent of the order tensors are read in.
 */
import type { Checkpoint, TensorData, TensorInfo } from '../checkpoint/index.js';
import { fail } from '../errors.js';
import type { T5Config } from '../text/t5-checkpoint.js';
import { t5EncoderShapes } from '../text/t5-checkpoint.js';
import type { T5WeightSource } from '../text/t5-encoder.js';
import { T5Tokenizer } from '../text/tokenizer.js';
import { expectedVaeShapes, expectedWeightShapes, infinityConfig, InfinityConfig } from './presets.js';
import type { VaeDecoderConfig } from './vae.js';

export const TINY_VAE: Readonly<VaeDecoderConfig> = Object.freeze({ baseCh: 32, chMult: [1, 1, 1, 1, 2], numResBlocks: 2, codebookDim: 32, patchSize: 16 });

/** The tiny transformer config (the golden fixtures' model). */
export function tinyConfig(): InfinityConfig {
  return infinityConfig({ name: 'tiny', depth: 4, embedDim: 128, numHeads: 2, blockChunks: 2, textChannels: 128, vae: { ...TINY_VAE } });
}

// ---- counter-based generator

function fmix32(h: number): number {
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

function hashString(s: string, seed: number): number {
  let h = fmix32(seed ^ 0x9e3779b9);
  for (let i = 0; i < s.length; i++) h = fmix32(Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0);
  return h;
}

/** A stream of approximately N(0, 1) values keyed by (key, index): (u1 + u2 + u3 + u4 - 2) * sqrt(3). */
function normalAt(key: number, i: number): number {
  let s = 0;
  for (let j = 0; j < 4; j++) s += fmix32((key ^ fmix32((4 * i + j + 1) >>> 0)) >>> 0);
  // Each term is an integer < 2^32: the sum is exact, so is the scaling by a power of two.
  return (s / 4294967296 - 2) * Math.sqrt(3);
}

function fillNormal(key: number, n: number, std: number, mean = 0): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = mean + std * normalAt(key, i);
  return out;
}

// ---- initialisation rules (scaled so activations stay O(1))

function transformerInit(name: string, shape: readonly number[], key: number, c: InfinityConfig): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  const C = c.embedDim;
  const initStd = Math.sqrt(1 / C / 3);
  if (name.endsWith('zero_k_bias')) return new Float32Array(n);
  if (name.endsWith('scale_mul_1H11')) return fillNormal(key, n, 0.1, Math.log(4));
  if (name.endsWith('ada_gss')) return fillNormal(key, n, 1 / Math.sqrt(C));
  if (name === 'text_norm.weight' || name.endsWith('ca_norm.weight')) return fillNormal(key, n, 0.05, 1);
  if (name.endsWith('ca_norm.bias')) return fillNormal(key, n, 0.05);
  if (name === 'cfg_uncond') return fillNormal(key, n, 1);
  if (name === 'pos_start' || name === 'lvl_embed.weight') return fillNormal(key, n, initStd);
  if (name === 'text_proj_for_sos.ca.mat_q') return fillNormal(key, n, 1 / Math.sqrt(shape[shape.length - 1]));
  if (name.endsWith('.bias') || name.endsWith('q_bias') || name.endsWith('v_bias')) return fillNormal(key, n, 0.02);
  if (shape.length === 2) {
    // Linear [out, in]: fan-in scaling; the residual branches' output projections a little smaller.
    const damp = /\.(sa\.proj|ca\.proj|ffn\.fc2)\.weight$/.test(name) ? 0.5 : 1;
    return fillNormal(key, n, damp / Math.sqrt(shape[1]));
  }
  fail('ERR_INTERNAL', `tiny model: no init rule for ${name}`);
}

function t5Init(name: string, shape: readonly number[], key: number, c: T5Config): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  // Hugging Face's T5 initialisation (factor 1): embeddings N(0, 1), q at (d_model * d_kv)^-1/2 (T5 does not
  // scale its logits), other Linears at fan-in^-1/2; norms near 1 so they are not the identity.
  if (name.endsWith('layer_norm.weight')) return fillNormal(key, n, 0.05, 1);
  if (name === 'shared.weight') return fillNormal(key, n, 1);
  if (name.endsWith('relative_attention_bias.weight')) return fillNormal(key, n, 1 / Math.sqrt(c.dModel));
  if (name.endsWith('SelfAttention.q.weight')) return fillNormal(key, n, 1 / Math.sqrt(c.dModel * c.dKv));
  if (shape.length === 2) return fillNormal(key, n, 1 / Math.sqrt(shape[1]));
  fail('ERR_INTERNAL', `tiny T5: no init rule for ${name}`);
}

function vaeInit(name: string, shape: readonly number[], key: number): Float32Array {
  const n = shape.reduce((a, b) => a * b, 1);
  if (name.endsWith('.norm.weight')) return fillNormal(key, n, 0.05, 1);
  if (name.endsWith('.norm.bias')) return fillNormal(key, n, 0.05);
  if (name.endsWith('.conv.bias')) return fillNormal(key, n, 0.01);
  if (name.endsWith('.conv.weight')) {
    const fanIn = shape[1] * shape[2] * shape[3];
    const damp = /\.conv2\.conv\.weight$/.test(name) ? 0.5 : 1;
    return fillNormal(key, n, damp / Math.sqrt(fanIn));
  }
  fail('ERR_INTERNAL', `tiny VAE: no init rule for ${name}`);
}

// ---- an in-memory checkpoint

type Generator = (name: string, shape: readonly number[]) => Float32Array | BigInt64Array;

/** A read-only in-memory Checkpoint whose tensors are generated on demand (and cached). */
export class GeneratedCheckpoint implements Checkpoint {
  readonly format = 'memory' as const;
  readonly names: string[];
  readonly #shapes: Map<string, { shape: number[]; dtype: 'f32' | 'i64' }>;
  readonly #gen: Generator;
  readonly #cache = new Map<string, Buffer>();

  constructor(readonly path: string, shapes: Map<string, { shape: number[]; dtype: 'f32' | 'i64' }>, gen: Generator) {
    this.#shapes = shapes;
    this.names = [...shapes.keys()];
    this.#gen = gen;
  }

  has(name: string): boolean {
    return this.#shapes.has(name);
  }

  entry(name: string): TensorInfo {
    const s = this.#shapes.get(name);
    if (!s) fail('ERR_FORMAT', `${this.path}: no tensor named ${name}`);
    return { dtype: s.dtype, shape: [...s.shape], bytes: s.shape.reduce((a, b) => a * b, 1) * (s.dtype === 'i64' ? 8 : 4) };
  }

  /** The raw little-endian bytes, synchronously. */
  bytes(name: string): Buffer {
    let b = this.#cache.get(name);
    if (!b) {
      const info = this.entry(name);
      const data = this.#gen(name, info.shape);
      b = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
      this.#cache.set(name, b);
    }
    return b;
  }

  /** A float tensor as a Float32Array copy (what VaeDecoder's function weight source wants). */
  f32(name: string): Float32Array {
    if (this.entry(name).dtype !== 'f32') fail('ERR_DTYPE', `${this.path}: ${name} is not f32`);
    const b = this.bytes(name);
    return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  }

  async read(name: string): Promise<TensorData> {
    const info = this.entry(name);
    return { dtype: info.dtype, shape: info.shape, data: Buffer.from(this.bytes(name)) };
  }

  close(): void {
    this.#cache.clear();
  }
}

export interface TinyModel {
  seed: number;
  config: InfinityConfig;
  vaeConfig: VaeDecoderConfig;
  /** Transformer weights, official key names (block_chunks.{i//2}.module.{i%2}.*). */
  weights: GeneratedCheckpoint;
  /** VAE weights, names as the official vae state dict (decoder.* wrapped spelling, plus the lfq masks). */
  vae: GeneratedCheckpoint;
  /** The tiny T5 encoder's weights (Hugging Face key names; config.dModel = config.textChannels). */
  t5: T5WeightSource;
  /** The package's own small tokenizer (tinyTokenizerJson), as the tiny T5 reads it. */
  tokenizer: T5Tokenizer;
}

/**
 * The words of the tiny tokenizer, each one piece: the vocabulary of short image prompts. Anything else splits into
 * letters, digits and punctuation; other characters are <unk>.
 */
const TINY_WORDS = (
  'a an the of in on at by to for with from and or under over above below behind beside near inside outside into ' +
  'through at across red orange yellow green blue purple pink white black gray grey brown gold golden silver bright ' +
  'dark light soft warm cold glowing shining tiny small big large huge tall old young ancient modern quiet misty foggy ' +
  'snowy rainy sunny cloudy wooden stone glass metal paper fox cat dog owl horse bird fish whale dragon robot astronaut ' +
  'person man woman child girl boy tree trees forest flower flowers garden grass mountain mountains river lake sea ' +
  'ocean beach island sky cloud clouds sun moon star stars rain snow storm fire ice water city street road bridge ' +
  'tower castle house building room window door lighthouse boat ship train car book lamp night day morning evening ' +
  'sunset sunrise winter summer spring autumn painting photo photograph portrait sketch drawing watercolor oil ink ' +
  'pencil pixel art render cinematic lighting detailed sharp focus macro wide angle view close isometric studio ' +
  'style reading riding flying floating walking running sitting standing sleeping swimming reflecting dancing'
).split(' ');

/**
 * The tiny tokenizer as a Hugging Face tokenizer.json (what T5Tokenizer reads): a Unigram model over <pad>, </s>,
 * <unk>, the word pieces (most likely first), single letters, digits and punctuation, after NFKC and lower-casing
 * and a Metaspace pre-tokenizer, as flan-t5's.
 */
export function tinyTokenizerJson(): object {
  const chars = [...'abcdefghijklmnopqrstuvwxyz0123456789', ...".,;:!?'\"-()/&+%#@*"];
  const vocab: [string, number][] = [['<pad>', 0], ['</s>', 0], ['<unk>', 0], ['\u2581', -3]];
  const seen = new Set<string>();
  const add = (piece: string, score: number) => {
    if (!seen.has(piece)) vocab.push([piece, score]);
    seen.add(piece);
  };
  TINY_WORDS.forEach((w, i) => add(`\u2581${w}`, -5 - i / 1000));
  for (const ch of chars) add(`\u2581${ch}`, -8);
  for (const ch of chars) add(ch, -9);
  const special = ['<pad>', '</s>', '<unk>'].map((content, id) => ({ id, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }));
  const metaspace = { type: 'Metaspace', replacement: '\u2581', add_prefix_space: true };
  return {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: special,
    normalizer: { type: 'Sequence', normalizers: [{ type: 'NFKC' }, { type: 'Lowercase' }] },
    pre_tokenizer: metaspace,
    post_processor: null,
    decoder: metaspace,
    model: { type: 'Unigram', unk_id: 2, vocab },
  };
}

/** The tiny T5 encoder's configuration for a vocabulary of `vocab` pieces. */
export function tinyT5Config(vocab: number): T5Config {
  return { dModel: tinyConfig().textChannels, dKv: 32, heads: 4, layers: 2, dFf: 256, buckets: 32, maxDistance: 128, eps: 1e-6, vocab };
}

export function createTinyModel(seed = 0): TinyModel {
  if (!Number.isSafeInteger(seed)) fail('ERR_INVALID_ARG', `tiny model seed must be an integer, got ${seed}`);
  const s32 = (seed ^ Math.floor(seed / 4294967296)) >>> 0;
  const config = tinyConfig();
  const vaeConfig: VaeDecoderConfig = { ...TINY_VAE, chMult: [...TINY_VAE.chMult] };
  const tShapes = new Map<string, { shape: number[]; dtype: 'f32' | 'i64' }>();
  for (const [n, shape] of expectedWeightShapes(config)) tShapes.set(n, { shape, dtype: 'f32' });
  const vShapes = new Map<string, { shape: number[]; dtype: 'f32' | 'i64' }>();
  for (const [n, shape] of expectedVaeShapes(vaeConfig, { quantizer: true })) vShapes.set(n, { shape, dtype: n.endsWith('lfq.mask') ? 'i64' : 'f32' });
  const weights = new GeneratedCheckpoint(`memory:tiny-infinity/seed=${seed}/weights`, tShapes, (name, shape) =>
    transformerInit(name, shape, hashString(`t/${name}`, s32), config),
  );
  const vae = new GeneratedCheckpoint(`memory:tiny-infinity/seed=${seed}/vae`, vShapes, (name, shape) => {
    if (name.endsWith('lfq.mask')) return BigInt64Array.from({ length: shape[0] }, (_, i) => 1n << BigInt(shape[0] - 1 - i));
    return vaeInit(name, shape, hashString(`v/${name}`, s32));
  });
  const tokenizerJson = tinyTokenizerJson();
  const tokenizer = new T5Tokenizer(tokenizerJson);
  const t5Config = tinyT5Config(tokenizer.vocabSize);
  const t5Shapes = new Map<string, { shape: number[]; dtype: 'f32' | 'i64' }>();
  for (const [n, shape] of t5EncoderShapes(t5Config)) t5Shapes.set(n, { shape, dtype: 'f32' });
  const t5Weights = new GeneratedCheckpoint(`memory:tiny-infinity/seed=${seed}/t5`, t5Shapes, (name, shape) => t5Init(name, shape, hashString(`t5/${name}`, s32), t5Config));
  const t5: T5WeightSource = { config: t5Config, read: (name) => t5Weights.read(name) };
  return { seed, config, vaeConfig, weights, vae, t5, tokenizer };
}
