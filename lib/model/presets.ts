/**
 * Infinity model configurations (spec sec. 1) and the official state-dict layout (sec. 2.2, 2.3): the key names
 * and shapes a loader checks a checkpoint against, and exact parameter counts.
 */
import { fail } from '../errors.js';
import type { VaeDecoderConfig } from './vae.js';

export interface InfinityConfig {
  name: string;
  depth: number;
  /** C = embed_dim; also the conditioning width D. */
  embedDim: number;
  numHeads: number;
  headDim: number;
  /** FFN hidden width: round(C * mlp_ratio / 256) * 256 (Python round, half to even) for the presets. */
  ffnHidden: number;
  /** Chunks of the state-dict layout `block_chunks.{i // n}.module.{i % n}`. */
  blockChunks: number;
  /** n = depth / blockChunks. */
  blocksPerChunk: number;
  /** Ct5: width of the text features (2048 for flan-t5-xl). */
  textChannels: number;
  /** Rows of `cfg_uncond` (tokenizer max length). */
  textMaxlen: number;
  /** Heads of the text pool (TextAttentivePool): Ct5 / (64 if D > 4096 else 128). */
  poolHeads: number;
  /** Head dim of the pool's cross-attention: D / poolHeads (128 for 2B, 224 for 8B). */
  poolHeadDim: number;
  /** d: bits per transformer token (codebookDim, x4 with patchify). */
  dVae: number;
  /** VAE latent channels. */
  codebookDim: number;
  patchify: boolean;
  /** Head outputs V = 2d (use_bit_label). */
  vocab: number;
  /** Rows of `lvl_embed` (scale embedding table). */
  levels: number;
  normEps: number;
  vae: VaeDecoderConfig;
}

export type PresetName =
  | 'infinity-2b' | 'infinity-8b'
  | 'infinity-layer12' | 'infinity-layer16' | 'infinity-layer24' | 'infinity-layer32' | 'infinity-layer40' | 'infinity-layer48';

/** Python's round() (half to even), as the official FFN width uses. */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export const VAE_2B: Readonly<VaeDecoderConfig> = Object.freeze({ baseCh: 128, chMult: [1, 2, 4, 4, 4], numResBlocks: 2, codebookDim: 32, patchSize: 16 });
export const VAE_8B: Readonly<VaeDecoderConfig> = Object.freeze({ baseCh: 128, chMult: [1, 2, 4, 4], numResBlocks: 2, codebookDim: 14, patchSize: 8 });

export interface ConfigInput {
  name?: string;
  depth: number;
  embedDim: number;
  numHeads: number;
  blockChunks: number;
  /** Default round(C * 4 / 256) * 256. */
  ffnHidden?: number;
  textChannels?: number;
  textMaxlen?: number;
  /** Default 32 (the 2B VAE); 14 with patchify for 8B. */
  codebookDim?: number;
  patchify?: boolean;
  vae?: VaeDecoderConfig;
  levels?: number;
  normEps?: number;
}

/** A full config from the independent hyper-parameters; everything else is derived as the official constructor does. */
export function infinityConfig(c: ConfigInput): InfinityConfig {
  const posInt = (v: unknown) => Number.isSafeInteger(v) && (v as number) > 0;
  for (const k of ['depth', 'embedDim', 'numHeads', 'blockChunks'] as const)
    if (!posInt(c?.[k])) fail('ERR_INVALID_ARG', `infinityConfig: ${k} must be a positive integer, got ${c?.[k]}`);
  const { depth, embedDim, numHeads, blockChunks } = c;
  if (embedDim % numHeads !== 0) fail('ERR_INVALID_ARG', `infinityConfig: embedDim ${embedDim} is not a multiple of numHeads ${numHeads}`);
  if (depth % blockChunks !== 0) fail('ERR_INVALID_ARG', `infinityConfig: depth ${depth} is not a multiple of blockChunks ${blockChunks}`);
  const textChannels = c.textChannels ?? 2048;
  const poolHeadWidth = embedDim > 4096 ? 64 : 128;
  if (textChannels % poolHeadWidth !== 0) fail('ERR_INVALID_ARG', `infinityConfig: textChannels ${textChannels} is not a multiple of ${poolHeadWidth}`);
  const poolHeads = textChannels / poolHeadWidth;
  if (embedDim % poolHeads !== 0) fail('ERR_INVALID_ARG', `infinityConfig: embedDim ${embedDim} is not a multiple of the ${poolHeads} text-pool heads`);
  const patchify = c.patchify ?? false;
  const vae = c.vae ?? (patchify ? VAE_8B : VAE_2B);
  const codebookDim = c.codebookDim ?? vae.codebookDim;
  if (codebookDim !== vae.codebookDim) fail('ERR_INVALID_ARG', `infinityConfig: codebookDim ${codebookDim} differs from the VAE's ${vae.codebookDim}`);
  const dVae = patchify ? 4 * codebookDim : codebookDim;
  return {
    name: c.name ?? 'custom',
    depth,
    embedDim,
    numHeads,
    headDim: embedDim / numHeads,
    ffnHidden: c.ffnHidden ?? roundHalfEven((embedDim * 4) / 256) * 256,
    blockChunks,
    blocksPerChunk: depth / blockChunks,
    textChannels,
    textMaxlen: c.textMaxlen ?? 512,
    poolHeads,
    poolHeadDim: embedDim / poolHeads,
    dVae,
    codebookDim,
    patchify,
    vocab: 2 * dVae,
    levels: c.levels ?? 15,
    normEps: c.normEps ?? 1e-6,
    vae: { ...vae, chMult: [...vae.chMult] },
  };
}

// Spec sec. 1.1 (tools/run_infinity.py::load_transformer).
const PRESET_INPUTS: Readonly<Record<PresetName, ConfigInput>> = {
  'infinity-2b': { depth: 32, embedDim: 2048, numHeads: 16, blockChunks: 8 },
  'infinity-8b': { depth: 40, embedDim: 3584, numHeads: 28, blockChunks: 8, patchify: true },
  'infinity-layer12': { depth: 12, embedDim: 768, numHeads: 8, blockChunks: 4 },
  'infinity-layer16': { depth: 16, embedDim: 1152, numHeads: 12, blockChunks: 4 },
  'infinity-layer24': { depth: 24, embedDim: 1536, numHeads: 16, blockChunks: 4 },
  'infinity-layer32': { depth: 32, embedDim: 2080, numHeads: 20, blockChunks: 4 },
  'infinity-layer40': { depth: 40, embedDim: 2688, numHeads: 24, blockChunks: 4 },
  'infinity-layer48': { depth: 48, embedDim: 3360, numHeads: 28, blockChunks: 4 },
};

export const PRESET_NAMES = Object.keys(PRESET_INPUTS) as PresetName[];

export function preset(name: PresetName): InfinityConfig {
  const input = PRESET_INPUTS[name];
  if (!input) fail('ERR_INVALID_ARG', `unknown preset '${name}' (${PRESET_NAMES.join(', ')})`);
  return infinityConfig({ ...input, name });
}

/** A config from a fixture manifest's `model` entry (official snake_case names, e.g. ../shared/golden/forward_fullcache). */
export function infinityConfigFromManifest(model: Record<string, unknown>, vae?: VaeDecoderConfig): InfinityConfig {
  const num = (k: string) => model[k] as number;
  const cfg = infinityConfig({
    name: 'manifest',
    depth: num('depth'),
    embedDim: num('embed_dim'),
    numHeads: num('num_heads'),
    blockChunks: num('block_chunks') ?? 1,
    ffnHidden: model.ffn_hidden as number | undefined,
    textChannels: model.text_channels as number | undefined,
    textMaxlen: model.text_maxlen as number | undefined,
    patchify: model.apply_spatial_patchify === 1 || model.apply_spatial_patchify === true,
    vae: vae ?? { ...VAE_2B, codebookDim: (model.codebook_dim as number | undefined) ?? 32 },
    normEps: model.norm_eps as number | undefined,
  });
  if (model.head_dim !== undefined && model.head_dim !== cfg.headDim) fail('ERR_INVALID_ARG', `manifest head_dim ${model.head_dim} != embed_dim / num_heads`);
  return cfg;
}

/** Key prefix of block `layer`: `block_chunks.{i // n}.module.{i % n}`. */
export function blockPrefix(config: InfinityConfig, layer: number): string {
  return `block_chunks.${Math.floor(layer / config.blocksPerChunk)}.module.${layer % config.blocksPerChunk}`;
}

/** Persistent buffers of the state dict: counted in the file, not parameters, and may be absent (treat as zeros). */
export function isBufferKey(name: string): boolean {
  return name.endsWith('.zero_k_bias');
}

/** Block suffix -> shape, in state-dict order. */
function blockShapes(c: InfinityConfig): [string, number[]][] {
  const C = c.embedDim;
  const D = c.embedDim;
  return [
    ['ada_gss', [1, 1, 6, C]],
    ['sa.scale_mul_1H11', [1, c.numHeads, 1, 1]],
    ['sa.q_bias', [C]],
    ['sa.v_bias', [C]],
    ['sa.zero_k_bias', [C]],
    ['sa.mat_qkv.weight', [3 * C, C]],
    ['sa.proj.weight', [C, C]],
    ['sa.proj.bias', [C]],
    ['ca.v_bias', [C]],
    ['ca.zero_k_bias', [C]],
    ['ca.mat_q.weight', [C, C]],
    ['ca.mat_q.bias', [C]],
    ['ca.mat_kv.weight', [2 * C, D]],
    ['ca.proj.weight', [C, C]],
    ['ca.proj.bias', [C]],
    ['ffn.fc1.weight', [c.ffnHidden, C]],
    ['ffn.fc1.bias', [c.ffnHidden]],
    ['ffn.fc2.weight', [C, c.ffnHidden]],
    ['ffn.fc2.bias', [C]],
    ['ca_norm.weight', [C]],
    ['ca_norm.bias', [C]],
  ];
}

/**
 * Every state-dict tensor of the transformer, official name -> shape (PyTorch `[out, in]` for Linear), in the order
 * of the official state dict: non-block tensors, then the blocks. Includes the `zero_k_bias` buffers (see isBufferKey).
 */
export function expectedWeightShapes(c: InfinityConfig): Map<string, number[]> {
  const C = c.embedDim;
  const D = c.embedDim;
  const Ct5 = c.textChannels;
  const m = new Map<string, number[]>([
    ['cfg_uncond', [c.textMaxlen, Ct5]],
    ['pos_start', [1, 1, C]],
    ['text_norm.weight', [Ct5]],
    ['text_proj_for_sos.ca.mat_q', [1, c.poolHeads, c.poolHeadDim]],
    ['text_proj_for_sos.ca.v_bias', [D]],
    ['text_proj_for_sos.ca.zero_k_bias', [D]],
    ['text_proj_for_sos.ca.mat_kv.weight', [2 * D, Ct5]],
    ['text_proj_for_sos.ca.proj.weight', [D, D]],
    ['text_proj_for_sos.ca.proj.bias', [D]],
    ['text_proj_for_ca.0.weight', [D, Ct5]],
    ['text_proj_for_ca.0.bias', [D]],
    ['text_proj_for_ca.2.weight', [D, D]],
    ['text_proj_for_ca.2.bias', [D]],
    ['lvl_embed.weight', [c.levels, C]],
    ['word_embed.weight', [C, c.dVae]],
    ['word_embed.bias', [C]],
    ['shared_ada_lin.1.weight', [6 * C, D]],
    ['shared_ada_lin.1.bias', [6 * C]],
    ['head_nm.ada_lin.1.weight', [2 * C, D]],
    ['head_nm.ada_lin.1.bias', [2 * C]],
    ['head.weight', [c.vocab, C]],
    ['head.bias', [c.vocab]],
  ]);
  const blocks = blockShapes(c);
  for (let i = 0; i < c.depth; i++) {
    const p = blockPrefix(c, i);
    for (const [suffix, shape] of blocks) m.set(`${p}.${suffix}`, [...shape]);
  }
  return m;
}

export interface ParameterCount {
  perBlock: number;
  blocks: number;
  nonBlock: number;
  total: number;
}

/** Exact trainable-parameter count (buffers such as zero_k_bias excluded), as `sum(p.numel() for p in model.parameters())`. */
export function parameterCount(c: InfinityConfig): ParameterCount {
  const numel = (s: number[]) => s.reduce((a, b) => a * b, 1);
  const perBlock = blockShapes(c).reduce((n, [k, s]) => n + (isBufferKey(k) ? 0 : numel(s)), 0);
  let nonBlock = 0;
  for (const [k, s] of expectedWeightShapes(c)) if (!k.startsWith('block_chunks.') && !isBufferKey(k)) nonBlock += numel(s);
  const blocks = perBlock * c.depth;
  return { perBlock, blocks, nonBlock, total: blocks + nonBlock };
}

export interface ShapeProblems {
  /** Expected names absent from the checkpoint (buffers excluded: they may be absent). */
  missing: string[];
  /** Names the model does not use (ignored by the official strict=False loader). */
  unexpected: string[];
  /** Present with another shape: name, expected, found. */
  mismatched: { name: string; expected: number[]; found: number[] }[];
}

/** Compares a checkpoint's names and shapes with the config's layout (the official loader's strict=False rules). */
export function checkWeightShapes(
  ckpt: { names: readonly string[]; entry(name: string): { shape: readonly number[] } },
  c: InfinityConfig,
): ShapeProblems {
  const want = expectedWeightShapes(c);
  const have = new Set(ckpt.names);
  const out: ShapeProblems = { missing: [], unexpected: [], mismatched: [] };
  for (const [name, shape] of want) {
    if (!have.has(name)) {
      if (!isBufferKey(name)) out.missing.push(name);
      continue;
    }
    const found = [...ckpt.entry(name).shape];
    if (found.join(',') !== shape.join(',')) out.mismatched.push({ name, expected: shape, found });
  }
  for (const n of ckpt.names) if (!want.has(n)) out.unexpected.push(n);
  return out;
}

/**
 * The VAE decoder's state-dict tensors (wrapped spelling, as the official checkpoints), name -> shape, in state-dict
 * order; with `quantizer` also the int64 `quantizer.lfq.mask` / `quantize.lfq.mask` buffers [codebookDim] that the
 * official VAE files carry.
 */
export function expectedVaeShapes(vae: VaeDecoderConfig, opts: { quantizer?: boolean } = {}): Map<string, number[]> {
  const { baseCh, chMult, numResBlocks, codebookDim } = vae;
  const levels = chMult.length;
  const maxUp = Math.log2(vae.patchSize ?? 2 ** (levels - 1));
  const m = new Map<string, number[]>();
  const conv = (p: string, i: number, o: number, k: number) => {
    m.set(`${p}.conv.weight`, [o, i, k, k]);
    m.set(`${p}.conv.bias`, [o]);
  };
  const norm = (p: string, ch: number) => {
    m.set(`${p}.norm.weight`, [ch]);
    m.set(`${p}.norm.bias`, [ch]);
  };
  const block = (p: string, i: number, o: number) => {
    norm(`${p}.norm1`, i);
    conv(`${p}.conv1`, i, o, 3);
    norm(`${p}.norm2`, o);
    conv(`${p}.conv2`, o, o, 3);
    if (i !== o) conv(`${p}.nin_shortcut`, i, o, 1);
  };
  const top = baseCh * chMult[levels - 1];
  conv('decoder.conv_in', codebookDim, top, 3);
  block('decoder.mid.block_1', top, top);
  block('decoder.mid.block_2', top, top);
  // Channels entering each level (levels run L-1 .. 0), then the modules in ModuleList order (level 0 first).
  const inCh: number[] = new Array(levels);
  let ch = top;
  for (let l = levels - 1; l >= 0; l--) {
    inCh[l] = ch;
    ch = baseCh * chMult[l];
  }
  for (let l = 0; l < levels; l++) {
    const out = baseCh * chMult[l];
    for (let j = 0; j <= numResBlocks; j++) block(`decoder.up.${l}.block.${j}`, j === 0 ? inCh[l] : out, out);
    if (l >= 1 && l <= maxUp) conv(`decoder.up.${l}.upsample.conv`, out, out, 3);
  }
  norm('decoder.norm_out', baseCh * chMult[0]);
  conv('decoder.conv_out', baseCh * chMult[0], 3, 3);
  if (opts.quantizer) {
    m.set('quantizer.lfq.mask', [codebookDim]);
    m.set('quantize.lfq.mask', [codebookDim]);
  }
  return m;
}
