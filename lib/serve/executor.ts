/**
 * What runs a server's jobs: the local batcher on the server's own model, or a BullMQ queue that workers take
 * jobs from. Either settles each job through its methods (queued, started, progressed, succeed, fail) and stops its
 * work when the job's signal aborts.
 */
import type { Pipeline } from '../pipeline.js';
import type { Job } from './jobs.js';
import type { ServerMetrics } from './metrics.js';
import { imageBatcher, type BatchingOptions } from './runner.js';

export interface Executor {
  /** Accepts a job (it is then queued) or throws ApiError 429 / 503 without keeping it. */
  submit(job: Job): Promise<void>;
  /** Requests waiting to run. */
  depth(): number | Promise<number>;
  /** Whether it can take jobs now. */
  ready(): boolean;
  /** Stops taking jobs; resolves once the jobs running here have finished. */
  close(): Promise<void>;
}

/** Runs jobs in this process, in batches, on the pipeline. */
export function localExecutor(pipeline: Pipeline, o: BatchingOptions, metrics: ServerMetrics): Executor {
  const batcher = imageBatcher(pipeline, o, metrics);
  let closed = false;
  return {
    async submit(job) {
      let queuedAt: number | undefined;
      const run = batcher.add(job.request, {
        signal: job.signal,
        onPosition: (p) => (queuedAt === undefined ? (queuedAt = p) : job.moved(p)),
        onStart: (b) => job.started(b),
        onProgress: (p) => job.progressed(p),
      });
      job.queued(queuedAt);
      queuedAt ??= 0;
      run.then(({ result, batch }) => job.succeed(result, batch), (e: unknown) => job.fail(e));
    },
    depth: () => batcher.waiting,
    ready: () => !closed,
    async close() {
      closed = true;
      await batcher.close();
    },
  };
}
