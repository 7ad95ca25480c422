/**
 * The memory planner (`scalekv plan`): exact device bytes of an Infinity generation by memory category, for a
 * model configuration, batch, scale schedule and KV policy, plus the paper's KV accounting (spec sec. 4.1 / 5.2).
 *
 * Cache layout it plans for (the loop's contract): every layer holds a HISTORY buffer K and V
 * [rows, heads, capacity, headDim] (category 'kv') whose capacity comes from the policy and excludes the current
 * scale; the current scale's K/V live in one scratch buffer shared by all layers, [rows, heads, n_si, headDim]
 * (category 'scratch'), allocated per scale; the last scale's K/V are never appended. rows = 2 × batch with CFG.
 *
 * Exact: weights (what InfinityModel.load and VaeDecoder.load upload), kv (Σ layers capacity × rows × heads × headDim × (K + V bytes)),
 * scratch (the largest scale's current K/V buffer plus that scale's RoPE positions, i32 [n, 2]).
 * Estimated: activations (see activationEstimate).
 */
import { fail } from '../errors.js';
import { expectedVaeShapes, expectedWeightShapes, InfinityConfig, preset, PresetName } from '../model/presets.js';
import type { VaeDecoderConfig } from '../model/vae.js';
import { scaleSchedule } from '../model/schedule.js';

export type KvDtype = 'bf16' | 'f32';

/** What the planner needs of a KV policy (lib/kv policies implement it). */
export interface HistoryCapacityPolicy {
  readonly name?: string;
  /** History tokens layer `layer` can hold (the current scale excluded), for a schedule of these scale sizes. */
  historyCapacity?(layer: number, scaleTokens: readonly number[]): number;
  /** The same, under KvPolicy's name (used when historyCapacity is absent). */
  capacity?(layer: number, scaleTokens: readonly number[]): number;
}

/** Full cache: every scale but the last is kept. */
export const FULL_HISTORY: HistoryCapacityPolicy = {
  name: 'full',
  historyCapacity: (_l, tokens) => tokens.slice(0, -1).reduce((a, b) => a + b, 0),
};

export interface PlanMemoryOptions {
  preset?: PresetName;
  config?: InfinityConfig;
  /** Images per batch. */
  batch: number;
  /** Classifier-free guidance doubles the rows. Default true. */
  cfg?: boolean;
  /** Tokens per scale; default the 1:1 1M schedule. */
  scaleTokens?: readonly number[];
  /** The last scale's grid (h, w) for the VAE estimate; default its square root. */
  finalGrid?: readonly [number, number];
  policy?: HistoryCapacityPolicy;
  /** K and V cache dtype. Default 'bf16'. */
  kvDtype?: KvDtype;
  /** K dtype when it differs from V (the reference keeps K in f32: 'f32' + bf16 V = 6 bytes per channel). */
  kDtype?: KvDtype;
  /** Block Linear weight dtype (the rest is f32, as the loader uploads it). Default 'bf16'. */
  weightDtype?: KvDtype;
  /** Text tokens per prompt for the activation estimate. Default the model's textMaxlen. */
  textTokens?: number;
  /**
   * Mean history tokens per layer that the last scale reads, for the paper accounting (e.g. budgetTokens(0.1) =
   * 650 for a 10 % budget). Default: the mean of the policy's capacities, capped by the full history.
   */
  paperTokensPerLayer?: number;
}

export interface ActivationEstimate {
  /** Bytes live inside one transformer block at the largest scale (see activationEstimate). */
  block: number;
  /** Per-image conditioning held through the loop (AdaLN tables, cross-attention K/V of the text). */
  textContext: number;
  /** The loop state: residual stream, summed codes, head logits and sampled bits at the largest scale. */
  loop: number;
  /** VAE decode: three f32 feature maps at the top decoder level (input, output, residual) + the f32 image. */
  vaeDecode: number;
}

export interface MemoryPlan {
  config: string;
  policy: string;
  batch: number;
  rows: number;
  scaleTokens: number[];
  kDtype: KvDtype;
  vDtype: KvDtype;
  weightDtype: KvDtype;
  /** History tokens per layer. */
  capacities: number[];
  /** weights = transformer (InfinityModel.load) + VAE decoder (VaeDecoder.load). */
  bytes: { weights: number; kv: number; scratch: number; activations: number; total: number };
  weightDetail: { transformer: number; vae: number };
  activationDetail: ActivationEstimate;
  /** Spec sec. 5.2: rows × (largest history) × L × C × (K + V bytes), with this policy's mean history at the last scale. */
  paperAccounting: { bytes: number; mib: number; tokensPerLayer: number };
}

const size = (d: KvDtype) => (d === 'f32' ? 4 : 2);

/** Bytes InfinityModel.load uploads: block Linear weights in `weightDtype`, everything else on the device in f32. */
export function weightBytes(c: InfinityConfig, weightDtype: KvDtype = 'bf16'): number {
  const shapes = expectedWeightShapes(c);
  const numel = (k: string) => (shapes.get(k) as number[]).reduce((a, b) => a * b, 1);
  const C = c.embedDim;
  const wb = size(weightDtype);
  // Non-block device tensors (f32); host-only ones (cfg_uncond, text_norm, pos_start, lvl_embed, ...) are not uploaded.
  let bytes = 4 * (
    numel('text_proj_for_sos.ca.mat_kv.weight') + 2 * C + numel('text_proj_for_sos.ca.proj.weight') + C +
    numel('text_proj_for_ca.0.weight') + numel('text_proj_for_ca.0.bias') + numel('text_proj_for_ca.2.weight') + numel('text_proj_for_ca.2.bias') +
    numel('word_embed.weight') + numel('shared_ada_lin.1.weight') + numel('head_nm.ada_lin.1.weight') + numel('head_nm.ada_lin.1.bias') +
    numel('head.weight') + numel('head.bias'));
  const F = c.ffnHidden;
  const linear = 3 * C * C + C * C + C * C + 2 * C * C + C * C + F * C + C * F;
  // adaBias 6C, q_bias, v_bias, scale_mul H, proj.bias, ca.mat_q.bias, ca K/V bias 2C, ca.proj.bias, ca_norm w+b, fc1.bias F, fc2.bias.
  const small = 6 * C + C + C + c.numHeads + C + C + 2 * C + C + 2 * C + F + C;
  bytes += c.depth * (linear * wb + small * 4);
  return bytes;
}

/** Bytes VaeDecoder.load uploads: every decoder.* tensor in the config's weight dtype (default f32). */
export function vaeWeightBytes(vae: VaeDecoderConfig): number {
  let n = 0;
  for (const [k, shape] of expectedVaeShapes(vae)) if (k.startsWith('decoder.')) n += shape.reduce((a, b) => a * b, 1);
  const dt = (vae as { weightDtype?: string }).weightDtype;
  return n * (dt === 'bf16' ? 2 : 4);
}

/**
 * The activation estimate, in bytes (not measured; the engine's 'activations' counter is the truth):
 * - block: the tensors one CrossAttnBlock holds at once at the largest scale n (all freed at its end):
 *   11 f32 [rows, n, C] (LN outputs, projections, cross-attention q/out and their transposes, FFN out),
 *   the f32 FFN hidden [rows, n, F], and 6 × [rows, n, C] in the compute dtype (qkv = 3, q, attention out and its
 *   transpose);
 * - textContext: per layer the AdaLN table [rows, 6C] f32 and the text K/V [rows·T, 2C] f32 (T text tokens);
 * - loop: residual x [rows, n, C], summed codes [B, dv, h, w], logits [rows, n, V] + [B, n, V], bits [B, n, d] i32;
 * - vaeDecode: 3 × [B, baseCh·chMult[0], 16h, 16w] f32 + the [B, 3, 16h, 16w] f32 image.
 * activations = max(block + textContext + loop, textContext + vaeDecode) (the decode follows the loop).
 */
export function activationEstimate(c: InfinityConfig, batch: number, rows: number, scaleTokens: readonly number[], finalGrid: readonly [number, number], weightDtype: KvDtype, textTokens: number): ActivationEstimate {
  const n = Math.max(...scaleTokens);
  const C = c.embedDim;
  const block = rows * n * (11 * C * 4 + c.ffnHidden * 4 + 6 * C * size(weightDtype));
  const textContext = c.depth * (rows * 6 * C * 4 + rows * textTokens * 2 * C * 4);
  const [h, w] = finalGrid;
  const vh = c.patchify ? 2 * h : h;
  const vw = c.patchify ? 2 * w : w;
  const loop = rows * n * C * 4 + batch * c.codebookDim * vh * vw * 4 + (rows + batch) * n * c.vocab * 4 + batch * n * c.dVae * 4;
  const H = 16 * h;
  const W = 16 * w;
  const vaeDecode = batch * H * W * 4 * (3 * c.vae.baseCh * c.vae.chMult[0] + 3);
  return { block, textContext, loop, vaeDecode };
}

export function planMemory(o: PlanMemoryOptions): MemoryPlan {
  const c = o.config ?? (o.preset ? preset(o.preset) : fail('ERR_INVALID_ARG', 'planMemory needs a preset or a config'));
  if (!Number.isSafeInteger(o.batch) || o.batch < 1) fail('ERR_INVALID_ARG', `batch must be a positive integer, got ${o.batch}`);
  const tokens = [...(o.scaleTokens ?? scaleSchedule({ aspect: 1, pn: '1M' }).tokensPerScale)];
  if (!tokens.length) fail('ERR_INVALID_ARG', 'planMemory: empty schedule');
  const last = tokens[tokens.length - 1];
  const side = Math.round(Math.sqrt(last));
  const finalGrid = o.finalGrid ?? ([side, side] as const);
  const policy = o.policy ?? FULL_HISTORY;
  const vDtype = o.kvDtype ?? 'bf16';
  const kDtype = o.kDtype ?? vDtype;
  const weightDtype = o.weightDtype ?? 'bf16';
  const rows = (o.cfg ?? true) ? 2 * o.batch : o.batch;
  const perToken = rows * c.numHeads * c.headDim * (size(kDtype) + size(vDtype));
  const capOf = (l: number) =>
    policy.historyCapacity ? policy.historyCapacity(l, tokens) : policy.capacity ? policy.capacity(l, tokens) : fail('ERR_INVALID_ARG', 'planMemory: the policy has no historyCapacity');
  const capacities = Array.from({ length: c.depth }, (_, l) => capOf(l));
  for (const cap of capacities) if (!Number.isSafeInteger(cap) || cap < 0) fail('ERR_INVALID_ARG', `policy ${policy.name ?? ''}: history capacity ${cap} is not a non-negative integer`);
  const kv = capacities.reduce((a, b) => a + b, 0) * perToken;
  const nMax = Math.max(...tokens);
  const scratch = nMax * perToken + nMax * 2 * 4;
  const transformerWeights = weightBytes(c, weightDtype);
  const vaeWeights = vaeWeightBytes(c.vae);
  const weights = transformerWeights + vaeWeights;
  const act = activationEstimate(c, o.batch, rows, tokens, finalGrid, weightDtype, o.textTokens ?? c.textMaxlen);
  const activations = Math.max(act.block + act.textContext + act.loop, act.textContext + act.vaeDecode);
  // The paper's figure: the history read by the last scale, every layer at the policy's mean capacity.
  const fullHistory = tokens.slice(0, -1).reduce((a, b) => a + b, 0);
  const tokensPerLayer = o.paperTokensPerLayer ?? Math.min(fullHistory, capacities.reduce((a, b) => a + b, 0) / c.depth);
  const paperBytes = rows * tokensPerLayer * c.depth * c.embedDim * (size(kDtype) + size(vDtype));
  return {
    config: c.name,
    policy: policy.name ?? 'custom',
    batch: o.batch,
    rows,
    scaleTokens: tokens,
    kDtype,
    vDtype,
    weightDtype,
    capacities,
    bytes: { weights, kv, scratch, activations, total: weights + kv + scratch + activations },
    weightDetail: { transformer: transformerWeights, vae: vaeWeights },
    activationDetail: act,
    paperAccounting: { bytes: paperBytes, mib: paperBytes / 2 ** 20, tokensPerLayer },
  };
}

/** The largest batch whose planned total fits in `deviceBytes` (0 if even batch 1 does not). */
export function largestBatch(o: Omit<PlanMemoryOptions, 'batch'>, deviceBytes: number): number {
  if (!(deviceBytes > 0)) fail('ERR_INVALID_ARG', `device memory must be positive, got ${deviceBytes}`);
  const fits = (b: number) => planMemory({ ...o, batch: b }).bytes.total <= deviceBytes;
  if (!fits(1)) return 0;
  let lo = 1;
  let hi = 2;
  while (fits(hi)) {
    lo = hi;
    hi *= 2;
    if (hi > 1 << 20) return lo;
  }
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (fits(mid)) lo = mid;
    else hi = mid;
  }
  return lo;
}

/** Parses '80GiB', '80GB', '81920MiB', '1e9' (bytes). */
export function parseBytes(s: string): number {
  const m = /^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB)?\s*$/i.exec(s);
  if (!m) fail('ERR_INVALID_ARG', `cannot parse a memory size from '${s}' (e.g. 80GiB, 24GB, 81920MiB)`);
  const units: Record<string, number> = { b: 1, kb: 1e3, kib: 2 ** 10, mb: 1e6, mib: 2 ** 20, gb: 1e9, gib: 2 ** 30, tb: 1e12, tib: 2 ** 40 };
  return Math.floor(Number(m[1]) * units[(m[2] ?? 'b').toLowerCase()]);
}
