/**
 * Jobs: one per accepted request, whatever runs it (the local batcher, or a BullMQ worker). A job keeps its
 * events in order (queued, position, running, progress, done) so an SSE client that subscribes late replays them,
 * settles exactly once (a result arriving after a cancel is dropped), and is forgotten `ttlMs` after it settles,
 * so nothing a client submits holds memory for long.
 */
import { randomUUID } from 'node:crypto';
import { ScaleKVError } from '../errors.js';
import type { PipelineProgress } from '../pipeline.js';
import { ApiError } from './api-error.js';
import type { ImageRequest } from './request.js';

export type JobState = 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled';
export type JobEventName = 'queued' | 'position' | 'running' | 'progress' | 'done';

export interface JobEvent {
  event: JobEventName;
  data: Record<string, unknown>;
}

/** What a job's runner returns: PNGs as base64, so the local and the queued paths hand back the same thing. */
export interface JobResult {
  images: string[];
  width: number;
  height: number;
  seed: number;
}

export interface JobBatch {
  id: number | string;
  images: number;
  requests: number;
}

const TERMINAL: readonly JobState[] = ['succeeded', 'failed', 'cancelled'];

export class Job {
  readonly id = randomUUID();
  readonly created = Math.floor(Date.now() / 1000);
  readonly request: ImageRequest;
  /** Aborted on cancel, client disconnect or timeout: what stops the work. */
  readonly #controller = new AbortController();
  state: JobState = 'queued';
  position?: number;
  progress?: PipelineProgress;
  batch?: JobBatch;
  result?: JobResult;
  error?: ApiError;
  readonly events: JobEvent[] = [];
  readonly #listeners = new Set<(e: JobEvent) => void>();
  readonly settled: Promise<void>;
  #resolveSettled!: () => void;
  #timeout?: NodeJS.Timeout;

  constructor(request: ImageRequest, timeoutMs: number) {
    this.request = request;
    this.settled = new Promise((r) => (this.#resolveSettled = r));
    if (timeoutMs > 0) {
      this.#timeout = setTimeout(() => this.fail(new ApiError(504, 'timeout', `the request did not finish within ${timeoutMs} ms`)), timeoutMs);
      this.#timeout.unref();
    }
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  get done(): boolean {
    return TERMINAL.includes(this.state);
  }

  /** Follows the job's events from the first (replayed) to `done`; returns the unsubscribe. */
  subscribe(listener: (e: JobEvent) => void): () => void {
    for (const e of this.events) listener(e);
    if (this.done) return () => undefined;
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  #emit(event: JobEventName, data: Record<string, unknown>): void {
    const e = { event, data };
    this.events.push(e);
    for (const l of this.#listeners) l(e);
  }

  queued(position?: number): void {
    if (this.done) return;
    this.position = position;
    this.#emit('queued', { id: this.id, position: position ?? null });
  }

  moved(position: number): void {
    if (this.done || this.state !== 'queued' || position === this.position) return;
    this.position = position;
    this.#emit('position', { position });
  }

  started(batch: JobBatch): void {
    if (this.done) return;
    this.state = 'running';
    this.position = undefined;
    this.batch = batch;
    this.#emit('running', { batch });
  }

  progressed(p: PipelineProgress): void {
    if (this.done) return;
    if (this.state === 'queued') this.state = 'running';
    this.progress = p;
    // A progress event per sampled scale and one when the batch is decoded.
    this.#emit('progress', { stage: p.stage, done: p.done, total: p.total });
  }

  succeed(result: JobResult, batch?: JobBatch): void {
    if (this.done) return;
    this.result = result;
    if (batch) this.batch = batch;
    this.#finish('succeeded');
  }

  /** Settles the job as failed (or cancelled, for an abort it asked for) and stops its work. */
  fail(error: unknown): void {
    if (this.done) return;
    this.error = toApiError(error);
    this.#finish(this.error.type === 'cancelled' ? 'cancelled' : 'failed');
  }

  cancel(reason: string): void {
    this.fail(new ApiError(409, 'cancelled', `the job was cancelled (${reason})`));
  }

  #finish(state: JobState): void {
    this.state = state;
    this.position = undefined;
    clearTimeout(this.#timeout);
    if (state !== 'succeeded') this.#controller.abort(this.error);
    this.#emit('done', this.toJSON({ result: true }));
    this.#listeners.clear();
    this.#resolveSettled();
  }

  /** The job record of `GET /v1/jobs/:id`; the images only with `result`. */
  toJSON(o: { result: boolean } = { result: true }): Record<string, unknown> {
    return {
      id: this.id,
      object: 'scalekv.job',
      state: this.state,
      created: this.created,
      size: this.request.size,
      n: this.request.n,
      position: this.position ?? null,
      progress: this.progress ?? null,
      batch: this.batch ?? null,
      seed: this.result?.seed ?? null,
      error: this.error ? this.error.toJSON().error : null,
      result: o.result && this.result ? imagesResponse(this) : null,
    };
  }
}

/** The OpenAI Images API response of a finished job. */
export function imagesResponse(job: Job): Record<string, unknown> {
  const r = job.result as JobResult;
  return { created: job.created, data: r.images.map((b64) => ({ b64_json: b64 })), size: `${r.width}x${r.height}`, seed: r.seed, job_id: job.id, batch: job.batch ?? null };
}

/** A failure as the API answers it: an ApiError as is, a cancellation, a ScaleKVError by its code. */
export function toApiError(e: unknown): ApiError {
  if (e instanceof ApiError) return e;
  if (e instanceof ScaleKVError) {
    if (e.code === 'ERR_ABORTED') return e.cause instanceof ApiError ? e.cause : new ApiError(409, 'cancelled', 'the job was cancelled');
    if (e.code === 'ERR_INVALID_ARG') return new ApiError(400, 'invalid_request_error', e.message);
    return new ApiError(500, 'server_error', `${e.message} [${e.code}]`);
  }
  return new ApiError(500, 'server_error', e instanceof Error ? e.message : String(e));
}

/** The jobs this server accepted, each dropped `ttlMs` after it settled. */
export class JobStore {
  readonly #jobs = new Map<string, Job>();
  readonly #ttlMs: number;
  readonly #timeoutMs: number;

  constructor(o: { ttlMs: number; timeoutMs: number }) {
    this.#ttlMs = o.ttlMs;
    this.#timeoutMs = o.timeoutMs;
  }

  create(request: ImageRequest): Job {
    const job = new Job(request, this.#timeoutMs);
    this.#jobs.set(job.id, job);
    void job.settled.then(() => setTimeout(() => this.#jobs.delete(job.id), this.#ttlMs).unref());
    return job;
  }

  get(id: string): Job | undefined {
    return this.#jobs.get(id);
  }

  delete(id: string): void {
    this.#jobs.delete(id);
  }

  /** Jobs not yet settled. */
  active(): Job[] {
    return [...this.#jobs.values()].filter((j) => !j.done);
  }
}
