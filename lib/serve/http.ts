/**
 * The HTTP API on fastify: the OpenAI Images API (`POST /v1/images/generations`, answered when the images are
 * ready), the jobs API (`POST /v1/jobs`, `GET /v1/jobs/:id`, `GET /v1/jobs/:id/events` as server-sent events,
 * `DELETE /v1/jobs/:id`), health, readiness and Prometheus metrics. Every error is a JSON body in the OpenAI error
 * shape; nothing a client sends reaches the process's error path.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { ApiError } from './api-error.js';
import type { Executor } from './executor.js';
import { imagesResponse, type Job, type JobStore } from './jobs.js';
import type { ServerMetrics } from './metrics.js';
import { parseImageRequest, type RequestLimits } from './request.js';

export interface RouteContext {
  jobs: JobStore;
  executor: Executor;
  metrics: ServerMetrics;
  limits: RequestLimits;
  /** False while the model loads and once the server drains. */
  accepting(): boolean;
}

function sendError(reply: FastifyReply, e: ApiError): FastifyReply {
  if (e.retryAfter !== undefined) void reply.header('retry-after', String(e.retryAfter));
  return reply.code(e.status).send(e.toJSON());
}

/** A failure fastify raised before a handler ran (bad JSON, a body too large, a wrong content type) as an ApiError. */
function frameworkError(e: Error & { statusCode?: number; code?: string }): ApiError | undefined {
  const status = e.statusCode;
  if (status === undefined || status < 400 || status >= 500) return undefined;
  const message = e.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || e instanceof SyntaxError ? `body: malformed JSON (${e.message})` : `body: ${e.message}`;
  return new ApiError(status, 'invalid_request_error', message, { param: 'body' });
}

export function registerRoutes(app: FastifyInstance, ctx: RouteContext): void {
  app.setErrorHandler((e: Error & { statusCode?: number }, req, reply) => {
    const api = e instanceof ApiError ? e : frameworkError(e);
    if (api) {
      if (api.status === 400) ctx.metrics.rejections.inc({ reason: 'invalid' });
      return sendError(reply, api);
    }
    req.log.error({ err: e }, 'request failed');
    return sendError(reply, new ApiError(500, 'server_error', 'internal error'));
  });
  app.setNotFoundHandler((req, reply) => sendError(reply, new ApiError(404, 'not_found', `no route ${req.method} ${req.url.split('?')[0]}`)));

  /** Checks and accepts a request as a job, or throws the ApiError that refuses it. */
  const accept = async (body: unknown): Promise<Job> => {
    const request = parseImageRequest(body, ctx.limits);
    if (!ctx.accepting()) throw new ApiError(503, 'server_unavailable', 'the server is not taking requests (starting or shutting down)', { retryAfter: 1 });
    const job = ctx.jobs.create(request);
    try {
      await ctx.executor.submit(job);
    } catch (e) {
      ctx.jobs.delete(job.id);
      job.fail(e);
      if (e instanceof ApiError && (e.status === 429 || e.status === 503)) ctx.metrics.rejections.inc({ reason: e.status === 429 ? 'queue_full' : 'unavailable' });
      throw e;
    }
    void job.settled.then(() => ctx.metrics.requests.inc({ outcome: job.state }));
    return job;
  };
  const jobOf = (req: FastifyRequest): Job => {
    const { id } = req.params as { id: string };
    return ctx.jobs.get(id) ?? (() => {
      throw new ApiError(404, 'not_found', `no job '${id}' (unknown, or forgotten after it finished)`, { param: 'id' });
    })();
  };

  app.post('/v1/images/generations', async (req, reply) => {
    const job = await accept(req.body);
    // A client that goes away cancels its request: its rows are dropped and never sent.
    const onClose = () => {
      if (!reply.raw.writableEnded) job.cancel('client disconnected');
    };
    reply.raw.on('close', onClose);
    try {
      await job.settled;
    } finally {
      reply.raw.off('close', onClose);
      // Answered here: nothing of it is kept.
      ctx.jobs.delete(job.id);
    }
    if (job.state !== 'succeeded') return sendError(reply, job.error as ApiError);
    return imagesResponse(job);
  });

  app.post('/v1/jobs', async (req, reply) => {
    const job = await accept(req.body);
    return reply.code(202).header('location', `/v1/jobs/${job.id}`).send(job.toJSON({ result: false }));
  });

  app.get('/v1/jobs/:id', async (req) => jobOf(req).toJSON());

  app.delete('/v1/jobs/:id', async (req) => {
    const job = jobOf(req);
    // A finished job's record (its images) is dropped; a running one is cancelled and kept for its watchers.
    if (job.done) ctx.jobs.delete(job.id);
    else job.cancel('DELETE');
    return { id: job.id, object: 'scalekv.job', state: job.state, deleted: true };
  });

  app.get('/v1/jobs/:id/events', async (req, reply) => {
    const job = jobOf(req);
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' });
    let unsubscribe = () => {};
    unsubscribe = job.subscribe((e) => {
      res.write(`event: ${e.event}\ndata: ${JSON.stringify(e.data)}\n\n`);
      if (e.event === 'done') {
        unsubscribe();
        res.end();
      }
    });
    res.on('close', () => unsubscribe());
  });

  app.get('/healthz', async () => ({ status: 'ok' }));
  app.get('/readyz', async (_req, reply) => (ctx.accepting() && ctx.executor.ready() ? { status: 'ready' } : reply.code(503).send({ status: 'not ready' })));
  app.get('/metrics', async (_req, reply) => reply.header('content-type', ctx.metrics.registry.contentType).send(await ctx.metrics.registry.metrics()));
}
