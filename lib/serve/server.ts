/**
 * `createServer`: the HTTP server of `scalekv serve`. It loads the model once (or takes a Pipeline), batches requests
 * onto it, or, with `redis`, puts them on a BullMQ queue for `scalekv worker` processes. `close()` drains: it stops
 * taking requests, lets the running batch finish (and answers what it was waiting for), then stops listening.
 */
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { pino, type Logger } from 'pino';
import { fail } from '../errors.js';
import { Pipeline, type PipelineLoadOptions } from '../pipeline.js';
import { localExecutor, type Executor } from './executor.js';
import { registerRoutes } from './http.js';
import { JobStore } from './jobs.js';
import { ServerMetrics } from './metrics.js';
import { queueExecutor } from './queue.js';
import { OPENAI_MAX_IMAGES, pixelBudgetsFor, type RequestLimits } from './request.js';
import { defaultMaxBatch } from './runner.js';

export interface ServerOptions {
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 8080; 0 picks a free port (see `url`). */
  port?: number;
  /**
   * The model: a loaded Pipeline (the caller disposes it), or how to load one (the server keeps the text encoder
   * loaded and disposes the pipeline on close). Default: the built-in tiny model. Not used with `redis`.
   */
  model?: Pipeline | PipelineLoadOptions;
  /** A Redis URL: jobs go to a BullMQ queue that `scalekv worker` processes take them from. */
  redis?: string;
  /** The BullMQ queue name. Default 'scalekv'. */
  queue?: string;
  /** With `redis`: the workers run the built-in tiny model (it serves the small pixel budgets only). */
  tinyWorkers?: boolean;
  /** Images per batch. Default: the largest batch the memory planner fits on a CUDA device, 8 on the CPU. */
  maxBatch?: number;
  /** How long a request waits for others of its kind before its batch starts. Default 20 ms. */
  batchWindowMs?: number;
  /** Requests waiting before new ones are answered 429. Default 256. */
  maxQueue?: number;
  /** A request still unanswered after this long fails with 504 and stops costing work. Default 300000 (0: none). */
  timeoutMs?: number;
  /** How long a finished job (and its images) stays readable through the jobs API. Default 600000. */
  jobTtlMs?: number;
  /** Logs (JSON, pino) go to stderr at 'info' by default; a pino logger, or false for none. */
  logger?: Logger | false;
}

export interface ScaleKVServer {
  /** The URL the server listens on (http://host:port). */
  readonly url: string;
  readonly app: FastifyInstance;
  readonly metrics: ServerMetrics;
  /** The local model, when the server runs one. */
  readonly pipeline?: Pipeline;
  /** Images per batch in effect; undefined with `redis` (each worker has its own). */
  readonly maxBatch?: number;
  /** Drains (see createServer) and frees what the server loaded. Idempotent. */
  close(): Promise<void>;
}

export async function createServer(o: ServerOptions = {}): Promise<ScaleKVServer> {
  const logger = o.logger === false ? pino({ enabled: false }) : (o.logger ?? pino({ level: 'info' }, pino.destination(2)));
  const maxQueue = o.maxQueue ?? 256;
  const timeoutMs = o.timeoutMs ?? 300_000;
  const jobTtlMs = o.jobTtlMs ?? 600_000;
  const windowMs = o.batchWindowMs ?? 20;
  if (o.maxBatch !== undefined && (!Number.isSafeInteger(o.maxBatch) || o.maxBatch < 1)) fail('ERR_INVALID_ARG', `maxBatch must be a positive integer, got ${o.maxBatch}`);
  if (!Number.isSafeInteger(maxQueue) || maxQueue < 1) fail('ERR_INVALID_ARG', `maxQueue must be a positive integer, got ${maxQueue}`);
  if (!(timeoutMs >= 0) || !(jobTtlMs >= 0) || !(windowMs >= 0)) fail('ERR_INVALID_ARG', 'timeoutMs, jobTtlMs and batchWindowMs must be >= 0');
  if (o.redis !== undefined && o.model !== undefined) fail('ERR_INVALID_ARG', 'createServer: with redis the workers run the model; give no model');

  let pipeline: Pipeline | undefined;
  const ownsPipeline = !(o.model instanceof Pipeline);
  let executor: Executor | undefined;
  let maxBatch: number | undefined;
  let limits: RequestLimits;
  const jobs = new JobStore({ ttlMs: jobTtlMs, timeoutMs });
  let metrics: ServerMetrics;
  try {
    if (o.redis === undefined) {
      pipeline = o.model instanceof Pipeline ? o.model : await Pipeline.load({ ...o.model, keepTextEncoder: true });
      const served = pipeline;
      const pixelBudgets = pixelBudgetsFor(served.config.name === 'tiny');
      const batch = o.maxBatch ?? (await defaultMaxBatch(served));
      maxBatch = batch;
      limits = { maxImages: Math.min(OPENAI_MAX_IMAGES, batch), pixelBudgets, checkKvPolicy: (spec) => void served.kvPolicy(spec) };
      metrics = new ServerMetrics({ depth: () => executor?.depth() ?? 0, engine: served.engine });
      executor = localExecutor(served, { maxBatch: batch, windowMs, maxQueue }, metrics);
    } else {
      limits = { maxImages: OPENAI_MAX_IMAGES, pixelBudgets: pixelBudgetsFor(o.tinyWorkers ?? false) };
      metrics = new ServerMetrics({ depth: () => executor?.depth() ?? 0 });
      executor = await queueExecutor({ redis: o.redis, queue: o.queue, maxQueue, keepSeconds: Math.ceil(jobTtlMs / 1000), logger });
    }
  } catch (e) {
    if (ownsPipeline) await pipeline?.dispose();
    throw e;
  }
  const running = executor;
  let draining = false;
  // Probes and scrapes come every few seconds: their request lines would drown the rest.
  const quiet = new Set(['/healthz', '/readyz', '/metrics']);
  const logController = new LogController({ disableRequestLogging: (req) => quiet.has(req.url) });
  const app = Fastify({ loggerInstance: logger as FastifyBaseLogger, logController, bodyLimit: 1 << 20 });
  registerRoutes(app, { jobs, executor: running, metrics, limits, accepting: () => !draining });
  let url: string;
  try {
    url = await app.listen({ host: o.host ?? '127.0.0.1', port: o.port ?? 8080 });
  } catch (e) {
    await running.close();
    if (ownsPipeline) await pipeline?.dispose();
    throw e;
  }
  logger.info({ url, mode: o.redis ? 'queue' : 'local', maxBatch, windowMs, maxQueue }, 'scalekv server listening');
  let closing: Promise<void> | undefined;
  return {
    url,
    app,
    metrics,
    pipeline,
    maxBatch,
    close: () =>
      (closing ??= (async () => {
        draining = true;
        await running.close();
        await app.close();
        if (ownsPipeline) await pipeline?.dispose();
        logger.info('scalekv server closed');
      })()),
  };
}
