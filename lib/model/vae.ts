/**
 * The BSQ-VAE decoder of Infinity (spec sec. 10; official `bsq_vae/flux_vqgan.py` Decoder with cnn_type '2d',
 * no attention, nearest x2 + 3x3 conv upsampling), built from the engine's latent/VAE ops:
 *
 *   conv_in -> mid.block_1 -> mid.block_2 -> for level L-1 .. 0: (numResBlocks + 1) ResnetBlocks, then the
 *   level's upsample when it has one -> norm_out -> swish -> conv_out
 *
 * ResnetBlock(x) = shortcut(x) + conv2(swish(GN2(conv1(swish(GN1(x)))))), shortcut a 1x1 conv when the channel
 * count changes. GroupNorm uses 32 groups (24 when the channels are not a multiple of 32), eps 1e-6.
 */
import type { Engine, Tensor } from '../engine.js';
import { fail } from '../errors.js';
import { SafetensorsFile } from '../safetensors.js';

export interface VaeDecoderConfig {
  /** Channels of level 0 (`base_ch`): 128 in the official VAEs. */
  baseCh: number;
  /** Per-level channel multipliers (`decoder_ch_mult`), level 0 first: [1, 2, 4, 4, 4] for the 2B VAE. */
  chMult: readonly number[];
  /** `num_res_blocks`; the decoder runs numResBlocks + 1 blocks per level. */
  numResBlocks: number;
  /** Latent channels (`codebook_dim`): 32 (2B) or 14 (8B, before patchify). */
  codebookDim: number;
  /** Spatial up-sampling factor (`patch_size`): levels 1 .. log2(patchSize) upsample. Default 2^(levels - 1). */
  patchSize?: number;
  /** Device dtype of the weights. Default 'f32'. */
  weightDtype?: 'f32' | 'bf16';
  /** Device dtype of the activations and the output image (an f32 latent is rounded to it). Default 'f32'. */
  dtype?: 'f32' | 'bf16';
}

/** A host tensor: the data, and the shape to check it against. */
export interface HostTensor {
  data: Float32Array;
  shape: readonly number[];
}

/**
 * Where the weights come from: a safetensors file, a map from key to tensor, or a function from key to data.
 * Keys may be spelled with or without the module wrapper level (`conv1.conv.weight` or `conv1.weight`).
 */
export type VaeWeightSource = SafetensorsFile | Map<string, HostTensor | Float32Array> | ((name: string) => Float32Array | undefined);

/**
 * The canonical (wrapped) spelling of a decoder key, as the official `vae.load_cnn` accepts both:
 * `...conv1.weight` -> `...conv1.conv.weight`, `...norm1.weight` -> `...norm1.norm.weight`,
 * `...upsample.conv.weight` -> `...upsample.conv.conv.weight`; a leading `vae.` is dropped.
 */
export function normalizeVaeDecoderKey(name: string): string {
  return name
    .replace(/^vae\./, '')
    .replace(/\.(conv_in|conv_out|conv1|conv2|nin_shortcut)\.(weight|bias)$/, '.$1.conv.$2')
    .replace(/\.upsample\.conv\.(weight|bias)$/, '.upsample.conv.conv.$1')
    .replace(/\.(norm1|norm2|norm_out)\.(weight|bias)$/, '.$1.norm.$2');
}

/** The decoder config from a fixture manifest's `vae` entry (snake_case official names). */
export function vaeDecoderConfigFromManifest(vae: Record<string, unknown>): VaeDecoderConfig {
  const chMult = (vae.decoder_ch_mult ?? vae.ch_mult) as number[] | undefined;
  const baseCh = vae.base_ch as number | undefined;
  const numResBlocks = vae.num_res_blocks as number | undefined;
  const codebookDim = vae.codebook_dim as number | undefined;
  if (!Array.isArray(chMult) || !Number.isInteger(baseCh) || !Number.isInteger(numResBlocks) || !Number.isInteger(codebookDim))
    fail('ERR_INVALID_ARG', 'VAE config needs base_ch, decoder_ch_mult (or ch_mult), num_res_blocks and codebook_dim');
  const patchSize = vae.patch_size as number | undefined;
  return { baseCh: baseCh as number, chMult, numResBlocks: numResBlocks as number, codebookDim: codebookDim as number, patchSize };
}

interface Conv {
  weight: Tensor;
  bias: Tensor;
  outChannels: number;
}

interface Norm {
  weight: Tensor;
  bias: Tensor;
  groups: number;
}

interface ResnetBlock {
  norm1: Norm;
  conv1: Conv;
  norm2: Norm;
  conv2: Conv;
  ninShortcut?: Conv;
}

interface Level {
  blocks: ResnetBlock[];
  upsample?: Conv;
}

// The official Normalize: 32 groups, or 24 when the channel count is not a multiple of 32.
function groupsFor(channels: number): number {
  if (channels % 32 === 0) return 32;
  if (channels % 24 === 0) return 24;
  fail('ERR_INVALID_ARG', `VAE GroupNorm: ${channels} channels are a multiple of neither 32 nor 24`);
}

// Host-side lookup by canonical key over any weight source.
function weightReader(source: VaeWeightSource): (name: string, shape: readonly number[]) => Float32Array {
  const check = (name: string, data: Float32Array, shape: readonly number[], found?: readonly number[]) => {
    const numel = shape.reduce((a, b) => a * b, 1);
    if ((found && found.join(',') !== shape.join(',')) || data.length !== numel)
      fail('ERR_SHAPE', `VAE weight ${name}: expected shape [${shape.join(', ')}], got ${found ? `[${found.join(', ')}]` : `${data.length} values`}`);
    return data;
  };
  if (typeof source === 'function') {
    return (name, shape) => {
      const unwrapped = name.replace(/\.(conv|norm)\.(weight|bias)$/, '.$2');
      const data = source(name) ?? source(unwrapped);
      if (!data) fail('ERR_FORMAT', `VAE weight ${name} not found`);
      return check(name, data, shape);
    };
  }
  const index = new Map<string, string>();
  const names = source instanceof SafetensorsFile ? source.names : [...source.keys()];
  for (const n of names) index.set(normalizeVaeDecoderKey(n), n);
  return (name, shape) => {
    const key = index.get(name);
    if (key === undefined) fail('ERR_FORMAT', `VAE weight ${name} not found`);
    if (source instanceof SafetensorsFile) return check(name, source.f32(key), shape, source.entry(key).shape);
    const v = source.get(key) as HostTensor | Float32Array;
    return v instanceof Float32Array ? check(name, v, shape) : check(name, v.data, shape, v.shape);
  };
}

export class VaeDecoder {
  readonly engine: Engine;
  readonly config: Readonly<VaeDecoderConfig>;
  readonly #dtype: 'f32' | 'bf16';
  readonly #convIn: Conv;
  readonly #mid: ResnetBlock[];
  readonly #levels: Level[];
  readonly #normOut: Norm;
  readonly #convOut: Conv;
  readonly #weights: Tensor[];

  private constructor(engine: Engine, config: VaeDecoderConfig, parts: {
    convIn: Conv; mid: ResnetBlock[]; levels: Level[]; normOut: Norm; convOut: Conv; weights: Tensor[];
  }) {
    this.engine = engine;
    this.config = Object.freeze({ ...config, chMult: Object.freeze([...config.chMult]) });
    this.#dtype = config.dtype ?? 'f32';
    this.#convIn = parts.convIn;
    this.#mid = parts.mid;
    this.#levels = parts.levels;
    this.#normOut = parts.normOut;
    this.#convOut = parts.convOut;
    this.#weights = parts.weights;
  }

  /** Uploads the decoder weights (keys `decoder.*`, either spelling) and checks every shape against `config`. */
  static async load(engine: Engine, source: VaeWeightSource, config: VaeDecoderConfig): Promise<VaeDecoder> {
    return VaeDecoder.#create(engine, config, weightReader(source));
  }

  /** The decoder with every weight allocated as `load` would, zero-filled instead of read (see InfinityModel.allocate). */
  static async allocate(engine: Engine, config: VaeDecoderConfig): Promise<VaeDecoder> {
    return VaeDecoder.#create(engine, config, undefined);
  }

  static async #create(engine: Engine, config: VaeDecoderConfig, read: ((name: string, shape: readonly number[]) => Float32Array) | undefined): Promise<VaeDecoder> {
    const { baseCh, chMult, numResBlocks, codebookDim } = config;
    const levels = chMult.length;
    if (levels < 1 || !chMult.every((m) => Number.isInteger(m) && m > 0) || !(baseCh > 0) || !(numResBlocks >= 0) || !(codebookDim > 0))
      fail('ERR_INVALID_ARG', `invalid VAE decoder config ${JSON.stringify(config)}`);
    const patchSize = config.patchSize ?? 2 ** (levels - 1);
    const maxUp = Math.log2(patchSize);
    if (!Number.isInteger(maxUp)) fail('ERR_INVALID_ARG', `VAE patchSize ${patchSize} is not a power of two`);
    const weightDtype = config.weightDtype ?? 'f32';
    const weights: Tensor[] = [];
    const upload = (name: string, shape: number[]) => {
      const t = read
        ? engine.tensor(read(name, shape), shape, weightDtype, { category: 'weights' })
        : engine.empty(shape, weightDtype, { category: 'weights', fillByte: 0 });
      weights.push(t);
      return t;
    };
    const conv = (prefix: string, inCh: number, outCh: number, k: number): Conv => ({
      weight: upload(`${prefix}.conv.weight`, [outCh, inCh, k, k]),
      bias: upload(`${prefix}.conv.bias`, [outCh]),
      outChannels: outCh,
    });
    const norm = (prefix: string, ch: number): Norm => ({
      weight: upload(`${prefix}.norm.weight`, [ch]),
      bias: upload(`${prefix}.norm.bias`, [ch]),
      groups: groupsFor(ch),
    });
    const block = (prefix: string, inCh: number, outCh: number): ResnetBlock => ({
      norm1: norm(`${prefix}.norm1`, inCh),
      conv1: conv(`${prefix}.conv1`, inCh, outCh, 3),
      norm2: norm(`${prefix}.norm2`, outCh),
      conv2: conv(`${prefix}.conv2`, outCh, outCh, 3),
      ninShortcut: inCh !== outCh ? conv(`${prefix}.nin_shortcut`, inCh, outCh, 1) : undefined,
    });
    try {
      let ch = baseCh * chMult[levels - 1];
      const convIn = conv('decoder.conv_in', codebookDim, ch, 3);
      const mid = [block('decoder.mid.block_1', ch, ch), block('decoder.mid.block_2', ch, ch)];
      const levelList: Level[] = new Array(levels);
      for (let l = levels - 1; l >= 0; l--) {
        const out = baseCh * chMult[l];
        const blocks: ResnetBlock[] = [];
        for (let j = 0; j <= numResBlocks; j++) {
          blocks.push(block(`decoder.up.${l}.block.${j}`, ch, out));
          ch = out;
        }
        const upsample = l >= 1 && l <= maxUp ? conv(`decoder.up.${l}.upsample.conv`, ch, ch, 3) : undefined;
        levelList[l] = { blocks, upsample };
      }
      const normOut = norm('decoder.norm_out', ch);
      const convOut = conv('decoder.conv_out', ch, 3, 3);
      await engine.sync();
      return new VaeDecoder(engine, config, { convIn, mid, levels: levelList, normOut, convOut, weights });
    } catch (e) {
      for (const t of weights) t.dispose();
      throw e;
    }
  }

  /**
   * Decodes a latent [B, codebookDim, h, w] (the summed codes, channels-first) into the raw image
   * [B, 3, h*s, w*s] (s = 2^number of upsampling levels), before the clamp: pass it to `ops.imageToU8` for
   * pixels. Queues the work and returns at once; the latent is not modified.
   */
  decode(latent: Tensor): Tensor {
    this.engine.checkOwn(latent, 'latent');
    const { codebookDim } = this.config;
    if (latent.shape.length !== 4 || latent.shape[1] !== codebookDim)
      fail('ERR_SHAPE', `VaeDecoder.decode: latent must be [batch, ${codebookDim}, height, width], got [${latent.shape.join(', ')}]`);
    if (latent.dtype !== this.#dtype && latent.dtype !== 'f32') fail('ERR_DTYPE', `VaeDecoder.decode: latent must be f32 or ${this.#dtype}, got ${latent.dtype}`);
    const input = latent.dtype === this.#dtype ? latent : this.#roundToBf16(latent);
    let h = this.#conv(input, this.#convIn);
    if (input !== latent) input.dispose();
    for (const b of this.#mid) h = this.#resnet(h, b);
    for (let l = this.#levels.length - 1; l >= 0; l--) {
      const level = this.#levels[l];
      for (const b of level.blocks) h = this.#resnet(h, b);
      if (level.upsample) {
        const [B, C, H, W] = h.shape;
        const up = this.#empty([B, C, 2 * H, 2 * W]);
        this.engine.ops.upsampleNearest2x({ input: h, out: up });
        h.dispose();
        h = this.#conv(up, level.upsample);
        up.dispose();
      }
    }
    this.#norm(h, h, this.#normOut);
    const image = this.#conv(h, this.#convOut);
    h.dispose();
    return image;
  }

  /** Frees the weights. */
  dispose(): void {
    for (const t of this.#weights) t.dispose();
  }

  // The summed codes arrive in f32; a bf16 decoder takes them rounded to bf16, as the reference's autocast does at
  // conv_in.
  #roundToBf16(x: Tensor): Tensor {
    const out = this.#empty(x.shape);
    this.engine.ops.cast({ input: x, out });
    return out;
  }

  #empty(shape: readonly number[]): Tensor {
    return this.engine.empty(shape, this.#dtype, { category: 'activations' });
  }

  #conv(x: Tensor, c: Conv): Tensor {
    const [B, , H, W] = x.shape;
    const out = this.#empty([B, c.outChannels, H, W]);
    this.engine.ops.conv2d({ input: x, weight: c.weight, bias: c.bias, out });
    return out;
  }

  // GroupNorm -> swish, which is how the decoder uses every norm.
  #norm(x: Tensor, out: Tensor, n: Norm): void {
    this.engine.ops.groupNorm({ input: x, weight: n.weight, bias: n.bias, out, groups: n.groups, eps: 1e-6, swish: true });
  }

  // Consumes x (disposes it) and returns the block's output.
  #resnet(x: Tensor, b: ResnetBlock): Tensor {
    const t = this.#empty(x.shape);
    this.#norm(x, t, b.norm1);
    const h1 = this.#conv(t, b.conv1);
    t.dispose();
    this.#norm(h1, h1, b.norm2);
    const h2 = this.#conv(h1, b.conv2);
    h1.dispose();
    const shortcut = b.ninShortcut ? this.#conv(x, b.ninShortcut) : x;
    this.engine.ops.add({ a: shortcut, b: h2, out: h2 });
    if (shortcut !== x) shortcut.dispose();
    x.dispose();
    return h2;
  }
}
