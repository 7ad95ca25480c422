// Throughput of `scalekv serve` on loopback: images per second for 1, 4 and 16 concurrent clients, with dynamic
// batching on (--max-batch, a 20 ms window) and off (batches of one image), and the ratio on / off, in one run.
// `npm run bench:serve -- [--backend cpu] [--requests 16] [--max-batch 16] [--threads N]`
//
// Each case is a fresh in-process server on the built-in tiny model (0.06M, 256x256, 7 scales) and a bounded client
// loop: every client sends its share of --requests requests one after the other (n = 1 each, through the OpenAI
// Images endpoint), and the case's time runs from the first request to the last answer. The same loop runs once
// untimed first: a batch of a size not seen before makes its memory plan (a dry run) once, which a long-running
// server has long paid.
import { parseArgs } from 'node:util';
import { createServer } from '../lib/serve/index.js';
import type { BackendChoice } from '../lib/engine.js';

const { values } = parseArgs({
  options: {
    backend: { type: 'string', default: 'cpu' },
    requests: { type: 'string', default: '16' },
    'max-batch': { type: 'string', default: '16' },
    threads: { type: 'string' },
  },
});
const requests = Number(values.requests);
const maxBatch = Number(values['max-batch']);
const threads = values.threads === undefined ? undefined : Number(values.threads);

async function imagesPerSecond(clients: number, batching: boolean): Promise<number> {
  const server = await createServer({
    model: { backend: values.backend as BackendChoice, threads },
    port: 0,
    logger: false,
    maxBatch: batching ? maxBatch : 1,
    batchWindowMs: batching ? 20 : 0,
    maxQueue: requests + clients,
  });
  const generate = async (prompt: string) => {
    const r = await fetch(`${server.url}/v1/images/generations`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt }) });
    if (r.status !== 200) throw new Error(`HTTP ${r.status}: ${await r.text()}`);
    await r.arrayBuffer();
  };
  const loop = () => Promise.all(Array.from({ length: clients }, async (_, c) => {
    for (let i = c; i < requests; i += clients) await generate(`prompt ${i}`);
  }));
  try {
    await loop();
    const started = performance.now();
    await loop();
    return requests / ((performance.now() - started) / 1000);
  } finally {
    await server.close();
  }
}

process.stdout.write(`scalekv serve, tiny model, ${values.backend}, ${requests} requests of 1 image per case, batching: max ${maxBatch} images, 20 ms window\n`);
process.stdout.write('clients  batching off (img/s)  batching on (img/s)  on / off\n');
for (const clients of [1, 4, 16]) {
  const off = await imagesPerSecond(clients, false);
  const on = await imagesPerSecond(clients, true);
  process.stdout.write(`${String(clients).padStart(7)}  ${off.toFixed(2).padStart(20)}  ${on.toFixed(2).padStart(19)}  ${(on / off).toFixed(2).padStart(8)}\n`);
}
