// `scalekv serve` and `scalekv worker`: the HTTP server (createServer) and the BullMQ worker (startWorker). Both
// log JSON lines (pino) to stderr; stdout stays empty. SIGTERM or SIGINT drains: no new requests or jobs, the
// running batch finishes, then the process exits 0.
import { parseArgs } from 'node:util';
import { pino } from 'pino';
import type { BackendChoice } from '../engine.js';
import { fail } from '../errors.js';
import type { PresetName } from '../model/presets.js';
import { Pipeline } from '../pipeline.js';
import { createServer } from '../serve/server.js';
import { DEFAULT_QUEUE, startWorker } from '../serve/queue.js';
import { parseNumber } from './common.js';

export const SERVE_USAGE: Record<string, string> = {
  serve: `  serve (--demo | --weights CKPT --vae CKPT --t5 DIR [--preset P] [--dtype bf16|f32] | --redis URL [--demo])
       [--host 127.0.0.1] [--port 8080] [--backend B] [--max-batch N] [--batch-window-ms 20] [--max-queue 256]
       [--timeout-ms 300000] [--job-ttl-ms 600000] [--queue scalekv] [--log-level info]
      An HTTP server: the OpenAI Images API (POST /v1/images/generations: prompt, n, size, response_format
      b64_json; extensions seed, cfg, tau, negative_prompt, kv_policy), jobs (POST /v1/jobs, GET /v1/jobs/ID,
      GET /v1/jobs/ID/events as server-sent events, DELETE /v1/jobs/ID), GET /healthz, /readyz, /metrics
      (Prometheus). Requests of one size and settings are batched, up to --max-batch images (default: the largest
      batch the memory planner fits on a CUDA device, 8 on the CPU) waiting at most --batch-window-ms; past
      --max-queue waiting requests it answers 429. --demo serves the built-in tiny model (no download). With
      --redis the model runs in 'scalekv worker' processes instead (--demo then says the workers run the tiny
      model). SIGTERM drains and exits 0. Logs: JSON lines on stderr.
      examples:
        scalekv serve --demo --port 8080
        scalekv serve --weights infinity_2b_reg.pth --vae infinity_vae_d32_reg.pth --t5 flan-t5-xl --backend cuda
        scalekv serve --redis redis://127.0.0.1:6379 --port 8080
`,
  worker: `  worker --redis URL (--demo | --weights CKPT --vae CKPT --t5 DIR [--preset P] [--dtype bf16|f32]) [--backend B]
       [--max-batch N] [--batch-window-ms 20] [--queue scalekv] [--lock-ms 30000] [--log-level info]
      Takes jobs that 'scalekv serve --redis' put on the BullMQ queue and runs them in batches, as serve does, on
      its model: one worker per GPU, on any number of hosts. A worker that dies mid-job loses its lock after
      --lock-ms and another worker runs the job again. SIGTERM finishes the jobs it holds and exits 0.
      examples:
        scalekv worker --redis redis://queue-host:6379 --backend cuda --weights infinity_2b_reg.pth \\
          --vae infinity_vae_d32_reg.pth --t5 flan-t5-xl
        scalekv worker --redis redis://127.0.0.1:6379 --demo
`,
};

const modelOptions = {
  demo: { type: 'boolean', default: false },
  weights: { type: 'string' },
  vae: { type: 'string' },
  t5: { type: 'string' },
  preset: { type: 'string' },
  dtype: { type: 'string' },
  backend: { type: 'string', default: 'auto' },
  'max-batch': { type: 'string' },
  'batch-window-ms': { type: 'string' },
  queue: { type: 'string', default: DEFAULT_QUEUE },
  redis: { type: 'string' },
  'log-level': { type: 'string', default: 'info' },
} as const;

interface ModelValues {
  demo: boolean;
  weights?: string;
  vae?: string;
  t5?: string;
  preset?: string;
  dtype?: string;
  backend: string;
}

/** The model of --demo, or of --weights/--vae/--t5 (a server takes prompts as text, so it needs the T5 encoder). */
async function loadModel(v: ModelValues): Promise<Pipeline> {
  if (v.dtype !== undefined && v.dtype !== 'bf16' && v.dtype !== 'f32') fail('ERR_INVALID_ARG', `--dtype must be bf16 or f32, got '${v.dtype}'`);
  const dtype = v.dtype as 'bf16' | 'f32' | undefined;
  const backend = v.backend as BackendChoice;
  if (v.demo) {
    if (v.weights || v.vae || v.t5 || v.preset) fail('ERR_INVALID_ARG', '--demo runs the built-in tiny model: give no --weights, --vae, --t5 or --preset');
    return Pipeline.load({ backend, dtype, keepTextEncoder: true });
  }
  if (!v.weights || !v.vae || !v.t5) fail('ERR_INVALID_ARG', 'give --demo, or --weights, --vae and --t5 (prompts arrive as text)');
  return Pipeline.load({ backend, dtype, weights: v.weights, vae: v.vae, t5: v.t5, preset: v.preset as PresetName | 'tiny' | undefined, keepTextEncoder: true });
}

function positiveInt(s: string | undefined, what: string): number | undefined {
  if (s === undefined) return undefined;
  const v = parseNumber(s, what, 0);
  if (!Number.isSafeInteger(v) || v < 0) fail('ERR_INVALID_ARG', `${what} must be a non-negative integer, got '${s}'`);
  return v;
}

/** Resolves on the first SIGTERM or SIGINT. */
function shutdownSignal(): Promise<string> {
  return new Promise((resolve) => {
    const on = (sig: string) => {
      process.off('SIGTERM', on);
      process.off('SIGINT', on);
      resolve(sig);
    };
    process.on('SIGTERM', on);
    process.on('SIGINT', on);
  });
}

export async function serveCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      ...modelOptions,
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '8080' },
      'max-queue': { type: 'string' },
      'timeout-ms': { type: 'string' },
      'job-ttl-ms': { type: 'string' },
    },
  });
  const logger = pino({ level: values['log-level'] }, pino.destination(2));
  const stopped = shutdownSignal();
  const model = values.redis ? undefined : await loadModel(values);
  try {
    const server = await createServer({
      host: values.host,
      port: positiveInt(values.port, '--port'),
      model,
      redis: values.redis,
      queue: values.queue,
      tinyWorkers: values.redis ? values.demo : undefined,
      maxBatch: positiveInt(values['max-batch'], '--max-batch'),
      batchWindowMs: positiveInt(values['batch-window-ms'], '--batch-window-ms'),
      maxQueue: positiveInt(values['max-queue'], '--max-queue'),
      timeoutMs: positiveInt(values['timeout-ms'], '--timeout-ms'),
      jobTtlMs: positiveInt(values['job-ttl-ms'], '--job-ttl-ms'),
      logger,
    });
    const signal = await stopped;
    logger.info({ signal }, 'draining');
    await server.close();
  } finally {
    await model?.dispose();
  }
  return 0;
}

export async function workerCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { ...modelOptions, 'lock-ms': { type: 'string' } } });
  if (!values.redis) fail('ERR_INVALID_ARG', 'worker needs --redis URL (the queue that scalekv serve --redis fills)');
  const logger = pino({ level: values['log-level'] }, pino.destination(2));
  const stopped = shutdownSignal();
  const pipeline = await loadModel(values);
  try {
    const worker = await startWorker(pipeline, {
      redis: values.redis,
      queue: values.queue,
      maxBatch: positiveInt(values['max-batch'], '--max-batch'),
      windowMs: positiveInt(values['batch-window-ms'], '--batch-window-ms'),
      lockMs: positiveInt(values['lock-ms'], '--lock-ms'),
      logger,
    });
    const signal = await stopped;
    logger.info({ signal }, 'draining');
    await worker.close();
  } finally {
    await pipeline.dispose();
  }
  return 0;
}
