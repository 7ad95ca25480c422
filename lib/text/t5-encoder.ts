/**
 * The T5 encoder (T5EncoderModel semantics, spec §4.1) on the engine, run on each prompt's real tokens only:
 * prompts are packed back to back and every op is varlen, so no work is spent on padding and the result equals
 * the padded, masked computation on the real tokens (padded keys are masked out and positions are relative).
 *
 * Per block: x += O(attention(RMSNorm(x))) with scores q·kᵀ + bias (no 1/√d), the bias being block 0's
 * bucketed relative-position table shared by every block; x += wo(gelu_tanh(wi_0 h) ⊙ wi_1 h) with h = RMSNorm(x);
 * then a final RMSNorm. The q/k/v weights are fused into one [3·inner, d] GEMM and wi_0/wi_1 into one [2·d_ff, d]
 * GEMM whose halves gatedActivation combines. The token embedding stays on the host (a prompt's rows are gathered
 * there and uploaded): the device never holds the 32128-row table.
 */
import type { TensorData } from '../checkpoint/index.js';
import { toHostArray } from '../checkpoint/load.js';
import type { Engine, Tensor } from '../engine.js';
import { fail, ScaleKVError } from '../errors.js';
import type { TextFeatures } from '../model/infinity.js';
import { T5Checkpoint, T5Config, t5EncoderShapes } from './t5-checkpoint.js';
import { T5Tokenizer } from './tokenizer.js';

/** Where the encoder's weights come from: a T5Checkpoint, or anything that reads its tensors by name. */
export interface T5WeightSource {
  readonly config: T5Config;
  read(name: string): Promise<TensorData>;
}

export interface T5EncoderLoadOptions {
  /**
   * Device dtype of the Linear weights: 'bf16' (default on CUDA) or 'f32' (default elsewhere). Never f16: T5's
   * activations overflow it. Norms, the position bias and every activation are f32.
   */
  dtype?: 'f32' | 'bf16';
  /** Tokens per forward pass (prompts are grouped up to this, each whole): bounds the activations. Default 8192. */
  maxBatchTokens?: number;
}

/** T5 features of B prompts, as the sampling loop takes them, with what the tokenizer cut. */
export interface EncodedText extends TextFeatures {
  /** Whether prompt b was longer than 511 pieces and lost its tail. */
  truncated: boolean[];
}

interface T5Weights {
  qkv: Tensor;
  o: Tensor;
  ln0: Tensor;
  wi: Tensor;
  wo: Tensor;
  ln1: Tensor;
}

/**
 * T5's bidirectional relative-position bucket of offset `rel` = key − query, as HF's `_relative_position_bucket`
 * computes it in float32 (half the buckets per direction; exact below `buckets / 4`, log-spaced up to
 * `maxDistance`, the last bucket beyond).
 */
export function t5RelativeBucket(rel: number, buckets: number, maxDistance: number): number {
  const f = Math.fround;
  const half = Math.floor(buckets / 2);
  const base = rel > 0 ? half : 0;
  const r = Math.abs(rel);
  const maxExact = Math.floor(half / 2);
  if (r < maxExact) return base + r;
  const large = maxExact + Math.trunc(f(f(f(Math.log(f(r / maxExact))) / f(Math.log(maxDistance / maxExact))) * (half - maxExact)));
  return base + Math.min(large, half - 1);
}

/**
 * The bias of every offset −R..R (R = maxDistance, beyond which the bucket no longer changes) per head: [H, 2R + 1]
 * f32, what segmentAttention takes. `table` is relative_attention_bias.weight [buckets, H].
 */
export function relativePositionBias(table: Float32Array, c: Pick<T5Config, 'buckets' | 'heads' | 'maxDistance'>): Float32Array {
  const R = c.maxDistance;
  const span = 2 * R + 1;
  const out = new Float32Array(c.heads * span);
  for (let i = 0; i < span; i++) {
    const bucket = t5RelativeBucket(i - R, c.buckets, c.maxDistance);
    for (let h = 0; h < c.heads; h++) out[h * span + i] = table[bucket * c.heads + h];
  }
  return out;
}

function checkConfig(c: T5Config): void {
  if (c.buckets < 4) fail('ERR_FORMAT', `T5 config: relative_attention_num_buckets must be at least 4, got ${c.buckets}`);
  if (c.dKv > 256) fail('ERR_FORMAT', `T5 config: d_kv ${c.dKv} exceeds the attention kernels' 256`);
}

export class T5TextEncoder {
  readonly engine: Engine;
  readonly config: Readonly<T5Config>;
  /** The prompts' tokenizer; undefined for an encoder that takes token ids only (`allocate`). */
  readonly tokenizer?: T5Tokenizer;
  readonly dtype: 'f32' | 'bf16';
  readonly maxBatchTokens: number;
  /** The token embedding as stored (dtype and bytes), on the host; null: rows of zeros (`allocate`). */
  #embedding: TensorData | null;
  readonly #bias: Tensor;
  readonly #blocks: T5Weights[];
  readonly #finalNorm: Tensor;
  readonly #all: Tensor[];
  #disposed = false;

  private constructor(p: {
    engine: Engine; config: T5Config; tokenizer?: T5Tokenizer; dtype: 'f32' | 'bf16'; maxBatchTokens: number;
    embedding: TensorData | null; bias: Tensor; blocks: T5Weights[]; finalNorm: Tensor; all: Tensor[];
  }) {
    this.engine = p.engine;
    this.config = Object.freeze({ ...p.config });
    this.tokenizer = p.tokenizer;
    this.dtype = p.dtype;
    this.maxBatchTokens = p.maxBatchTokens;
    this.#embedding = p.embedding;
    this.#bias = p.bias;
    this.#blocks = p.blocks;
    this.#finalNorm = p.finalNorm;
    this.#all = p.all;
  }

  /**
   * Streams the encoder's weights to the engine one tensor at a time (category 'weights'), each checked against
   * the configuration. `tokenizer` encodes prompts for `encode`.
   */
  static async load(engine: Engine, source: T5WeightSource, tokenizer: T5Tokenizer | undefined, opts: T5EncoderLoadOptions = {}): Promise<T5TextEncoder> {
    return T5TextEncoder.#create(engine, source.config, source, tokenizer, opts);
  }

  /**
   * An encoder with every weight allocated as `load` would, zero-filled instead of read: what the memory planner
   * runs on the 'count' backend and what the bench times at real shapes without a download. Takes token ids.
   */
  static async allocate(engine: Engine, config: T5Config, opts: T5EncoderLoadOptions = {}): Promise<T5TextEncoder> {
    return T5TextEncoder.#create(engine, config, null, undefined, opts);
  }

  static async #create(engine: Engine, config: T5Config, source: T5WeightSource | null, tokenizer: T5Tokenizer | undefined, opts: T5EncoderLoadOptions): Promise<T5TextEncoder> {
    checkConfig(config);
    const dtype = opts.dtype ?? (engine.backend === 'cuda' ? 'bf16' : 'f32');
    if (dtype !== 'f32' && dtype !== 'bf16') fail('ERR_DTYPE', `T5 encoder: dtype must be 'f32' or 'bf16' (f16 overflows in T5), got ${String(dtype)}`);
    const maxBatchTokens = opts.maxBatchTokens ?? 8192;
    if (!Number.isSafeInteger(maxBatchTokens) || maxBatchTokens < 1) fail('ERR_INVALID_ARG', `maxBatchTokens must be a positive integer, got ${maxBatchTokens}`);
    const c = config;
    const shapes = t5EncoderShapes(c);
    const all: Tensor[] = [];
    const read = async (name: string): Promise<TensorData> => {
      const t = await (source as T5WeightSource).read(name);
      const want = shapes.get(name) as number[];
      if (t.shape.length !== want.length || t.shape.some((d, i) => d !== want[i]))
        fail('ERR_SHAPE', `T5 weight ${name}: expected [${want.join(', ')}], got [${t.shape.join(', ')}]`);
      return t;
    };
    // Several checkpoint tensors stacked along the rows of one device tensor (q ‖ k ‖ v, wi_0 ‖ wi_1).
    const upload = async (names: string[], dt: 'f32' | 'bf16'): Promise<Tensor> => {
      const rows = names.reduce((n, name) => n + (shapes.get(name) as number[])[0], 0);
      const cols = (shapes.get(names[0]) as number[])[1] ?? 1;
      const shape = (shapes.get(names[0]) as number[]).length === 1 ? [rows] : [rows, cols];
      let t: Tensor;
      if (!source) {
        t = engine.empty(shape, dt, { category: 'weights', fillByte: 0 });
      } else {
        const parts = [];
        for (const name of names) parts.push(toHostArray(await read(name), dt, `T5 weight ${name}`));
        // bf16 checkpoint tensors arrive as raw bits, others as f32: stack like with like (f32 when mixed).
        const bits = parts.every((p) => p instanceof Uint16Array);
        if (!bits) for (let i = 0; i < parts.length; i++) if (parts[i] instanceof Uint16Array) parts[i] = toHostArray(await read(names[i]), 'f32', `T5 weight ${names[i]}`);
        let host = parts[0];
        if (parts.length > 1) {
          const joined = bits ? new Uint16Array(rows * cols) : new Float32Array(rows * cols);
          let at = 0;
          for (const p of parts) {
            joined.set(p as Float32Array & Uint16Array, at);
            at += p.length;
          }
          host = joined;
        }
        t = engine.tensor(host, shape, dt, { category: 'weights' });
      }
      all.push(t);
      return t;
    };
    try {
      const embedding = source ? await read('shared.weight') : null;
      if (embedding && !['f32', 'bf16', 'f16'].includes(embedding.dtype)) fail('ERR_DTYPE', `T5 weight shared.weight is ${embedding.dtype}`);
      const biasName = 'encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight';
      const table = source ? (toHostArray(await read(biasName), 'f32', biasName) as Float32Array) : new Float32Array(c.buckets * c.heads);
      const bias = engine.tensor(relativePositionBias(table, c), [c.heads, 2 * c.maxDistance + 1], 'f32', { category: 'weights' });
      all.push(bias);
      const blocks: T5Weights[] = [];
      for (let i = 0; i < c.layers; i++) {
        const b = `encoder.block.${i}.layer`;
        const a = `${b}.0.SelfAttention`;
        blocks.push({
          ln0: await upload([`${b}.0.layer_norm.weight`], 'f32'),
          qkv: await upload([`${a}.q.weight`, `${a}.k.weight`, `${a}.v.weight`], dtype),
          o: await upload([`${a}.o.weight`], dtype),
          ln1: await upload([`${b}.1.layer_norm.weight`], 'f32'),
          wi: await upload([`${b}.1.DenseReluDense.wi_0.weight`, `${b}.1.DenseReluDense.wi_1.weight`], dtype),
          wo: await upload([`${b}.1.DenseReluDense.wo.weight`], dtype),
        });
      }
      const finalNorm = await upload(['encoder.final_layer_norm.weight'], 'f32');
      await engine.sync();
      return new T5TextEncoder({ engine, config: c, tokenizer, dtype, maxBatchTokens, embedding, bias, blocks, finalNorm, all });
    } catch (e) {
      for (const t of all) t.dispose();
      throw e;
    }
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Device bytes of the encoder's weights (the host keeps the token embedding). */
  get weightBytes(): number {
    return this.#all.reduce((n, t) => n + t.bytes, 0);
  }

  /**
   * Tokenizes and encodes prompts: kv [Σ lens, d_model] f32 (prompts concatenated, Infinity's kv_compact), lens,
   * and which prompts were truncated. An empty prompt is `</s>` alone.
   */
  async encode(prompts: readonly string[], opts: { signal?: AbortSignal } = {}): Promise<EncodedText> {
    this.#check();
    const tok = this.tokenizer ?? fail('ERR_INVALID_ARG', 'this T5 encoder has no tokenizer: give token ids to encodeIds');
    const { ids, lens, truncated } = tok.encodeBatch(prompts);
    const kv = await this.encodeIds(ids, lens, opts);
    return { kv, lens, truncated };
  }

  /**
   * The last hidden state of prompts given as token ids (concatenated, `lens` per prompt): [Σ lens, d_model] f32.
   * Prompts are grouped into passes of at most `maxBatchTokens` tokens (a longer prompt runs alone).
   */
  async encodeIds(ids: Int32Array, lens: readonly number[], opts: { signal?: AbortSignal } = {}): Promise<Float32Array> {
    this.#check();
    const c = this.config;
    if (!(ids instanceof Int32Array)) fail('ERR_INVALID_ARG', 'ids must be an Int32Array');
    if (!Array.isArray(lens) || !lens.length || lens.some((n) => !Number.isSafeInteger(n) || n < 1))
      fail('ERR_INVALID_ARG', 'lens must be a non-empty array of positive integers');
    const total = lens.reduce((a, b) => a + b, 0);
    if (total !== ids.length) fail('ERR_SHAPE', `lens sum to ${total}, but there are ${ids.length} ids`);
    for (let i = 0; i < ids.length; i++)
      if (ids[i] < 0 || ids[i] >= c.vocab) fail('ERR_INDEX_RANGE', `token id ${ids[i]} at ${i} is outside the vocabulary [0, ${c.vocab})`);
    const out = new Float32Array(total * c.dModel);
    let first = 0;
    for (let p = 0; p < lens.length; ) {
      let q = p + 1;
      let tokens = lens[p];
      // A pass is also capped at the attention kernel's 65535 segments.
      while (q < lens.length && q - p < 65535 && tokens + lens[q] <= this.maxBatchTokens) tokens += lens[q++];
      if (opts.signal?.aborted) throw new ScaleKVError('ERR_ABORTED', 'text encoding aborted', { cause: opts.signal.reason });
      const part = await this.#forward(ids.subarray(first, first + tokens), lens.slice(p, q));
      out.set(part, first * c.dModel);
      first += tokens;
      p = q;
    }
    return out;
  }

  async #forward(ids: Int32Array, lens: readonly number[]): Promise<Float32Array> {
    const c = this.config;
    const e = this.engine;
    const ops = e.ops;
    const N = ids.length;
    const d = c.dModel;
    const inner = c.heads * c.dKv;
    const cu = new Int32Array(lens.length + 1);
    lens.forEach((n, s) => (cu[s + 1] = cu[s] + n));
    const scratch: Tensor[] = [];
    const t = (shape: number[]) => {
      const x = e.empty(shape, 'f32', { category: 'activations' });
      scratch.push(x);
      return x;
    };
    try {
      const x = e.tensor(this.#gather(ids), [N, d], 'f32', { category: 'activations' });
      scratch.push(x);
      const cuT = e.tensor(cu, [lens.length + 1], 'i32', { category: 'activations' });
      scratch.push(cuT);
      const h = t([N, d]);
      const qkv = t([N, 3, c.heads, c.dKv]);
      const qkv2 = qkv.view([N, 3 * inner]);
      scratch.push(qkv2);
      const att = t([N, c.heads, c.dKv]);
      const att2 = att.view([N, inner]);
      scratch.push(att2);
      const y = t([N, d]);
      const wi = t([N, 2 * c.dFf]);
      const act = t([N, c.dFf]);
      const maxSeqlen = Math.max(...lens);
      for (const blk of this.#blocks) {
        ops.rmsNorm({ x, weight: blk.ln0, y: h, eps: c.eps });
        ops.gemm({ x: h, w: blk.qkv, y: qkv2 });
        ops.segmentAttention({ qkv, cuSeqlens: cuT, relativeBias: this.#bias, out: att, scale: 1, maxSeqlen });
        ops.gemm({ x: att2, w: blk.o, y });
        ops.gatedResidual({ x, y });
        ops.rmsNorm({ x, weight: blk.ln1, y: h, eps: c.eps });
        ops.gemm({ x: h, w: blk.wi, y: wi });
        ops.gatedActivation({ x: wi, out: act, fn: 'gelu_tanh' });
        ops.gemm({ x: act, w: blk.wo, y });
        ops.gatedResidual({ x, y });
      }
      ops.rmsNorm({ x, weight: this.#finalNorm, y: h, eps: c.eps });
      return (await h.read()) as Float32Array;
    } finally {
      for (const s of scratch.reverse()) s.dispose();
    }
  }

  /** The embedding rows of `ids` as f32 [N, d_model]. */
  #gather(ids: Int32Array): Float32Array {
    const d = this.config.dModel;
    const emb = this.#embedding;
    if (!emb) return new Float32Array(ids.length * d);
    const rowBytes = emb.data.byteLength / this.config.vocab;
    const rows = Buffer.allocUnsafe(ids.length * rowBytes);
    for (let i = 0; i < ids.length; i++) emb.data.copy(rows, i * rowBytes, ids[i] * rowBytes, (ids[i] + 1) * rowBytes);
    return Float32Array.from(toHostArray({ dtype: emb.dtype, shape: [ids.length, d], data: rows }, 'f32', 'T5 embedding rows') as Float32Array);
  }

  /** Frees the encoder's device weights and its host embedding. Idempotent. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#embedding = null;
    for (const t of this.#all) t.dispose();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }

  #check(): void {
    if (this.#disposed) fail('ERR_DISPOSED', 'T5TextEncoder was disposed');
  }
}

/**
 * Loads a Hugging Face T5 directory (config.json, the weights in any HF layout, tokenizer.json) as Infinity's text
 * encoder on `engine`: `encode(prompts)` gives the features `generate` takes. Only the encoder half is read.
 */
export async function loadTextEncoder(dir: string, engine: Engine, opts: T5EncoderLoadOptions = {}): Promise<T5TextEncoder> {
  const ckpt = T5Checkpoint.open(dir);
  try {
    const tokenizer = T5Tokenizer.fromFile(ckpt.tokenizerPath);
    if (tokenizer.vocabSize > ckpt.config.vocab)
      fail('ERR_FORMAT', `${dir}: tokenizer.json has ${tokenizer.vocabSize} tokens, more than the model's vocab_size ${ckpt.config.vocab}`);
    return await T5TextEncoder.load(engine, ckpt, tokenizer, opts);
  } finally {
    ckpt.close();
  }
}
