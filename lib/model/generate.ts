/**
 * The Infinity sampling loop (spec sec. 7.1, 8, 9): next-scale prediction with a KV cache, CFG on logits after the
 * temperature, bit sampling (or teacher forcing), BSQ codes, the running code sum at the final latent size and the
 * bilinear next-scale input; then the VAE decode to pixels.
 */
import { createEngine, type Engine, type MemoryStats, type Tensor } from '../engine.js';
import { fail, ScaleKVError } from '../errors.js';
import { CaptureOptions, captureObserver, composeObservers } from './capture.js';
import type { InfinityModel, TextContext, TextFeatures, TextObservation } from './infinity.js';
import { final1MGrid, rope2dPositions, ScaleGrid } from './rope2d.js';
import { FullKvPolicy } from '../kv/baselines.js';
import { KvCache, kvPageTokensFor, kvPoolPages } from '../kv/cache.js';
import { policyHistoryLengths, type KvPolicy, type KvPolicySession } from '../kv/policy.js';
import { VaeDecoder, type VaeDecoderConfig } from './vae.js';
import { planAllocations } from '../memory-plan.js';
import type { DType } from '../dtype.js';
import type { KvFormat } from '../ops.js';

/**
 * Hooks into the sampling loop, for conformance checks and tracing: the loop awaits each hook it has, and runs
 * no hook (and nothing for one) without an observer. A tensor handed to a hook is valid only until the hook's
 * promise settles: read it (or compute from it) there, never write it.
 */
export interface GenerateObserver {
  /** Once, before the text path: B images, `rows` transformer rows (2B with CFG: conditional rows first). */
  onStart?(run: { batch: number; rows: number; schedule: readonly (readonly [number, number])[] }): void | Promise<void>;
  /** The text conditioning (fixture names text/*). */
  onText?(text: TextObservation): void | Promise<void>;
  /** x [rows, n, C]: the input of block 0 at a scale. */
  onScaleInput?(scaleIndex: number, x: Tensor): void | Promise<void>;
  /** x [rows, n, C]: the output of block `layer` at a scale. */
  onLayer?(scaleIndex: number, layer: number, x: Tensor): void | Promise<void>;
  /** [B, n, 2d]: the logits after CFG and temperature, before sampling. */
  onLogits?(scaleIndex: number, logits: Tensor): void | Promise<void>;
  /** [rows, n, d]: the codes scale `scaleIndex` (>= 1) reads, before word_embed (the running sum, resampled). */
  onNextInput?(scaleIndex: number, codes: Tensor): void | Promise<void>;
}

export interface GenerateOptions {
  /** Precomputed T5 features of the B prompts (kv [sum(lens), Ct5], lens). */
  textFeatures?: TextFeatures;
  /** Alias of textFeatures. */
  text?: TextFeatures;
  /**
   * Negative prompts' T5 features (spec sec. 4.2), one per prompt of textFeatures: with CFG the unconditional rows
   * attend to them instead of the learned cfg_uncond. Unused without CFG.
   */
  negativeText?: TextFeatures;
  /** Token grids (h, w) per scale, or the official (1, h, w) triples; scale 0 must be 1 x 1. */
  schedule: readonly ScaleGrid[];
  /** Guidance per scale (a number: every scale). Any value != 1 doubles the rows (cond | uncond). Default 1. */
  cfg?: number | readonly number[];
  /** Temperature per scale. Default 1. */
  tau?: number | readonly number[];
  /** Default 900 and 0.97 (gen_one_img's defaults). */
  topK?: number;
  topP?: number;
  /** Integer in [0, 2^53): keys the counter-based sampler (same bits on every backend). Default 0. */
  seed?: number;
  /** Teacher forcing: the bits [B, h, w, d] of every scale replace the sampled ones (official gt_leak). */
  teacherBits?: readonly (Int32Array | Uint8Array)[];
  /** The RoPE grid (UH, UW); default: the 1M grid of the final scale's aspect ratio. */
  ropeGrid?: readonly [number, number];
  /** KV policy; default FullKvPolicy (keep everything). */
  kvPolicy?: KvPolicy;
  /**
   * How the KV cache stores K and V: the model's dtype (default; 'bf16' or 'f32' must be that dtype), or 8-bit —
   * 'int8' or 'fp8' (e4m3) — with one scale byte per (token, head), about half the bytes of bf16 (lib/kv/quant.ts).
   */
  kvDtype?: KvDtype;
  /** Tokens per page of the KV arena; default `kvPageTokensFor(engine.backend)` (1 on cuda, 16 on cpu). */
  kvPageTokens?: number;
  /**
   * Called once per scale, in order, when the device has finished the scale (an engine marker, not a sync: the
   * loop keeps queuing the next scales meanwhile). Not called once the generation has been aborted or has failed.
   */
  onProgress?(scaleIndex: number, total: number): void;
  /** Aborts between scales and layers (the scales already queued still run on the device). */
  signal?: AbortSignal;
  /** Hooks into the loop (see GenerateObserver). */
  observer?: GenerateObserver;
  /** Shorthand for an observer that reads intermediates back by fixture name into `GenerateResult.captured`. */
  capture?: CaptureOptions;
}

export type KvDtype = 'bf16' | 'f32' | 'int8' | 'fp8';

/** The KV cache format of `kvDtype` for a model of `dtype` (ERR_INVALID_ARG for a float KV dtype other than it). */
export function kvFormatFor(kvDtype: KvDtype | undefined, dtype: DType): KvFormat {
  if (kvDtype === undefined || kvDtype === dtype) return 'plain';
  if (kvDtype === 'int8' || kvDtype === 'fp8') return kvDtype;
  if (kvDtype === 'bf16' || kvDtype === 'f32')
    fail('ERR_INVALID_ARG', `kvDtype '${kvDtype}': a float KV cache has the model's dtype (${dtype}); 'int8' and 'fp8' halve it`);
  return fail('ERR_INVALID_ARG', `kvDtype must be 'bf16', 'f32', 'int8' or 'fp8', got ${String(kvDtype)}`);
}

export interface ScaleTiming {
  scaleIndex: number;
  tokens: number;
  /**
   * Wall time from the start of the scale on the device to its completion, as the loop sees it: from its first op
   * being queued, or the previous scale's completion when that came later, to the marker after its last op.
   */
  ms: number;
}

export interface GenerateResult {
  /** [B, dv, Hf, Wf] f32: the summed codes (VAE latent). Owned by the caller (dispose it). */
  summedCodes: Tensor;
  /** Per scale, [B, h, w, d] {0,1} bits as the transformer saw them (before patchify un-shuffling). */
  bits: Int32Array[];
  /** What `capture` asked for, by fixture name (e.g. 's03/logits', 'hidden/s04_layer2'); empty without it. */
  captured: Map<string, Float32Array>;
  timings: ScaleTiming[];
  totalMs: number;
  /** Engine memory after the loop (peaks included) and the KV cache bytes it held. */
  memory: MemoryStats;
  kvBytes: number;
  /**
   * The KV arena: tokens per page, pages per K/V pool, the most pages held at once and at the end of a scale (what
   * the policy keeps), and the page tables' bytes.
   */
  kvArena: { pageTokens: number; poolPages: number; peakPages: number; boundaryPages: number; tableBytes: number };
}

function perScale(v: number | readonly number[] | undefined, n: number, what: string, dflt: number): number[] {
  const list = v === undefined ? new Array(n).fill(dflt) : typeof v === 'number' ? new Array(n).fill(v) : [...v];
  if (list.length < n) fail('ERR_INVALID_ARG', `${what} has ${list.length} entries for ${n} scales`);
  for (const x of list) if (typeof x !== 'number' || !Number.isFinite(x)) fail('ERR_INVALID_ARG', `${what} entries must be finite numbers`);
  return list.slice(0, n);
}

function aborted(signal?: AbortSignal): void {
  if (signal?.aborted) throw new ScaleKVError('ERR_ABORTED', 'generation aborted', { cause: signal.reason });
}

/** The checked settings of one run. */
function resolveRun(model: InfinityModel, opts: GenerateOptions) {
  const cfgM = model.config;
  const grids = (opts.schedule ?? []).map((s) => (s.length === 3 ? [s[1], s[2]] : [s[0], s[1]]) as [number, number]);
  const S = grids.length;
  if (S < 1) fail('ERR_INVALID_ARG', 'schedule must have at least one scale');
  for (const [h, w] of grids) if (!Number.isSafeInteger(h) || !Number.isSafeInteger(w) || h < 1 || w < 1) fail('ERR_INVALID_ARG', `schedule grid ${h}x${w} is invalid`);
  if (grids[0][0] !== 1 || grids[0][1] !== 1) fail('ERR_INVALID_ARG', 'schedule must start with the 1x1 scale');
  if (S > cfgM.levels) fail('ERR_INVALID_ARG', `schedule has ${S} scales; the model has ${cfgM.levels} level embeddings`);
  const cfgs = perScale(opts.cfg, S, 'cfg', 1);
  const taus = perScale(opts.tau, S, 'tau', 1);
  if (taus.some((t) => t === 0)) fail('ERR_INVALID_ARG', 'tau must not be 0');
  const textFeatures = opts.textFeatures ?? opts.text;
  if (!textFeatures) fail('ERR_INVALID_ARG', 'generate: textFeatures is required');
  const B = textFeatures.lens?.length ?? 0;
  const negativeText = opts.negativeText;
  if (negativeText && negativeText.lens?.length !== B)
    fail('ERR_INVALID_ARG', `negativeText must have one prompt per prompt of textFeatures (${B}), got ${negativeText.lens?.length}`);
  const tokens = grids.map(([h, w]) => h * w);
  const starts: number[] = [];
  tokens.reduce((acc, n) => (starts.push(acc), acc + n), 0);
  const d = cfgM.dVae;
  if (opts.teacherBits) {
    if (opts.teacherBits.length < S) fail('ERR_INVALID_ARG', `teacherBits has ${opts.teacherBits.length} scales, the schedule ${S}`);
    for (let si = 0; si < S; si++)
      if (opts.teacherBits[si].length !== B * tokens[si] * d) fail('ERR_SHAPE', `teacherBits[${si}] must hold B*h*w*d = ${B * tokens[si] * d} bits, got ${opts.teacherBits[si].length}`);
  }
  return {
    grids, S, cfgs, taus, useCfg: cfgs.some((c) => c !== 1), textFeatures, negativeText, B, tokens, starts,
    vaeGrids: grids.map(([h, w]) => (cfgM.patchify ? [2 * h, 2 * w] : [h, w]) as [number, number]),
    rope: rope2dPositions(grids, opts.ropeGrid ?? final1MGrid(grids[S - 1][0] / grids[S - 1][1])),
    topK: opts.topK ?? 900,
    topP: opts.topP ?? 0.97,
    seed: opts.seed ?? 0,
  };
}

/**
 * The codes the next scale reads [rows, n, d]: the running sum [B, dv, H, W] resampled to the next latent grid
 * (`vaeGrid`), as tokens (patchify: 2x2 pixel-unshuffled), the same for the conditional and unconditional rows.
 */
function nextScaleCodes(model: InfinityModel, sum: Tensor, rows: number, vaeGrid: readonly [number, number], scratch: Tensor[]): Tensor {
  const e = model.engine;
  const ops = e.ops;
  const { dVae: d, codebookDim: dv, patchify } = model.config;
  const B = sum.shape[0];
  const [nh, nw] = vaeGrid;
  const n = patchify ? (nh * nw) / 4 : nh * nw;
  const track = (t: Tensor) => (scratch.push(t), t);
  const resized = track(e.empty([B, dv, nh, nw], 'f32'));
  ops.resizeBilinear({ input: sum, out: resized });
  let perImage: Tensor | undefined;
  if (patchify) {
    perImage = track(e.empty([B, n, d], 'f32'));
    ops.pixelUnshuffle2x({ input: resized, out: perImage });
    if (rows === B) return perImage;
  }
  const codes = track(e.empty([rows, n, d], 'f32'));
  for (let r = 0; r < rows; r += B) {
    if (perImage) ops.transpose12({ input: perImage, out: codes, dims: [1, 1, 1, B * n * d], outOffset: r * n * d });
    else ops.transpose12({ input: resized, out: codes, dims: [B, dv, n, 1], outOffset: r * n * d });
  }
  return codes;
}

/**
 * How many scales the loop queues ahead of the device: before queuing scale si it waits (on a marker, not a
 * sync) for scale si - SCALES_AHEAD to finish. The device then always has the next scale queued while the JS
 * thread queues the one after (no drain between scales), and an abort stops the work within two scales rather
 * than after everything the loop could queue.
 */
const SCALES_AHEAD = 2;

/**
 * Runs the whole next-scale loop for B prompts. Returns the summed codes (decode them with `decodeImage`), the bits
 * of every scale, timings and memory; frees everything else, also when it throws (ERR_ABORTED on `signal`).
 */
export async function generate(model: InfinityModel, opts: GenerateOptions): Promise<GenerateResult> {
  if (model.disposed) fail('ERR_DISPOSED', 'InfinityModel was disposed');
  const e: Engine = model.engine;
  const ops = e.ops;
  const cfgM = model.config;
  const C = cfgM.embedDim;
  const run = resolveRun(model, opts);
  const { grids, S, B, tokens, vaeGrids } = run;
  const [Hf, Wf] = vaeGrids[S - 1];
  const policy: KvPolicy = opts.kvPolicy ?? new FullKvPolicy();
  const kvFormat = kvFormatFor(opts.kvDtype, model.dtype);
  const pageTokens = opts.kvPageTokens ?? kvPageTokensFor(e.backend);
  if (!Number.isSafeInteger(pageTokens) || pageTokens < 1) fail('ERR_INVALID_ARG', `kvPageTokens must be a positive integer, got ${String(opts.kvPageTokens)}`);
  const capture = opts.capture ? captureObserver(model, opts.capture) : undefined;
  const observer = composeObservers([opts.observer, capture?.observer]);
  const timings: ScaleTiming[] = [];
  const t0 = performance.now();
  aborted(opts.signal);

  let ctx: TextContext | undefined;
  let cache: KvCache | undefined;
  let x: Tensor | undefined;
  let summed: Tensor | undefined;
  let kv: KvPolicySession | undefined;
  // Every scale's bits stay on the device until the loop ends: nothing inside it waits for the device.
  const bitsOnDevice: Tensor[] = [];
  // Per scale: settles when the device has finished it, after onProgress (rejects only if onProgress throws).
  const scalesDone: Promise<void>[] = [];
  let finished = false;
  let lastDone = t0;
  const markScale = (si: number, n: number, queuedAt: number) => {
    const done = e.marker().then(() => {
      const now = performance.now();
      timings.push({ scaleIndex: si, tokens: n, ms: now - Math.max(queuedAt, lastDone) });
      lastDone = now;
      if (!finished && !opts.signal?.aborted) opts.onProgress?.(si, S);
    });
    scalesDone.push(done);
    done.catch(() => {}); // awaited below; a loop that throws first must not leave it unhandled
  };
  try {
    const rows = run.useCfg ? 2 * B : B;
    if (observer?.onStart) await observer.onStart({ batch: B, rows, schedule: grids });
    ctx = await model.prepareText(run.textFeatures, run.useCfg, observer?.onText?.bind(observer), run.negativeText);
    cache = new KvCache(e, {
      layers: cfgM.depth, rows, heads: cfgM.numHeads, headDim: cfgM.headDim, dtype: model.dtype, kvFormat,
      capacity: Array.from({ length: cfgM.depth }, (_, l) => policy.capacity(l, tokens)),
      pageTokens,
      poolPages: kvPoolPages(policyHistoryLengths(policy, cfgM.depth, tokens), rows, pageTokens),
    });
    kv = policy.begin(cache, { schedule: grids, batch: B });
    summed = e.empty([B, cfgM.codebookDim, Hf, Wf], 'f32', { fillByte: 0 });
    x = ctx.x0;
    ctx.x0 = undefined;
    for (let si = 0; si < S; si++) {
      if (si >= SCALES_AHEAD) await scalesDone[si - SCALES_AHEAD];
      aborted(opts.signal);
      const ts = performance.now();
      const [h, w] = grids[si];
      const n = tokens[si];
      const positions = e.tensor(run.rope.subarray(2 * run.starts[si], 2 * (run.starts[si] + n)), [n, 2], 'i32', { category: 'scratch' });
      const scratch: Tensor[] = [positions];
      try {
        cache.beginScale(n);
        const xs = x as Tensor;
        if (observer?.onScaleInput) await observer.onScaleInput(si, xs);
        const scaleInfo = { index: si, positions, schedule: grids, starts: run.starts };
        for (let layer = 0; layer < cfgM.depth; layer++) {
          aborted(opts.signal);
          await model.block(layer, xs, ctx, cache, scaleInfo, kv);
          if (observer?.onLayer) await observer.onLayer(si, layer, xs);
        }
        // Head, CFG and temperature on logits.
        const all = model.head(xs, ctx);
        scratch.push(all);
        const logits = e.empty([B, n, cfgM.vocab], 'f32');
        scratch.push(logits);
        ops.cfgTau({ logits: all, out: logits, cfg: rows === 2 * B ? run.cfgs[si] : 1, tau: run.taus[si] });
        if (observer?.onLogits) await observer.onLogits(si, logits);
        // Bits: sampled, or forced.
        let bits: Tensor;
        if (opts.teacherBits) {
          const tb = opts.teacherBits[si];
          bits = e.tensor(tb instanceof Int32Array ? tb : Int32Array.from(tb), [B, h, w, cfgM.dVae], 'i32');
        } else {
          bits = e.empty([B, h, w, cfgM.dVae], 'i32');
        }
        bitsOnDevice.push(bits);
        if (!opts.teacherBits) ops.sampleBits({ logits, out: bits, topK: run.topK, topP: run.topP, seed: run.seed, scaleIndex: si });
        let latentBits = bits;
        if (cfgM.patchify) {
          latentBits = e.empty([B, 2 * h, 2 * w, cfgM.codebookDim], 'i32');
          scratch.push(latentBits);
          ops.pixelShuffle2x({ input: bits, out: latentBits });
        }
        const [vh, vw] = vaeGrids[si];
        const codes = e.empty([B, cfgM.codebookDim, vh, vw], 'f32');
        scratch.push(codes);
        ops.bitsToCodes({ bits: latentBits, out: codes });
        const sum = summed as Tensor;
        if (si !== S - 1) {
          ops.resizeBilinear({ input: codes, out: sum, accumulate: true });
          const next = nextScaleCodes(model, sum, rows, vaeGrids[si + 1], scratch);
          if (observer?.onNextInput) await observer.onNextInput(si + 1, next);
          const bias = e.tensor(model.wordEmbedBias(si + 1), [C], 'f32');
          scratch.push(bias);
          xs.dispose();
          x = e.empty([rows, tokens[si + 1], C], 'f32');
          ops.gemm({ x: next, w: model.wordEmbedWeight, bias, y: x });
        } else {
          if (vh !== Hf || vw !== Wf) fail('ERR_INTERNAL', 'last scale is not the final latent size');
          ops.add({ a: sum, b: codes, out: sum });
        }
      } finally {
        cache.endScale();
        for (const s of scratch) s.dispose();
      }
      markScale(si, n, ts);
    }
    for (const done of scalesDone) await done;
    aborted(opts.signal);
    // The reads report (and clear) the first error the queued work raised.
    const bitsOut = (await Promise.all(bitsOnDevice.map((b) => b.read()))) as Int32Array[];
    for (const b of bitsOnDevice.splice(0)) b.dispose();
    aborted(opts.signal);
    const kvBytes = cache.bytes;
    const kvArena = { pageTokens: cache.pageTokens, poolPages: cache.poolPages, peakPages: cache.peakPages, boundaryPages: cache.boundaryPages, tableBytes: cache.tableBytes };
    const result = summed as Tensor;
    summed = undefined;
    const memory = e.memory();
    return { summedCodes: result, bits: bitsOut, captured: capture?.captured ?? new Map(), timings, totalMs: performance.now() - t0, memory, kvBytes, kvArena };
  } finally {
    finished = true;
    for (const b of bitsOnDevice) b.dispose();
    x?.dispose();
    summed?.dispose();
    cache?.dispose();
    ctx?.dispose();
    kv?.end?.();
  }
}

export interface DecodedImage {
  /** [B, H, W, 3] u8 pixels (RGB, or BGR when asked). */
  pixels: Uint8Array;
  /** [B, 3, H, W] clamp(decoder(z), -1, 1), when `float` was asked. */
  float?: Float32Array;
  shape: [number, number, number, number];
}

/** The VAE decode of summed codes to pixels: trunc((clamp(x) + 1) / 2 * 255), RGB by default (BGR = the official order). */
export interface DecodeOptions {
  /** Pixels in BGR order (the official output, for OpenCV). Default false. */
  bgr?: boolean;
  /** Also return the clamped float image. Default false. */
  float?: boolean;
  /**
   * Images decoded at once: the decoder's activations grow with it, its speed hardly does at 1M pixels an image.
   * Default: the whole batch. `vaeBatchWithin` gives the most that fits a memory budget.
   */
  vaeBatch?: number;
}

/**
 * Decodes the summed codes [B, d, h, w] into 8-bit pixels, `vaeBatch` images at a time: every slice is queued before
 * any is read back, and each slice's activations are released as its decode is queued, so only one slice's are live.
 */
export async function decodeImage(vae: VaeDecoder, summedCodes: Tensor, opts: DecodeOptions = {}): Promise<DecodedImage> {
  const e = vae.engine;
  e.checkOwn(summedCodes, 'summedCodes');
  const [B, d, h, w] = summedCodes.shape;
  const step = opts.vaeBatch ?? B;
  if (!Number.isSafeInteger(step) || step < 1) fail('ERR_INVALID_ARG', `vaeBatch must be a positive integer, got ${opts.vaeBatch}`);
  // Per slice: its pixels, and its raw image when the float image is asked for.
  const slices: { u8: Tensor; raw?: Tensor; images: number }[] = [];
  try {
    for (let b0 = 0; b0 < B; b0 += step) {
      const images = Math.min(step, B - b0);
      let latent = summedCodes;
      if (images < B) {
        latent = e.empty([images, d, h, w], summedCodes.dtype, { category: 'activations' });
        e.ops.transpose12({ input: summedCodes, out: latent, dims: [1, 1, 1, images * d * h * w], inOffset: b0 * d * h * w });
      }
      let raw: Tensor;
      try {
        raw = vae.decode(latent);
      } finally {
        if (latent !== summedCodes) latent.dispose();
      }
      // The slice keeps its raw image only for the float output; from then on the finally below releases it.
      let kept = false;
      try {
        const [, , H, W] = raw.shape;
        const u8 = e.empty([images, H, W, 3], 'u8');
        kept = opts.float === true;
        slices.push({ u8, raw: kept ? raw : undefined, images });
        e.ops.imageToU8({ image: raw, out: u8, bgr: opts.bgr ?? false });
      } finally {
        if (!kept) raw.dispose();
      }
    }
    const [, H, W] = slices[0].u8.shape;
    const pixels = new Uint8Array(B * H * W * 3);
    const float = opts.float ? new Float32Array(B * 3 * H * W) : undefined;
    let at = 0;
    for (const slice of slices) {
      pixels.set((await slice.u8.read()) as Uint8Array, at * H * W * 3);
      if (float && slice.raw) float.set((await slice.raw.read()) as Float32Array, at * 3 * H * W);
      at += slice.images;
    }
    if (float) for (let i = 0; i < float.length; i++) float[i] = Math.min(1, Math.max(-1, float[i]));
    return { pixels, float, shape: [B, H, W, 3] };
  } finally {
    for (const slice of slices) {
      slice.u8.dispose();
      slice.raw?.dispose();
    }
  }
}

/**
 * decodeImage with `vaeBatch` images at once, or by default as many as keep the decode under the engine's peak so
 * far (vaeBatchWithin, budget: that peak less what is live now): decoding after sampling never raises the peak.
 * Returns the decode and the images it took at once.
 */
export async function decodeUnderPeak(vae: VaeDecoder, summedCodes: Tensor, vaeBatch?: number): Promise<{ decoded: DecodedImage; vaeBatch: number }> {
  const m = vae.engine.memory();
  const images = vaeBatch ?? (await vaeBatchWithin(vae.config, summedCodes, m.totalPeak - m.totalInUse));
  return { decoded: await decodeImage(vae, summedCodes, { vaeBatch: images }), vaeBatch: images };
}

/**
 * The most images `decodeImage` may decode at once (vaeBatch) while its own allocations stay within `budget` bytes:
 * a dry run of the decode on a counting twin of the decoder, from the whole batch down by halves (at least 1).
 */
export async function vaeBatchWithin(config: VaeDecoderConfig, latent: { shape: readonly number[]; dtype: DType }, budget: number): Promise<number> {
  const e = await createEngine({ backend: 'count' });
  try {
    const vae = await VaeDecoder.allocate(e, config);
    const codes = e.empty(latent.shape, latent.dtype);
    for (let n = latent.shape[0]; ; n = Math.ceil(n / 2)) {
      const plan = await planAllocations(e, async () => void (await decodeImage(vae, codes, { vaeBatch: n })));
      if (plan.livePeak <= budget || n === 1) return n;
    }
  } finally {
    e.dispose();
  }
}
