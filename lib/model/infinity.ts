/**
 * The Infinity transformer (spec sec. 4.2, 5, 7): weights, text conditioning, the CrossAttnBlock forward with a KV
 * cache, and the AdaLN head, composed from the engine's ops. The sampling loop is in generate.ts.
 *
 * Precision: with dtype 'f32' everything is f32. With 'bf16' the block Linear weights and the self-attention KV
 * cache (and the attention q / output) are bf16, and so are the Linear inputs a GEMM would round to bf16 anyway
 * (the norms' outputs, the FFN hidden); the residual stream, norm statistics, AdaLN vectors, cross-attention, the
 * non-block layers and the head stay f32 (spec sec. 5.1: the reference keeps non-block parameters and the head in
 * f32). GEMMs accumulate in f32 on every backend.
 */
import type { DType } from '../dtype.js';
import type { Engine, Tensor } from '../engine.js';
import { fail } from '../errors.js';
import { toHostArray } from '../checkpoint/load.js';
import type { TensorData } from '../checkpoint/index.js';
import { blockPrefix, expectedWeightShapes, InfinityConfig, isBufferKey } from './presets.js';
import type { KvCache } from '../kv/cache.js';
import { appendUnlessLast, type AfterAttentionContext, type KvPolicySession, type KvStep } from '../kv/policy.js';

/** Where weights come from: a Checkpoint satisfies it. `entry` (optional) lets shapes be checked before any read. */
export interface WeightSource {
  readonly names: readonly string[];
  read(name: string): Promise<TensorData>;
  entry?(name: string): { shape: readonly number[] };
}

export interface InfinityLoadOptions {
  /**
   * Device dtype of the block Linear weights (and of the KV cache the loop allocates). Default: 'bf16' on CUDA
   * (tensor-core GEMMs, half the memory), 'f32' elsewhere (the CPU and emulator paths are exact in f32).
   */
  dtype?: 'f32' | 'bf16';
}

/** Precomputed T5 features of B prompts: kv [N, Ct5] row-major (prompts concatenated), lens[b] tokens each. */
export interface TextFeatures {
  kv: Float32Array;
  lens: readonly number[];
}

interface BlockWeights {
  /** shared_ada_lin.1.bias + ada_gss of this block [6C] f32: cond6 + ada_gss comes out of one GEMM. */
  adaBias: Tensor;
  qkvW: Tensor;
  qBias: Tensor;
  vBias: Tensor;
  scaleMul: Tensor;
  projW: Tensor;
  projB: Tensor;
  caQW: Tensor;
  caQB: Tensor;
  caKvW: Tensor;
  /** [0 (zero_k_bias), v_bias] [2C] f32. */
  caKvB: Tensor;
  caProjW: Tensor;
  caProjB: Tensor;
  caNormW: Tensor;
  caNormB: Tensor;
  fc1W: Tensor;
  fc1B: Tensor;
  fc2W: Tensor;
  fc2B: Tensor;
}

/** Host copies of small tensors used to build per-image inputs and folded biases. */
interface HostWeights {
  cfgUncond: Float32Array;
  textNorm: Float32Array;
  poolQ: Float32Array;
  posStart: Float32Array;
  lvlEmbed: Float32Array;
  wordEmbedBias: Float32Array;
  poolProjBias: Float32Array;
  sharedBias: Float32Array;
}

/**
 * Per-image conditioning (spec sec. 4.2), computed once and shared by every scale: the AdaLN tables of every block,
 * the head's AdaLN vectors, and every block's cross-attention K/V of the text.
 */
export class TextContext {
  /** Images B and transformer rows bs (2B with CFG, conditional rows first). */
  readonly batch: number;
  readonly rows: number;
  /** [bs + 1] prefix sums of the text tokens of each transformer row (their lengths). */
  readonly cuSeqlens: Int32Array;
  readonly cuTensor: Tensor;
  /** [bs] int32: where each row's text starts in the stored text (rows with the same text share it). */
  readonly kvStarts: Tensor;
  /** [bs, 1, D] pooled text (sos = cond_BD). */
  readonly cond: Tensor;
  /** [bs, 6, C] per block: ada_gss + shared_ada_lin(SiLU(cond)), slots gamma1, gamma2, scale1, scale2, shift1, shift2. */
  readonly ada: Tensor[];
  /** [bs, 2, C]: head AdaLN scale, shift. */
  readonly headAda: Tensor;
  /** [Ntext, 2, H, c] per block: the cross-attention K/V of the projected text. */
  readonly textKv: Tensor[];
  /** [bs, 1, C]: the scale-0 input sos + pos_start + lvl_embed[0]. Taken (set to undefined) by the loop. */
  x0?: Tensor;
  #disposed = false;

  constructor(p: { batch: number; rows: number; cuSeqlens: Int32Array; cuTensor: Tensor; kvStarts: Tensor; cond: Tensor; ada: Tensor[]; headAda: Tensor; textKv: Tensor[]; x0: Tensor }) {
    this.batch = p.batch;
    this.rows = p.rows;
    this.cuSeqlens = p.cuSeqlens;
    this.cuTensor = p.cuTensor;
    this.kvStarts = p.kvStarts;
    this.cond = p.cond;
    this.ada = p.ada;
    this.headAda = p.headAda;
    this.textKv = p.textKv;
    this.x0 = p.x0;
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const t of [this.cuTensor, this.kvStarts, this.cond, this.headAda, ...this.ada, ...this.textKv, this.x0]) t?.dispose();
  }
}

/**
 * Intermediates of the text path, shown to an observer of `prepareText` (conformance checks: fixture names
 * text/*). The tensors are valid only until the observer's promise settles.
 */
export interface TextObservation {
  /** [Ntext, Ct5] the RMS-normed T5 features of the stored text (each distinct text once; see rowStarts). */
  normedKv: Float32Array;
  /** [bs, 1, C] the pooled text after its projection (cond_BD, the sos token). */
  cond: Tensor;
  /** [Ntext, C] text_proj_for_ca of the normed features: the memory every block's cross-attention projects. */
  projectedText: Tensor;
  /** Per transformer row (conditional rows, then the unconditional ones with CFG): its text in the stored text. */
  rowStarts: Int32Array;
  rowLens: Int32Array;
}

/** Rows of the stored text, gathered back into the per-row layout [sum(rowLens), width] (conformance checks). */
export function expandTextRows(stored: Float32Array, width: number, rowStarts: Int32Array, rowLens: Int32Array): Float32Array {
  const out = new Float32Array(rowLens.reduce((a, b) => a + b, 0) * width);
  let at = 0;
  for (let r = 0; r < rowStarts.length; r++) {
    out.set(stored.subarray(rowStarts[r] * width, (rowStarts[r] + rowLens[r]) * width), at * width);
    at += rowLens[r];
  }
  return out;
}

/** Two texts are the same when every value is (Object.is: the bits decide, NaN equals NaN, -0 is not 0). */
export function sameText(a: Float32Array, b: Float32Array): boolean {
  return a.length === b.length && a.every((x, i) => Object.is(x, b[i]));
}

/**
 * The text the rows of one generation read, each distinct text stored once. `add` stores a row's text, or finds it
 * among the texts already stored (same length, same values); `place` points a row at a stored range.
 */
class TextRows {
  readonly #width: number;
  readonly #blocks: Float32Array[] = [];
  #tokens = 0;
  readonly #starts: Int32Array;
  readonly #lens: Int32Array;

  constructor(width: number, rows: number) {
    this.#width = width;
    this.#starts = new Int32Array(rows);
    this.#lens = new Int32Array(rows);
  }

  /** Row `row` reads `data` ([len, width]); returns where it is stored. */
  add(row: number, data: Float32Array): number {
    let start = 0;
    for (const block of this.#blocks) {
      if (sameText(block, data)) return this.place(row, start, data.length / this.#width);
      start += block.length / this.#width;
    }
    this.#blocks.push(data);
    start = this.#tokens;
    this.#tokens += data.length / this.#width;
    return this.place(row, start, data.length / this.#width);
  }

  place(row: number, start: number, len: number): number {
    this.#starts[row] = start;
    this.#lens[row] = len;
    return start;
  }

  build(): { raw: Float32Array; starts: Int32Array; rowLens: Int32Array } {
    const raw = new Float32Array(this.#tokens * this.#width);
    let at = 0;
    for (const block of this.#blocks) {
      raw.set(block, at);
      at += block.length;
    }
    return { raw, starts: this.#starts, rowLens: this.#lens };
  }
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** Collects tensors created during a computation; frees them all on failure or at the end. */
class Scope {
  readonly list: Tensor[] = [];
  track<T extends Tensor>(t: T): T {
    this.list.push(t);
    return t;
  }
  dispose(): void {
    for (const t of this.list) t.dispose();
    this.list.length = 0;
  }
}

export class InfinityModel {
  readonly engine: Engine;
  readonly config: Readonly<InfinityConfig>;
  /** Dtype of the block Linear weights and of the KV cache. */
  readonly dtype: 'f32' | 'bf16';
  readonly #host: HostWeights;
  readonly #dev: Record<string, Tensor>;
  readonly #blocks: BlockWeights[];
  readonly #all: Tensor[];
  #disposed = false;

  private constructor(engine: Engine, config: InfinityConfig, dtype: 'f32' | 'bf16', host: HostWeights, dev: Record<string, Tensor>, blocks: BlockWeights[], all: Tensor[]) {
    this.engine = engine;
    this.config = Object.freeze({ ...config });
    this.dtype = dtype;
    this.#host = host;
    this.#dev = dev;
    this.#blocks = blocks;
    this.#all = all;
  }

  /**
   * Streams the transformer weights to the device one tensor at a time (category 'weights'), checking every shape
   * against `config` (ERR_SHAPE naming the key) and that every needed key exists (ERR_FORMAT). Official key names;
   * block i at `block_chunks.{i // n}.module.{i % n}`; unknown keys are ignored; a missing `zero_k_bias` is zeros.
   */
  static async load(engine: Engine, source: WeightSource, config: InfinityConfig, opts: InfinityLoadOptions = {}): Promise<InfinityModel> {
    return InfinityModel.#create(engine, source, config, opts, true);
  }

  /**
   * The model with every weight allocated as `load` would, zero-filled instead of read: what the memory planner
   * runs on the 'count' backend, and a way to time real shapes without a checkpoint.
   */
  static async allocate(engine: Engine, config: InfinityConfig, opts: InfinityLoadOptions = {}): Promise<InfinityModel> {
    const shapes = expectedWeightShapes(config);
    // Only the small host-side tensors are read, as zeros.
    const zeros: WeightSource = {
      names: [...shapes.keys()],
      entry: (name) => ({ shape: shapes.get(name) as number[] }),
      read: async (name) => {
        const shape = shapes.get(name) as number[];
        return { dtype: 'f32', shape, data: Buffer.alloc(4 * shape.reduce((a, b) => a * b, 1)) };
      },
    };
    return InfinityModel.#create(engine, zeros, config, opts, false);
  }

  // `readDevice` false: device weights are allocated zero-filled, not read from the source.
  static async #create(engine: Engine, source: WeightSource, config: InfinityConfig, opts: InfinityLoadOptions, readDevice: boolean): Promise<InfinityModel> {
    const dtype = opts.dtype ?? (engine.backend === 'cuda' ? 'bf16' : 'f32');
    if (dtype !== 'f32' && dtype !== 'bf16') fail('ERR_DTYPE', `InfinityModel.load: dtype must be 'f32' or 'bf16', got ${dtype}`);
    const c = config;
    const C = c.embedDim;
    const shapes = expectedWeightShapes(c);
    const have = new Set(source.names);
    // Fail before any upload when the source can tell shapes without reading data.
    for (const [name, shape] of shapes) {
      if (!have.has(name)) {
        if (isBufferKey(name)) continue;
        fail('ERR_FORMAT', `Infinity weights: missing tensor ${name}`);
      }
      if (source.entry) {
        const found = source.entry(name).shape;
        if (!sameShape(found, shape)) fail('ERR_SHAPE', `Infinity weight ${name}: expected shape [${shape.join(', ')}], got [${found.join(', ')}]`);
      }
    }
    const all: Tensor[] = [];
    const readChecked = async (name: string): Promise<TensorData> => {
      const t = await source.read(name);
      const shape = shapes.get(name) as number[];
      if (!sameShape(t.shape, shape)) fail('ERR_SHAPE', `Infinity weight ${name}: expected shape [${shape.join(', ')}], got [${t.shape.join(', ')}]`);
      return t;
    };
    const hostF32 = async (name: string): Promise<Float32Array> => Float32Array.from(toHostArray(await readChecked(name), 'f32', `weight ${name}`) as Float32Array);
    const zerosOr = async (name: string): Promise<Float32Array> => {
      const n = (shapes.get(name) as number[]).reduce((a, b) => a * b, 1);
      if (!have.has(name)) return new Float32Array(n);
      const z = await hostF32(name);
      if (z.some((v) => v !== 0)) fail('ERR_FORMAT', `Infinity weight ${name}: a nonzero K bias is not supported (it is a zero buffer in every official model)`);
      return z;
    };
    const put = (data: Float32Array, shape: readonly number[], dt: DType = 'f32'): Tensor => {
      const t = engine.tensor(data, shape, dt, { category: 'weights' });
      all.push(t);
      return t;
    };
    const upload = async (name: string, dt: DType = 'f32', shape?: readonly number[]): Promise<Tensor> => {
      let out: Tensor;
      if (readDevice) {
        const t = await readChecked(name);
        const host = toHostArray(t, dt === 'bf16' ? 'bf16' : 'f32', `weight ${name}`);
        out = engine.tensor(host, shape ?? t.shape, dt, { category: 'weights' });
      } else {
        out = engine.empty(shape ?? (shapes.get(name) as number[]), dt, { category: 'weights', fillByte: 0 });
      }
      all.push(out);
      return out;
    };
    const cat = (a: Float32Array, b: Float32Array) => {
      const o = new Float32Array(a.length + b.length);
      o.set(a);
      o.set(b, a.length);
      return o;
    };
    try {
      const host: HostWeights = {
        cfgUncond: await hostF32('cfg_uncond'),
        textNorm: await hostF32('text_norm.weight'),
        poolQ: await hostF32('text_proj_for_sos.ca.mat_q'),
        posStart: await hostF32('pos_start'),
        lvlEmbed: await hostF32('lvl_embed.weight'),
        wordEmbedBias: await hostF32('word_embed.bias'),
        poolProjBias: await hostF32('text_proj_for_sos.ca.proj.bias'),
        sharedBias: await hostF32('shared_ada_lin.1.bias'),
      };
      const dev: Record<string, Tensor> = {
        poolKvW: await upload('text_proj_for_sos.ca.mat_kv.weight'),
        poolKvB: put(cat(await zerosOr('text_proj_for_sos.ca.zero_k_bias'), await hostF32('text_proj_for_sos.ca.v_bias')), [2 * C]),
        poolProjW: await upload('text_proj_for_sos.ca.proj.weight'),
        poolProjB: put(host.poolProjBias, [C]),
        ca0W: await upload('text_proj_for_ca.0.weight'),
        ca0B: await upload('text_proj_for_ca.0.bias'),
        ca2W: await upload('text_proj_for_ca.2.weight'),
        ca2B: await upload('text_proj_for_ca.2.bias'),
        wordEmbedW: await upload('word_embed.weight'),
        sharedW: await upload('shared_ada_lin.1.weight'),
        headNmW: await upload('head_nm.ada_lin.1.weight'),
        headNmB: await upload('head_nm.ada_lin.1.bias'),
        headW: await upload('head.weight'),
        headB: await upload('head.bias'),
      };
      const sharedBias = host.sharedBias;
      const blocks: BlockWeights[] = [];
      for (let i = 0; i < c.depth; i++) {
        const p = `${blockPrefix(c, i)}.`;
        const gss = await hostF32(`${p}ada_gss`);
        const adaBias = new Float32Array(6 * C);
        for (let j = 0; j < 6 * C; j++) adaBias[j] = sharedBias[j] + gss[j];
        await zerosOr(`${p}sa.zero_k_bias`); // checked: qkNormRope adds no K bias
        blocks.push({
          adaBias: put(adaBias, [6 * C]),
          qkvW: await upload(`${p}sa.mat_qkv.weight`, dtype),
          qBias: await upload(`${p}sa.q_bias`),
          vBias: await upload(`${p}sa.v_bias`),
          scaleMul: await upload(`${p}sa.scale_mul_1H11`, 'f32', [c.numHeads]),
          projW: await upload(`${p}sa.proj.weight`, dtype),
          projB: await upload(`${p}sa.proj.bias`),
          caQW: await upload(`${p}ca.mat_q.weight`, dtype),
          caQB: await upload(`${p}ca.mat_q.bias`),
          caKvW: await upload(`${p}ca.mat_kv.weight`, dtype),
          caKvB: put(cat(await zerosOr(`${p}ca.zero_k_bias`), await hostF32(`${p}ca.v_bias`)), [2 * C]),
          caProjW: await upload(`${p}ca.proj.weight`, dtype),
          caProjB: await upload(`${p}ca.proj.bias`),
          caNormW: await upload(`${p}ca_norm.weight`),
          caNormB: await upload(`${p}ca_norm.bias`),
          fc1W: await upload(`${p}ffn.fc1.weight`, dtype),
          fc1B: await upload(`${p}ffn.fc1.bias`),
          fc2W: await upload(`${p}ffn.fc2.weight`, dtype),
          fc2B: await upload(`${p}ffn.fc2.bias`),
        });
      }
      await engine.sync();
      return new InfinityModel(engine, c, dtype, host, dev, blocks, all);
    } catch (e) {
      for (const t of all) t.dispose();
      throw e;
    }
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Frees every weight. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const t of this.#all) t.dispose();
  }

  #check(): void {
    if (this.#disposed) fail('ERR_DISPOSED', 'InfinityModel was disposed');
  }

  /** Host copy of lvl_embed row `si` plus word_embed.bias: the folded bias of the word embedding at scale si. */
  wordEmbedBias(si: number, withLevel = true): Float32Array {
    const C = this.config.embedDim;
    if (si >= this.config.levels) fail('ERR_INVALID_ARG', `scale ${si} has no level embedding (the model has ${this.config.levels})`);
    const b = Float32Array.from(this.#host.wordEmbedBias);
    if (withLevel) for (let j = 0; j < C; j++) b[j] += this.#host.lvlEmbed[si * C + j];
    return b;
  }

  /** word_embed weight [C, d] (f32). */
  get wordEmbedWeight(): Tensor {
    return this.#dev.wordEmbedW;
  }

  /**
   * The per-image conditioning (spec sec. 4.2) from precomputed T5 features. With `cfg` the rows are doubled:
   * conditional rows first, then per prompt its negative prompt's features when `negative` is given (one per
   * prompt, its own length), else `cfg_uncond[:len]`. The text RMSNorm runs on the host in f32:
   * its input arrives from the host anyway (T5 runs outside the engine), it is computed once per image on
   * [2N, Ct5] values (negligible work), and it needs no extra native op on three backends.
   */
  async prepareText(text: TextFeatures, cfg: boolean, onText?: (text: TextObservation) => void | Promise<void>, negative?: TextFeatures): Promise<TextContext> {
    this.#check();
    const c = this.config;
    const e = this.engine;
    const ops = e.ops;
    const C = c.embedDim;
    const Ct5 = c.textChannels;
    const H = c.numHeads;
    const hd = c.headDim;
    const checked = (t: TextFeatures, what: string) => {
      const lens = [...(t?.lens ?? [])];
      if (lens.length < 1) fail('ERR_INVALID_ARG', `${what}: lens must name at least one prompt`);
      for (const l of lens) if (!Number.isSafeInteger(l) || l < 1 || l > c.textMaxlen) fail('ERR_INVALID_ARG', `${what}: prompt length ${l} outside [1, ${c.textMaxlen}]`);
      const n = lens.reduce((a, b) => a + b, 0);
      if (!(t.kv instanceof Float32Array) || t.kv.length !== n * Ct5)
        fail('ERR_SHAPE', `${what}: kv must be a Float32Array of ${n} x ${Ct5} values (sum(lens) x text_channels), got ${t.kv?.length}`);
      return { lens };
    };
    const { lens } = checked(text, 'text features');
    const B = lens.length;
    const neg = cfg && negative ? checked(negative, 'negative text features') : undefined;
    if (neg && neg.lens.length !== B) fail('ERR_INVALID_ARG', `negative text features: ${neg.lens.length} prompts for ${B}`);
    const rows = cfg ? 2 * B : B;
    // The text every row reads, stored once: rows with the same prompt share its tokens, and without negative prompts
    // every unconditional row reads a prefix of one copy of cfg_uncond. Text is per-token up to the cross-attention
    // K/V (the norm and projections), so a shared prefix is exactly each row's own text.
    const stored = new TextRows(Ct5, rows);
    const offsets = (ls: readonly number[]) => ls.reduce<number[]>((acc, l) => (acc.push(acc[acc.length - 1] + l), acc), [0]);
    const at = offsets(lens);
    for (let b = 0; b < B; b++) stored.add(b, text.kv.subarray(at[b] * Ct5, at[b + 1] * Ct5));
    // Unconditional rows: each negative prompt at its own length, else cfg_uncond[:len_b] (the prompt's length).
    if (cfg && neg && negative) {
      const nat = offsets(neg.lens);
      for (let b = 0; b < B; b++) stored.add(B + b, negative.kv.subarray(nat[b] * Ct5, nat[b + 1] * Ct5));
    } else if (cfg) {
      const longest = Math.max(...lens);
      const start = stored.add(B, this.#host.cfgUncond.subarray(0, longest * Ct5));
      for (let b = 0; b < B; b++) stored.place(B + b, start, lens[b]);
    }
    const { raw, starts, rowLens } = stored.build();
    const nText = raw.length / Ct5;
    const cu = new Int32Array(rows + 1);
    for (let r = 0; r < rows; r++) cu[r + 1] = cu[r] + rowLens[r];
    // RMSNorm (text_norm, eps norm_eps): x * rsqrt(mean(x^2) + eps) * w, f32 values, mean accumulated in f64.
    const normed = new Float32Array(raw.length);
    const w = this.#host.textNorm;
    const eps = c.normEps;
    for (let r = 0; r < nText; r++) {
      let ss = 0;
      for (let j = 0; j < Ct5; j++) ss += raw[r * Ct5 + j] * raw[r * Ct5 + j];
      const inv = Math.fround(1 / Math.sqrt(Math.fround(Math.fround(ss / Ct5) + eps)));
      for (let j = 0; j < Ct5; j++) normed[r * Ct5 + j] = Math.fround(Math.fround(raw[r * Ct5 + j] * inv) * w[j]);
    }
    const scope = new Scope();
    const t = <T extends Tensor>(x: T) => scope.track(x);
    const keep: Tensor[] = [];
    const k = <T extends Tensor>(x: T) => {
      keep.push(x);
      return x;
    };
    try {
      const kvT = t(e.tensor(normed, [nText, Ct5], 'f32', { category: 'activations' }));
      const cuTensor = k(e.tensor(cu, [rows + 1], 'i32', { category: 'activations' }));
      const kvStarts = k(e.tensor(starts, [rows], 'i32', { category: 'activations' }));
      // Text attentive pool: one learned query per row over its own text segment.
      const ph = c.poolHeads;
      const phd = c.poolHeadDim;
      const poolKv = t(e.empty([nText, 2, ph, phd], 'f32'));
      ops.gemm({ x: kvT, w: this.#dev.poolKvW, bias: this.#dev.poolKvB, y: t(poolKv.view([nText, 2 * C])) });
      const qHost = new Float32Array(rows * C);
      for (let r = 0; r < rows; r++) qHost.set(this.#host.poolQ, r * C);
      const poolQ = t(e.tensor(qHost, [rows, 1, ph, phd], 'f32'));
      const pooled4 = t(e.empty([rows, 1, ph, phd], 'f32'));
      ops.crossAttention({ q: poolQ, kv: poolKv, cuSeqlens: cuTensor, kvStarts, out: pooled4, scale: 1 / Math.sqrt(phd) });
      const pooled = t(pooled4.view([rows, 1, C]));
      const cond = k(e.empty([rows, 1, C], 'f32'));
      ops.gemm({ x: pooled, w: this.#dev.poolProjW, bias: this.#dev.poolProjB, y: cond });
      // Scale-0 input: sos + pos_start + lvl_embed[0] (the two vectors folded into the projection's bias).
      const x0Bias = Float32Array.from(this.#host.poolProjBias);
      for (let j = 0; j < C; j++) x0Bias[j] += this.#host.posStart[j] + this.#host.lvlEmbed[j];
      const x0BiasT = t(e.tensor(x0Bias, [C], 'f32'));
      const x0 = k(e.empty([rows, 1, C], 'f32'));
      ops.gemm({ x: pooled, w: this.#dev.poolProjW, bias: x0BiasT, y: x0 });
      // AdaLN: SiLU(cond) -> shared_ada_lin (+ ada_gss, folded per block) -> [bs, 6, C] tables; head_nm likewise.
      const siluCond = t(e.empty([rows, 1, C], 'f32'));
      ops.silu(cond, siluCond);
      const ada: Tensor[] = [];
      for (const blk of this.#blocks) {
        const table = k(e.empty([rows, 6, C], 'f32'));
        ops.gemm({ x: siluCond, w: this.#dev.sharedW, bias: blk.adaBias, y: t(table.view([rows, 1, 6 * C])) });
        ada.push(table);
      }
      const headAda = k(e.empty([rows, 2, C], 'f32'));
      ops.gemm({ x: siluCond, w: this.#dev.headNmW, bias: this.#dev.headNmB, y: t(headAda.view([rows, 1, 2 * C])) });
      // Cross-attention memory: text_proj_for_ca (Linear -> GELU(tanh) -> Linear), then every block's K/V once.
      const h1 = t(e.empty([nText, C], 'f32'));
      ops.gemm({ x: kvT, w: this.#dev.ca0W, bias: this.#dev.ca0B, y: h1, epilogue: 'gelu_tanh' });
      const textKv = t(e.empty([nText, C], 'f32'));
      ops.gemm({ x: h1, w: this.#dev.ca2W, bias: this.#dev.ca2B, y: textKv });
      const blockKv: Tensor[] = [];
      for (const blk of this.#blocks) {
        const kv4 = k(e.empty([nText, 2, H, hd], 'f32'));
        ops.gemm({ x: textKv, w: blk.caKvW, bias: blk.caKvB, y: t(kv4.view([nText, 2 * C])) });
        blockKv.push(kv4);
      }
      if (onText) await onText({ normedKv: normed, cond, projectedText: textKv, rowStarts: starts, rowLens });
      return new TextContext({ batch: B, rows, cuSeqlens: cu, cuTensor, kvStarts, cond, ada, headAda, textKv: blockKv, x0 });
    } catch (err) {
      for (const x of keep) x.dispose();
      throw err;
    } finally {
      scope.dispose();
    }
  }

  /**
   * One CrossAttnBlock (spec sec. 5) on x [bs, n, C] f32, updated in place. The KV policy session places this
   * scale's K/V (straight after the layer's history, or in the scale's scratch); attention runs over
   * [history ‖ current] (no mask); then the session decides what of a scratch placement stays (default: append all,
   * except at the last scale).
   */
  async block(layer: number, x: Tensor, ctx: TextContext, cache: KvCache, scale: { index: number; positions: Tensor; schedule: readonly (readonly [number, number])[]; starts: readonly number[] }, kv?: KvPolicySession): Promise<void> {
    const c = this.config;
    const e = this.engine;
    const ops = e.ops;
    const blk = this.#blocks[layer];
    const [bs, n, C] = x.shape;
    const H = c.numHeads;
    const hd = c.headDim;
    const ada = ctx.ada[layer];
    const dt = this.dtype;
    const scope = new Scope();
    const t = <T extends Tensor>(v: T) => scope.track(v);
    try {
      // The inputs of the block Linears (h, hn, h2, f1) are only ever read by their GEMM, which rounds f32 x to bf16
      // against bf16 weights (autocast's Linear): in bf16 mode they are stored as bf16 outright — the same bits
      // (both round to nearest even), half the bytes written and read, and the GEMM takes its bf16 x path.
      // Each intermediate is released right after the op that reads it last is queued (the queue runs in order, so
      // the next allocation may reuse it at once): at the FFN only x, h2 and f1 are live, not the whole block. The
      // Linears that end a branch (proj, caProj, fc2) add into x in their epilogue (gemmResidual): their f32 output
      // is never a tensor.
      const drop = (...xs: Tensor[]) => xs.forEach((v) => v.dispose());
      // Self-attention branch.
      const h = t(e.empty([bs, n, C], dt));
      ops.layerNorm({ x, y: h, eps: c.normEps, scale: { table: ada, slot: 2 }, shift: { table: ada, slot: 4 } });
      const qkv = t(e.empty([bs, n, 3 * C], dt));
      ops.gemm({ x: h, w: blk.qkvW, y: qkv });
      drop(h);
      const q = t(e.empty([bs, H, n, hd], dt));
      if (cache.scaleTokens !== n) fail('ERR_INTERNAL', `the KV cache is at a scale of ${cache.scaleTokens} tokens, the block at ${n}`);
      const step: KvStep = { layer, scaleIndex: scale.index, tokens: n, lastScale: scale.index === scale.schedule.length - 1 };
      const historyLength = cache.len(layer);
      const placement = kv ? kv.placement(step) : appendUnlessLast(step);
      const dst = cache.place(layer, placement);
      ops.qkNormRope({
        qkv, qBias: blk.qBias, vBias: blk.vBias, scaleMul: blk.scaleMul, normalize: true, positions: scale.positions,
        q, k: dst.k, v: dst.v, kvOffset: dst.offset, pageTable: dst.pageTable, kvFormat: cache.kvFormat, scales: dst.scales,
      });
      const o = t(e.empty([bs, H, n, hd], dt));
      ops.attention({ q, ...cache.attentionOperands(layer), out: o, scale: 1 });
      if (kv?.afterAttention) {
        const hook: AfterAttentionContext = {
          ...step, engine: e, cache, placement, historyLength, schedule: scale.schedule, scaleStarts: scale.starts, qkv, q,
        };
        await kv.afterAttention(hook);
      }
      drop(qkv, q);
      // Heads-major to tokens-major; with one token (scale 0) or one head the layouts coincide.
      let oTok: Tensor;
      if (n === 1 || H === 1) oTok = t(o.view([bs, n, C]));
      else {
        oTok = t(e.empty([bs, n, C], dt));
        ops.transpose12({ input: o, out: oTok, dims: [bs, H, n, hd] });
      }
      drop(o);
      ops.gemmResidual({ x: oTok, w: blk.projW, bias: blk.projB, y: x, gate: { table: ada, slot: 0 } });
      drop(oTok);
      // Cross-attention branch (no gate).
      const hn = t(e.empty([bs, n, C], dt));
      ops.layerNorm({ x, y: hn, eps: c.normEps, weight: blk.caNormW, bias: blk.caNormB });
      const cq = t(e.empty([bs, n, H, hd], 'f32'));
      const cqTok = t(cq.view([bs, n, C]));
      ops.gemm({ x: hn, w: blk.caQW, bias: blk.caQB, y: cqTok });
      drop(hn, cqTok);
      const co = t(e.empty([bs, n, H, hd], 'f32'));
      ops.crossAttention({ q: cq, kv: ctx.textKv[layer], cuSeqlens: ctx.cuTensor, kvStarts: ctx.kvStarts, out: co, scale: 1 / Math.sqrt(hd) });
      drop(cq);
      const coTok = t(co.view([bs, n, C]));
      ops.gemmResidual({ x: coTok, w: blk.caProjW, bias: blk.caProjB, y: x });
      drop(co, coTok);
      // FFN branch.
      const h2 = t(e.empty([bs, n, C], dt));
      ops.layerNorm({ x, y: h2, eps: c.normEps, scale: { table: ada, slot: 3 }, shift: { table: ada, slot: 5 } });
      const f1 = t(e.empty([bs, n, c.ffnHidden], dt));
      ops.gemm({ x: h2, w: blk.fc1W, bias: blk.fc1B, y: f1, epilogue: 'gelu_tanh' });
      drop(h2);
      ops.gemmResidual({ x: f1, w: blk.fc2W, bias: blk.fc2B, y: x, gate: { table: ada, slot: 1 } });
      drop(f1);
    } finally {
      scope.dispose();
    }
  }

  /**
   * shared_ada_lin(cond) [bs, 1, 6C] without any block's ada_gss: the official `cond_BD_or_gss` before the blocks
   * add their own table. Not on the sampling path (the blocks' tables fold ada_gss into the bias); for checks.
   */
  sharedAdaLin(cond: Tensor): Tensor {
    this.#check();
    const e = this.engine;
    const [bs, , C] = cond.shape;
    const scope = new Scope();
    try {
      const silu = scope.track(e.empty([bs, 1, C], 'f32'));
      e.ops.silu(cond, silu);
      const bias = scope.track(e.tensor(this.#host.sharedBias, [6 * C], 'f32'));
      const out = e.empty([bs, 1, 6 * C], 'f32');
      try {
        e.ops.gemm({ x: silu, w: this.#dev.sharedW, bias, y: out });
      } catch (err) {
        out.dispose();
        throw err;
      }
      return out;
    } finally {
      scope.dispose();
    }
  }

  /** The head (spec sec. 7.1): AdaLN-modulated LayerNorm then Linear, f32: x [bs, n, C] -> logits [bs, n, V]. */
  head(x: Tensor, ctx: TextContext): Tensor {
    const e = this.engine;
    const [bs, n, C] = x.shape;
    const hn = e.empty([bs, n, C], 'f32');
    try {
      e.ops.layerNorm({ x, y: hn, eps: this.config.normEps, scale: { table: ctx.headAda, slot: 0 }, shift: { table: ctx.headAda, slot: 1 } });
      const logits = e.empty([bs, n, this.config.vocab], 'f32');
      e.ops.gemm({ x: hn, w: this.#dev.headW, bias: this.#dev.headB, y: logits });
      return logits;
    } finally {
      hn.dispose();
    }
  }
}
