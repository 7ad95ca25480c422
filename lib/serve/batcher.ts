/**
 * Dynamic batching: requests that share a key (schedule and settings, see batchKey) are packed into one batch of
 * at most `maxBatch` images, waiting at most `windowMs` for company. One batch runs at a time (one model, one
 * device queue). Across keys the oldest request goes first, so no size starves another; a key that already fills
 * a batch may go ahead of an older request only while that request is still inside its window.
 *
 * A request cancelled while it waits leaves the queue at once; cancelled while its batch runs, it is answered with
 * ERR_ABORTED at once and its rows are dropped from the results (the batch itself is aborted when every request in
 * it is). The queue is bounded: past `maxQueue` waiting requests, `add` answers 429 with a Retry-After estimate.
 */
import { ScaleKVError } from '../errors.js';
import type { PipelineProgress } from '../pipeline.js';
import { ApiError, shuttingDown } from './api-error.js';

export interface BatchContext {
  /** Aborted when every request of the batch has been cancelled. */
  signal: AbortSignal;
  onProgress(p: PipelineProgress): void;
}

export interface BatchInfo {
  id: number;
  /** Images in the batch, and the requests they belong to. */
  images: number;
  requests: number;
}

export interface BatcherOptions<Req, Res> {
  /** Images per batch. A single request larger than this (possible only where `n` is checked elsewhere) runs alone. */
  maxBatch: number;
  windowMs: number;
  /** Requests waiting (not running) before `add` answers 429. */
  maxQueue: number;
  /** Requests with equal keys may share a batch; undefined: the request runs alone. */
  keyOf(r: Req): string | undefined;
  /** Images of a request. */
  sizeOf(r: Req): number;
  /** Runs one batch: one result per request, in order. */
  run(requests: Req[], ctx: BatchContext): Promise<Res[]>;
  onBatchStart?(b: BatchInfo): void;
  onBatchEnd?(b: BatchInfo, ms: number, error?: unknown): void;
}

export interface AddOptions {
  signal?: AbortSignal;
  /** Requests ahead of this one (0: next to run), whenever it changes while it waits. */
  onPosition?(position: number): void;
  /** Its batch starts. */
  onStart?(b: BatchInfo): void;
  onProgress?(p: PipelineProgress): void;
}

interface Entry<Req, Res> {
  request: Req;
  key: string | undefined;
  size: number;
  arrived: number;
  options: AddOptions;
  position: number;
  settled: boolean;
  resolve(r: { result: Res; batch: BatchInfo }): void;
  reject(e: unknown): void;
  detach(): void;
}

/** Until a batch has been timed: the tiny model's batch on two CPU cores is about this long. */
const FIRST_BATCH_MS_GUESS = 1000;

function abortedError(signal: AbortSignal): ScaleKVError {
  return new ScaleKVError('ERR_ABORTED', 'request cancelled', { cause: signal.reason });
}

export class Batcher<Req, Res> {
  readonly #o: BatcherOptions<Req, Res>;
  /** Waiting requests, oldest first. */
  #waiting: Entry<Req, Res>[] = [];
  #running?: Promise<void>;
  #timer?: NodeJS.Timeout;
  #closed = false;
  #nextBatchId = 1;
  /** A moving average of batch time, for Retry-After. */
  #batchMs = FIRST_BATCH_MS_GUESS;
  /** Set while a batch runs: aborts it once every request in it has been cancelled. */
  #onCancelWhileRunning?: () => void;

  constructor(o: BatcherOptions<Req, Res>) {
    if (!Number.isSafeInteger(o.maxBatch) || o.maxBatch < 1) throw new ScaleKVError('ERR_INVALID_ARG', `maxBatch must be a positive integer, got ${o.maxBatch}`);
    if (!(o.windowMs >= 0)) throw new ScaleKVError('ERR_INVALID_ARG', `batch window must be >= 0 ms, got ${o.windowMs}`);
    if (!Number.isSafeInteger(o.maxQueue) || o.maxQueue < 1) throw new ScaleKVError('ERR_INVALID_ARG', `maxQueue must be a positive integer, got ${o.maxQueue}`);
    this.#o = o;
  }

  /** Requests waiting for a batch. */
  get waiting(): number {
    return this.#waiting.length;
  }

  /**
   * Queues a request; resolves with its result and the batch it ran in. Throws ApiError at once when the queue is
   * full (429) or closed (503), so a refused request never becomes a job.
   */
  add(request: Req, options: AddOptions = {}): Promise<{ result: Res; batch: BatchInfo }> {
    if (this.#closed) throw shuttingDown();
    if (this.#waiting.length >= this.#o.maxQueue) {
      const batchesAhead = Math.ceil(this.#waiting.reduce((n, e) => n + e.size, 0) / this.#o.maxBatch) + 1;
      const retryAfter = Math.max(1, Math.ceil((batchesAhead * this.#batchMs) / 1000));
      throw new ApiError(429, 'rate_limit_exceeded', `the queue is full (${this.#o.maxQueue} requests waiting)`, { retryAfter });
    }
    if (options.signal?.aborted) return Promise.reject(abortedError(options.signal));
    return new Promise((resolve, reject) => {
      const onAbort = () => this.#cancel(entry);
      const entry: Entry<Req, Res> = {
        request, key: this.#o.keyOf(request), size: this.#o.sizeOf(request), arrived: performance.now(), options, position: -1, settled: false,
        resolve, reject, detach: () => options.signal?.removeEventListener('abort', onAbort),
      };
      options.signal?.addEventListener('abort', onAbort, { once: true });
      this.#waiting.push(entry);
      this.#positionsChanged();
      // Not at once: the caller records the request as queued before its batch may start.
      queueMicrotask(() => this.#schedule());
    });
  }

  /** Stops taking requests: those waiting are answered 503; resolves once the running batch has finished. */
  async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#timer);
    for (const e of this.#waiting.splice(0)) this.#settle(e, () => e.reject(shuttingDown()));
    await this.#running;
  }

  #settle(e: Entry<Req, Res>, how: () => void): void {
    if (e.settled) return;
    e.settled = true;
    e.detach();
    how();
  }

  #cancel(e: Entry<Req, Res>): void {
    const at = this.#waiting.indexOf(e);
    if (at >= 0) {
      this.#waiting.splice(at, 1);
      this.#positionsChanged();
    }
    // Running: the batch sees it settled and drops its rows (see #run).
    this.#settle(e, () => e.reject(abortedError(e.options.signal as AbortSignal)));
    this.#onCancelWhileRunning?.();
  }

  #positionsChanged(): void {
    this.#waiting.forEach((e, i) => {
      if (e.position === i) return;
      e.position = i;
      e.options.onPosition?.(i);
    });
  }

  #group(key: string | undefined, first: Entry<Req, Res>): Entry<Req, Res>[] {
    if (key === undefined) return [first];
    const out: Entry<Req, Res>[] = [];
    let images = 0;
    for (const e of this.#waiting) {
      if (e.key !== key) continue;
      if (out.length && images + e.size > this.#o.maxBatch) break;
      out.push(e);
      images += e.size;
    }
    return out;
  }

  #schedule(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#running || this.#closed || !this.#waiting.length) return;
    const head = this.#waiting[0];
    const waited = performance.now() - head.arrived;
    let batch: Entry<Req, Res>[] | undefined;
    if (head.key === undefined || waited >= this.#o.windowMs) batch = this.#group(head.key, head);
    else {
      for (const e of this.#waiting) {
        if (e.key === undefined) continue;
        const g = this.#group(e.key, e);
        if (g.reduce((n, x) => n + x.size, 0) >= this.#o.maxBatch) {
          batch = g;
          break;
        }
      }
    }
    if (!batch) {
      this.#timer = setTimeout(() => this.#schedule(), this.#o.windowMs - waited);
      return;
    }
    const taken = new Set(batch);
    this.#waiting = this.#waiting.filter((e) => !taken.has(e));
    this.#positionsChanged();
    this.#running = this.#run(batch).finally(() => {
      this.#running = undefined;
      this.#schedule();
    });
  }

  async #run(entries: Entry<Req, Res>[]): Promise<void> {
    const info: BatchInfo = { id: this.#nextBatchId++, images: entries.reduce((n, e) => n + e.size, 0), requests: entries.length };
    const controller = new AbortController();
    this.#onCancelWhileRunning = () => {
      if (entries.every((e) => e.settled)) controller.abort(new ScaleKVError('ERR_ABORTED', 'every request of the batch was cancelled'));
    };
    const started = performance.now();
    this.#o.onBatchStart?.(info);
    for (const e of entries) e.options.onStart?.(info);
    let error: unknown;
    try {
      const results = await this.#o.run(entries.map((e) => e.request), {
        signal: controller.signal,
        onProgress: (p) => {
          for (const e of entries) if (!e.settled) e.options.onProgress?.(p);
        },
      });
      entries.forEach((e, i) => this.#settle(e, () => e.resolve({ result: results[i], batch: info })));
    } catch (err) {
      error = err;
      for (const e of entries) this.#settle(e, () => e.reject(err));
    } finally {
      this.#onCancelWhileRunning = undefined;
      const ms = performance.now() - started;
      if (!controller.signal.aborted && error === undefined) this.#batchMs = 0.7 * this.#batchMs + 0.3 * ms;
      this.#o.onBatchEnd?.(info, ms, error);
    }
  }
}
