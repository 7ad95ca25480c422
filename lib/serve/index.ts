// The server tier: createServer (HTTP, dynamic batching, BullMQ scale-out) and the worker of `scalekv worker`.
export { createServer } from './server.js';
export { defaultMaxBatch } from './runner.js';
export type { ScaleKVServer, ServerOptions } from './server.js';
export { startWorker, DEFAULT_QUEUE } from './queue.js';
export type { RunningWorker, WorkerOptions } from './queue.js';
export { ApiError } from './api-error.js';
export type { ApiErrorType } from './api-error.js';
export { parseImageRequest, sizeToSchedule, batchKey, MAX_PROMPT_CHARS } from './request.js';
export type { ImageRequest, RequestLimits } from './request.js';
export { Batcher } from './batcher.js';
export type { AddOptions, BatchContext, BatcherOptions, BatchInfo } from './batcher.js';
