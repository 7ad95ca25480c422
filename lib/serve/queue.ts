/**
 * Scale-out over BullMQ on Redis: `serve --redis` puts each job on a queue (queueExecutor) and `worker --redis`
 * processes (startWorker), in batches, on its own model. A job's id is the server's job id. Workers report progress
 * through BullMQ (the batch when it starts, then each scale), which the server's QueueEvents turn into the job's
 * events; the PNGs come back as the job's return value.
 *
 * A worker that dies mid-job stops renewing the job's lock; another worker's stalled-job check moves it back to the
 * queue and runs it again. BullMQ completes a job once (a late completion from a lost lock is refused), and the
 * server settles its job once, so the client gets exactly one result.
 *
 * Cancelling: a waiting job is removed from the queue; a job a worker already holds is cancelled through a Redis
 * channel every worker listens on, plus a key (kept an hour) that a worker checks when it picks a job up, for the
 * job that was on its way to a worker when the message went out.
 */
import { hostname } from 'node:os';
import { Job as QueueJob, Queue, QueueEvents, UnrecoverableError, Worker } from 'bullmq';
import { Redis } from 'ioredis';
import type { Logger } from 'pino';
import type { Pipeline } from '../pipeline.js';
import { ApiError, shuttingDown } from './api-error.js';
import type { Executor } from './executor.js';
import { Job, toApiError, type JobBatch, type JobResult } from './jobs.js';
import { OPENAI_MAX_IMAGES, type ImageRequest } from './request.js';
import { defaultMaxBatch, imageBatcher, type BatchingOptions } from './runner.js';

export const DEFAULT_QUEUE = 'scalekv';
const CANCEL_KEY_SECONDS = 3600;

const cancelChannel = (queue: string) => `scalekv:${queue}:cancel`;
const cancelKey = (queue: string, id: string) => `scalekv:${queue}:cancelled:${id}`;

/** Progress a worker reports: its batch as it starts, then the pipeline's steps. */
type WorkerProgress = { batch: JobBatch } | { stage: 'sampling' | 'decode'; done: number; total: number };

export interface QueueExecutorOptions {
  redis: string;
  queue?: string;
  /** Jobs waiting in the queue (from every server) before a new one is answered 429. */
  maxQueue: number;
  /** Seconds Redis keeps a finished job's record (its PNGs included). */
  keepSeconds: number;
  logger: Logger;
}

/** Puts the server's jobs on a BullMQ queue and follows them there. */
export async function queueExecutor(o: QueueExecutorOptions): Promise<Executor> {
  const name = o.queue ?? DEFAULT_QUEUE;
  const connection = { url: o.redis };
  const queue = new Queue<ImageRequest, JobResult>(name, { connection });
  const events = new QueueEvents(name, { connection });
  const publisher = new Redis(o.redis, { maxRetriesPerRequest: 3 });
  const jobs = new Map<string, Job>();
  let closed = false;
  try {
    await Promise.all([queue.waitUntilReady(), events.waitUntilReady()]);
  } catch (e) {
    await Promise.allSettled([queue.close(), events.close()]);
    publisher.disconnect();
    throw e;
  }
  events.on('progress', ({ jobId, data }) => {
    const job = jobs.get(jobId);
    const p = data as WorkerProgress;
    if (!job || typeof p !== 'object' || p === null) return;
    if ('batch' in p) job.started(p.batch);
    else job.progressed(p);
  });
  events.on('completed', ({ jobId, returnvalue }) => {
    const job = jobs.get(jobId);
    if (!job) return;
    try {
      job.succeed((typeof returnvalue === 'string' ? JSON.parse(returnvalue) : returnvalue) as JobResult);
    } catch (e) {
      job.fail(new ApiError(500, 'server_error', `a worker returned an unreadable result: ${(e as Error).message}`));
    }
  });
  events.on('failed', ({ jobId, failedReason }) => {
    const job = jobs.get(jobId);
    if (!job) return;
    // Already over on the queue: nothing there to cancel.
    jobs.delete(jobId);
    job.fail(parseFailure(failedReason));
  });
  events.on('error', (e) => o.logger.warn({ err: e }, 'queue events'));
  const cancel = async (id: string) => {
    await publisher.set(cancelKey(name, id), '1', 'EX', CANCEL_KEY_SECONDS);
    await publisher.publish(cancelChannel(name), id);
    // A job no worker holds yet can simply go; one that is locked stays until its worker lets go of it.
    await (await QueueJob.fromId(queue, id))?.remove().catch(() => undefined);
  };
  return {
    async submit(job) {
      if (closed) throw shuttingDown();
      const waiting = await queue.getWaitingCount();
      if (waiting >= o.maxQueue) throw new ApiError(429, 'rate_limit_exceeded', `the queue is full (${waiting} jobs waiting)`, { retryAfter: 5 });
      jobs.set(job.id, job);
      // After the abort listener below has run (it needs the job's entry).
      void job.settled.then(() => jobs.delete(job.id));
      // Cancelled, disconnected or timed out here: the job must stop on the queue too.
      job.signal.addEventListener('abort', () => {
        if (!jobs.has(job.id)) return;
        void cancel(job.id).catch((e: unknown) => o.logger.warn({ err: e, job: job.id }, 'cancelling a queued job failed'));
      }, { once: true });
      try {
        await queue.add('generate', job.request, {
          jobId: job.id, removeOnComplete: { age: o.keepSeconds }, removeOnFail: { age: o.keepSeconds },
        });
      } catch (e) {
        jobs.delete(job.id);
        throw new ApiError(503, 'server_unavailable', `the queue cannot be reached: ${(e as Error).message}`, { retryAfter: 5 });
      }
      job.queued(waiting);
    },
    depth: () => queue.getWaitingCount(),
    ready: () => !closed && publisher.status === 'ready',
    async close() {
      closed = true;
      // The workers finish what this server is waiting for (the per-request timeout bounds it).
      await Promise.all([...jobs.values()].map((j) => j.settled));
      await Promise.allSettled([events.close(), queue.close()]);
      publisher.disconnect();
    },
  };
}

/** A worker's failure, as the server answers it: the worker sends the ApiError's JSON as the failure reason. */
function parseFailure(reason: string): ApiError {
  try {
    const e = JSON.parse(reason) as { status: number; type: ApiError['type']; message: string; param: string | null };
    return new ApiError(e.status, e.type, e.message, { param: e.param ?? undefined });
  } catch {
    return new ApiError(500, 'server_error', reason);
  }
}

/**
 * What a worker checks of a job from Redis before it sizes anything by it (serve checked the request in full; the
 * pipeline checks the rest): a prompt, and a count of images that stays within the API's limit.
 */
function queuedRequestIsSane(r: ImageRequest): boolean {
  return typeof r === 'object' && r !== null && typeof r.prompt === 'string' && Number.isSafeInteger(r.n) && r.n >= 1 && r.n <= OPENAI_MAX_IMAGES;
}

export interface WorkerOptions extends Partial<BatchingOptions> {
  redis: string;
  queue?: string;
  /**
   * How long a job's lock lasts without renewal (the worker renews it at half that while it runs): how soon a job
   * of a dead worker goes back to the queue. Default 30 s (BullMQ's).
   */
  lockMs?: number;
  logger: Logger;
}

export interface RunningWorker {
  /** Stops taking jobs and lets the batches it holds finish. */
  close(): Promise<void>;
}

/** Takes jobs from the queue and runs them on the pipeline, batched as a local server batches. */
export async function startWorker(pipeline: Pipeline, o: WorkerOptions): Promise<RunningWorker> {
  const name = o.queue ?? DEFAULT_QUEUE;
  const maxBatch = o.maxBatch ?? (await defaultMaxBatch(pipeline));
  // The batcher holds every job the worker has taken, and the worker takes at most maxBatch at once.
  const batcher = imageBatcher(pipeline, { maxBatch, windowMs: o.windowMs ?? 20, maxQueue: maxBatch });
  const id = `${hostname()}:${process.pid}`;
  const lockMs = o.lockMs ?? 30_000;
  const commands = new Redis(o.redis, { maxRetriesPerRequest: 3 });
  const subscriber = new Redis(o.redis, { maxRetriesPerRequest: null });
  const worker = new Worker<ImageRequest, JobResult>(
    name,
    async (job, _token, signal) => {
      const jobId = job.id as string;
      try {
        if (!queuedRequestIsSane(job.data)) throw new ApiError(400, 'invalid_request_error', 'the queued request is malformed (not put there by scalekv serve?)');
        if (await commands.exists(cancelKey(name, jobId))) throw new ApiError(409, 'cancelled', 'the job was cancelled');
        const { result } = await batcher.add(job.data, {
          signal,
          onStart: (b) => void job.updateProgress({ batch: { id: `${id}#${b.id}`, images: b.images, requests: b.requests } } satisfies WorkerProgress),
          onProgress: (p) => void job.updateProgress({ stage: p.stage, done: p.done, total: p.total } satisfies WorkerProgress),
        });
        return result;
      } catch (e) {
        const err = toApiError(e);
        o.logger.info({ job: jobId, status: err.status }, err.message);
        // Not retried: a bad request or a cancel fails the same way again (a dead worker is BullMQ's stall path).
        throw new UnrecoverableError(JSON.stringify({ status: err.status, type: err.type, message: err.message, param: err.param }));
      }
    },
    { connection: { url: o.redis }, concurrency: maxBatch, lockDuration: lockMs, stalledInterval: Math.max(500, Math.floor(lockMs / 2)), maxStalledCount: 1 },
  );
  worker.on('error', (e) => o.logger.error({ err: e }, 'worker error'));
  subscriber.on('message', (_channel, jobId: string) => worker.cancelJob(jobId, 'cancelled'));
  await subscriber.subscribe(cancelChannel(name));
  await worker.waitUntilReady();
  o.logger.info({ queue: name, worker: id, maxBatch }, 'worker ready');
  return {
    async close() {
      await worker.close();
      await batcher.close();
      subscriber.disconnect();
      commands.disconnect();
    },
  };
}
