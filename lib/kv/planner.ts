/**
 * The memory planner (`scalekv plan`): the device bytes of an Infinity generation by memory category, for a model
 * configuration, batch, schedule and KV policy, plus the paper's KV accounting (spec sec. 4.1 / 5.2).
 *
 * The figures are not a formula: the planner loads the model and the VAE decoder with `allocate` on the 'count'
 * backend and runs `generate` and `decodeImage` on it, so every tensor the real run allocates is allocated in the
 * same order with the same size and category, and the engine's own counters give the peaks. Only the compute is
 * missing, and no allocation depends on a computed value. The peaks are therefore exactly those of a real engine
 * (test/planner.test.ts compares them with the CPU engine's counters), for any policy, schedule or text length.
 * The T5 text encoder is counted the way the Pipeline runs it: loaded after the model, run on the batch's prompts and
 * freed before sampling, or kept loaded throughout.
 */
import { createEngine, MemoryCategory } from '../engine.js';
import { fail } from '../errors.js';
import { decodeUnderPeak, generate, kvFormatFor, type KvDtype } from '../model/generate.js';
import { InfinityModel } from '../model/infinity.js';
import { InfinityConfig, preset, PresetName } from '../model/presets.js';
import { scaleSchedule } from '../model/schedule.js';
import { VaeDecoder } from '../model/vae.js';
import { FLAN_T5_XL, T5Config } from '../text/t5-checkpoint.js';
import { planAllocations, plannedTextLength, type StaticMemoryPlan } from '../memory-plan.js';
import { T5TextEncoder } from '../text/t5-encoder.js';
import { FullKvPolicy } from './baselines.js';
import type { KvPolicy } from './policy.js';

export type PlanDtype = 'bf16' | 'f32';

export interface PlanMemoryOptions {
  preset?: PresetName;
  config?: InfinityConfig;
  /** Images per batch. */
  batch: number;
  /** Classifier-free guidance doubles the rows. Default true. */
  cfg?: boolean;
  /** Token grids (h, w) per scale; default the model's 1:1 1M schedule. */
  schedule?: readonly (readonly [number, number])[];
  /** Default: the full cache. */
  policy?: KvPolicy;
  /** The model dtype: block Linear weights and the K/V cache (the rest is f32, as the loader uploads it). Default 'bf16'. */
  dtype?: PlanDtype;
  /** K/V storage (GenerateOptions.kvDtype): the model dtype, or 'int8' / 'fp8' with a scale byte per (token, head). */
  kvDtype?: KvDtype;
  /** Tokens per page of the KV arena (GenerateOptions.kvPageTokens); default the GPU's, 1. */
  kvPageTokens?: number;
  /** Include the VAE decoder: its weights stay resident and the batch is decoded after the loop. Default true. */
  decode?: boolean;
  /** Images decoded at once (decodeImage's vaeBatch). Default: the most whose decode stays under the sampling peak. */
  vaeBatch?: number;
  /** Text tokens per prompt. Default the model's textMaxlen (the most a prompt can take). */
  textTokens?: number;
  /**
   * The T5 text encoder run on the engine before sampling: its configuration, or false when features are
   * precomputed elsewhere. Default flan-t5-xl when its width is the model's text_channels, else none.
   */
  textEncoder?: T5Config | false;
  /** The encoder stays loaded through sampling (a server keeps it) instead of being freed after encoding. Default false. */
  keepTextEncoder?: boolean;
  /** Every prompt has a negative prompt, encoded in the same T5 pass. Default false. */
  negativePrompts?: boolean;
  /** Plan the generation's memory statically (MemoryPlan.staticPlan), as the Pipeline does. Default true. */
  staticPlan?: boolean;
  /** K and V dtypes of the paper accounting line (the reference keeps K in f32). Default the model dtype. */
  paperKDtype?: PlanDtype;
  paperVDtype?: PlanDtype;
  /**
   * History tokens per layer that the last scale reads, for the paper accounting (e.g. budgetTokens(0.1) = 650
   * for a 10 % budget). Default: the mean of the policy's capacities.
   */
  paperTokensPerLayer?: number;
}

export interface MemoryPlan {
  config: string;
  policy: string;
  batch: number;
  rows: number;
  scaleTokens: number[];
  dtype: PlanDtype;
  /** K/V storage: the model dtype, or 'int8' / 'fp8' (with a scale byte per (token, head), counted in bytes.kv). */
  kvDtype: KvDtype;
  textTokens: number;
  decode: boolean;
  /** Images the VAE decodes at once (0 without decode): as asked, or the most that leave the peak where sampling put it. */
  vaeBatch: number;
  /** History tokens per layer (the current scale excluded). */
  capacities: number[];
  /**
   * Peak live bytes per category, and `total`: the peak of their sum. The total is below the sum of the category
   * peaks because they peak at different times (the KV cache is freed before the VAE decode).
   */
  bytes: Record<MemoryCategory, number> & { total: number };
  /**
   * The KV arena (lib/kv/cache.ts): tokens per page, pages per K/V pool (all of them used at the peak), page-table
   * bytes, and what it holds at the end of a scale at most (`boundaryPages` per pool; `boundaryBytes` with K, V,
   * their scales and the page tables: what the policy keeps between scales, where the peak adds the layers changing
   * roles inside a scale).
   */
  kvArena: { pageTokens: number; poolPages: number; tableBytes: number; boundaryPages: number; boundaryBytes: number };
  /** The engine's caching allocator at its fullest (live tensors + cached blocks, in 512-byte blocks), without a plan. */
  reservedPeak: number;
  /**
   * The static memory plan of the generation and decode (lib/memory-plan.ts), as the Pipeline runs them (absent
   * with `staticPlan: false`): its arena, the most bytes live at once in the run it was traced from (the arena's
   * lower bound), how many allocations it places, the engine's reserved peak under it (the weights, and the arena
   * once the cache is trimmed before it), and the prompt length it was made for (plannedTextLength).
   */
  staticPlan?: { arenaBytes: number; livePeak: number; allocations: number; reservedPeak: number; textTokens: number };
  /** Transformer, VAE decoder and T5 encoder weights separately (textEncoder 0 when not counted). */
  weightDetail: { transformer: number; vae: number; textEncoder: number };
  /** The T5 encoder counted: its width and depth, and whether it stays loaded; undefined when none. */
  textEncoder?: { dModel: number; layers: number; kept: boolean; dtype: PlanDtype };
  /** Spec sec. 5.2: rows × tokens per layer × L × C × (K + V bytes). */
  paperAccounting: { bytes: number; mib: number; tokensPerLayer: number; kDtype: PlanDtype; vDtype: PlanDtype };
}

const size = (d: PlanDtype) => (d === 'f32' ? 4 : 2);

/** The paper's KV figure (spec sec. 5.2): rows × history tokens per layer × L × C × (K + V bytes per channel). */
export function paperKvBytes(c: InfinityConfig, rows: number, tokensPerLayer: number, kDtype: PlanDtype, vDtype: PlanDtype): number {
  return rows * tokensPerLayer * c.depth * c.embedDim * (size(kDtype) + size(vDtype));
}

/**
 * One generation (and decode) on a fresh counting engine, as the Pipeline runs it: its counters and the weight
 * totals. The generation and decode run under `plan` when given, else they are traced and packed into a plan.
 */
async function dryRun(o: PlanMemoryOptions, c: InfinityConfig, grids: [number, number][], policy: KvPolicy, dtype: PlanDtype, textTokens: number, decode: boolean, t5: T5Config | undefined, plan?: StaticMemoryPlan, planTextTokens = textTokens) {
  const e = await createEngine({ backend: 'count' });
  let encoder: T5TextEncoder | undefined;
  try {
    const model = await InfinityModel.allocate(e, c, { dtype });
    const transformer = e.memory().inUse.weights;
    const vae = decode ? await VaeDecoder.allocate(e, { ...c.vae, weightDtype: dtype, dtype }) : undefined;  // as the Pipeline loads it
    const vaeBytes = e.memory().inUse.weights - transformer;
    let textEncoder = 0;
    if (t5) {
      // The encoder's Linears in the model dtype, as the Pipeline loads it when given one.
      encoder = await T5TextEncoder.allocate(e, t5, { dtype });
      textEncoder = encoder.weightBytes;
      // One prompt per image (an upper bound when images share a prompt), with its negative prompt when asked.
      const prompts = o.batch * (o.negativePrompts ? 2 : 1);
      await encoder.encodeIds(new Int32Array(prompts * textTokens), new Array<number>(prompts).fill(textTokens));
      if (!o.keepTextEncoder) encoder.dispose();
    }
    // Traced for a plan, the generation sees prompts of the plan's length (as the Pipeline plans them).
    const tokens = plan ? textTokens : planTextTokens;
    // Every prompt (and negative prompt) distinct: the engine stores each distinct text once, and the plan must hold
    // as many as a batch can bring.
    const distinctText = (first: number) => {
      const kv = new Float32Array(o.batch * tokens * c.textChannels);
      for (let b = 0; b < o.batch; b++) kv[b * tokens * c.textChannels] = first + b;
      return { kv, lens: new Array<number>(o.batch).fill(tokens) };
    };
    const text = distinctText(1);
    const negativeText = o.negativePrompts ? distinctText(1 + o.batch) : undefined;
    let kvArena: MemoryPlan['kvArena'] | undefined;
    let vaeBatch = 0;
    const work = async () => {
      const r = await generate(model, { textFeatures: text, negativeText, schedule: grids, cfg: (o.cfg ?? true) ? 3 : 1, kvPolicy: policy, kvDtype: o.kvDtype, kvPageTokens: o.kvPageTokens });
      if (vae) vaeBatch = (await decodeUnderPeak(vae, r.summedCodes, o.vaeBatch)).vaeBatch;
      r.summedCodes.dispose();
      const { pageTokens, poolPages, tableBytes, boundaryPages } = r.kvArena;
      const pageBytes = poolPages > 0 ? (r.kvBytes / poolPages) : 0; // K and V (and their scales) of one page
      kvArena = { pageTokens, poolPages, tableBytes, boundaryPages, boundaryBytes: boundaryPages * pageBytes + tableBytes };
    };
    let staticPlan = plan;
    if (plan) {
      const placed = (await e.withMemoryPlan(plan, work)).plan;
      if (placed.diverged || placed.placed !== plan.sizes.length) fail('ERR_INTERNAL', `planner: the generation left its own static memory plan (${placed.placed} of ${plan.sizes.length} placed)`);
    } else {
      staticPlan = await planAllocations(e, work);
    }
    return { memory: e.memory(), transformer, vaeBytes, textEncoder, kvArena: kvArena as MemoryPlan['kvArena'], staticPlan: staticPlan as StaticMemoryPlan, vaeBatch };
  } finally {
    encoder?.dispose();
    e.dispose();
  }
}

export async function planMemory(o: PlanMemoryOptions): Promise<MemoryPlan> {
  const c = o.config ?? (o.preset ? preset(o.preset) : fail('ERR_INVALID_ARG', 'planMemory needs a preset or a config'));
  if (!Number.isSafeInteger(o.batch) || o.batch < 1) fail('ERR_INVALID_ARG', `batch must be a positive integer, got ${o.batch}`);
  const grids = (o.schedule ?? scaleSchedule({ aspect: 1, pn: '1M', patchify: c.patchify }).scales).map(([h, w]) => [h, w] as [number, number]);
  if (!grids.length) fail('ERR_INVALID_ARG', 'planMemory: empty schedule');
  const tokens = grids.map(([h, w]) => h * w);
  const policy = o.policy ?? new FullKvPolicy();
  const dtype = o.dtype ?? 'bf16';
  if (dtype !== 'bf16' && dtype !== 'f32') fail('ERR_DTYPE', `planMemory: dtype must be bf16 or f32, got ${dtype}`);
  kvFormatFor(o.kvDtype, dtype);
  const textTokens = o.textTokens ?? c.textMaxlen;
  if (!Number.isSafeInteger(textTokens) || textTokens < 1 || textTokens > c.textMaxlen) fail('ERR_INVALID_ARG', `text tokens must be in [1, ${c.textMaxlen}], got ${textTokens}`);
  const decode = o.decode ?? true;
  const t5 = o.textEncoder === false ? undefined : o.textEncoder ?? (c.textChannels === FLAN_T5_XL.dModel ? FLAN_T5_XL : undefined);
  if (t5 && t5.dModel !== c.textChannels) fail('ERR_INVALID_ARG', `planMemory: the T5 width ${t5.dModel} is not the model's text_channels ${c.textChannels}`);
  const rows = (o.cfg ?? true) ? 2 * o.batch : o.batch;
  const capacities = Array.from({ length: c.depth }, (_, l) => policy.capacity(l, tokens));
  // The generation alone (the counters of the caching allocator); then, unless asked not to, traced with the prompt
  // lengths a plan is made for, and run again under that plan, as the Pipeline runs it.
  const { memory, transformer, vaeBytes, textEncoder, kvArena, staticPlan: exactPlan, vaeBatch } = await dryRun(o, c, grids, policy, dtype, textTokens, decode, t5);
  let staticPlan: MemoryPlan['staticPlan'];
  if (o.staticPlan ?? true) {
    const traced = plannedTextLength(textTokens, c.textMaxlen);
    const plan = traced === textTokens ? exactPlan : (await dryRun(o, c, grids, policy, dtype, textTokens, decode, t5, undefined, traced)).staticPlan;
    const planned = await dryRun(o, c, grids, policy, dtype, textTokens, decode, t5, plan);
    staticPlan = { arenaBytes: plan.total, livePeak: plan.livePeak, allocations: plan.sizes.length, reservedPeak: planned.memory.reservedPeak, textTokens: traced };
  }
  const kDtype = o.paperKDtype ?? dtype;
  const vDtype = o.paperVDtype ?? dtype;
  const fullHistory = tokens.slice(0, -1).reduce((a, b) => a + b, 0);
  const tokensPerLayer = o.paperTokensPerLayer ?? Math.min(fullHistory, capacities.reduce((a, b) => a + b, 0) / c.depth);
  const paperBytes = paperKvBytes(c, rows, tokensPerLayer, kDtype, vDtype);
  return {
    config: c.name,
    policy: policy.name,
    batch: o.batch,
    rows,
    scaleTokens: tokens,
    dtype,
    kvDtype: o.kvDtype ?? dtype,
    textTokens,
    decode,
    vaeBatch,
    capacities,
    bytes: { ...memory.peak, total: memory.totalPeak },
    kvArena,
    reservedPeak: memory.reservedPeak,
    staticPlan,
    weightDetail: { transformer, vae: vaeBytes, textEncoder },
    textEncoder: t5 && { dModel: t5.dModel, layers: t5.layers, kept: o.keepTextEncoder ?? false, dtype },
    paperAccounting: { bytes: paperBytes, mib: paperBytes / 2 ** 20, tokensPerLayer, kDtype, vDtype },
  };
}

/** The largest batch whose peak live bytes fit in `deviceBytes` (0 if even batch 1 does not). */
export async function largestBatch(o: Omit<PlanMemoryOptions, 'batch'>, deviceBytes: number): Promise<number> {
  if (!(deviceBytes > 0)) fail('ERR_INVALID_ARG', `device memory must be positive, got ${deviceBytes}`);
  const fits = async (b: number) => (await planMemory({ ...o, batch: b, staticPlan: false })).bytes.total <= deviceBytes;
  if (!(await fits(1))) return 0;
  let lo = 1;
  let hi = 2;
  while (await fits(hi)) {
    lo = hi;
    hi *= 2;
    if (hi > 1 << 16) return lo;
  }
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (await fits(mid)) lo = mid;
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
