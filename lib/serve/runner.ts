/**
 * Runs a batch of image requests on a Pipeline: every request's prompt once per image it asks for, one generation,
 * the images handed back per request as PNG bytes.
 */
import { randomInt } from 'node:crypto';
import type { Pipeline } from '../pipeline.js';
import { Batcher, type BatchInfo } from './batcher.js';
import type { BatchContext } from './batcher.js';
import type { JobResult } from './jobs.js';
import type { ServerMetrics } from './metrics.js';
import { largestBatch } from '../kv/planner.js';
import type { InfinityConfig } from '../model/presets.js';
import { scaleSchedule } from '../model/schedule.js';
import { batchKey, pixelBudgetsFor, type ImageRequest } from './request.js';

export interface BatchReport {
  images: number;
  perScaleMs: number[];
  kvBytes: number;
}

export type BatchRunner = (requests: ImageRequest[], ctx: BatchContext) => Promise<JobResult[]>;

/** `onReport` sees each finished batch's timings and KV bytes (the metrics). PNGs come back base64, as the API sends them. */
export function pipelineRunner(pipeline: Pipeline, onReport?: (r: BatchReport) => void): BatchRunner {
  return async (requests, ctx) => {
    const first = requests[0];
    const rows = requests.flatMap((r) => new Array<ImageRequest>(r.n).fill(r));
    // Requests without a seed share one drawn for the batch (batchKey keeps a seeded request alone).
    const seed = first.seed ?? randomInt(2 ** 31);
    const r = await pipeline.generate({
      prompts: rows.map((x) => x.prompt),
      negativePrompts: first.negativePrompt === undefined ? undefined : rows.map((x) => x.negativePrompt as string),
      seed,
      cfg: first.cfg,
      tau: first.tau,
      aspect: first.aspect,
      pn: first.pn,
      kv: first.kvPolicy,
      kvDtype: first.kvDtype,
      png: true,
      signal: ctx.signal,
      onProgress: ctx.onProgress,
    });
    onReport?.({ images: rows.length, perScaleMs: r.timings.perScaleMs, kvBytes: r.kvBytes });
    let at = 0;
    return requests.map((q) => {
      const images = r.images.slice(at, (at += q.n));
      return { images: images.map((i) => (i.png as Buffer).toString('base64')), width: images[0].width, height: images[0].height, seed };
    });
  };
}

export interface BatchingOptions {
  maxBatch: number;
  windowMs: number;
  maxQueue: number;
}

/** The batcher of a process that runs a model (`serve` without Redis, and `worker`), feeding the metrics given. */
export function imageBatcher(pipeline: Pipeline, o: BatchingOptions, metrics?: ServerMetrics): Batcher<ImageRequest, JobResult> {
  return new Batcher<ImageRequest, JobResult>({
    ...o,
    keyOf: batchKey,
    sizeOf: (r) => r.n,
    run: pipelineRunner(pipeline, (r) => {
      metrics?.kvBytes.set(r.kvBytes);
      for (const ms of r.perScaleMs) metrics?.scaleSeconds.observe(ms / 1000);
    }),
    onBatchEnd: (b: BatchInfo, ms, error) => {
      metrics?.batchImages.observe(b.images);
      metrics?.batchRequests.observe(b.requests);
      metrics?.batchSeconds.observe(ms / 1000);
      if (error === undefined) metrics?.images.inc(b.images);
    },
  });
}

/** The largest batch on a CPU: compute, not memory, bounds it, and a bigger batch only delays its first image. */
const CPU_MAX_BATCH = 8;
/** Past this, a batch is throughput the device no longer gives back, only latency. */
const MAX_PLANNED_BATCH = 64;
/** Device memory left to the CUDA context, kernels' workspaces and fragmentation (the planner counts tensors only). */
const DEVICE_HEADROOM = 0.9;

/**
 * Images per batch when none is given: on CUDA, the largest batch whose planned peak (the full KV cache, the largest
 * schedule served, the text encoder kept) fits the device; on the CPU, CPU_MAX_BATCH.
 */
export async function defaultMaxBatch(pipeline: Pipeline): Promise<number> {
  // The CUDA backend describes its device as '<name> (device N), S SMs, M GiB, ...'.
  const gib = pipeline.engine.backend === 'cuda' ? /([\d.]+) GiB/.exec(pipeline.engine.device) : null;
  if (!gib) return CPU_MAX_BATCH;
  const budgets = pixelBudgetsFor(pipeline.config.name === 'tiny');
  const schedule = scaleSchedule({ aspect: 1, pn: budgets[budgets.length - 1], patchify: pipeline.config.patchify }).scales;
  const fit = await largestBatch(
    { config: pipeline.config as InfinityConfig, schedule, dtype: pipeline.model.dtype as 'bf16' | 'f32', keepTextEncoder: true },
    Number(gib[1]) * 2 ** 30 * DEVICE_HEADROOM,
  );
  return Math.max(1, Math.min(fit, MAX_PLANNED_BATCH));
}
