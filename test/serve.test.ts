// `scalekv serve` on the built-in tiny model, on loopback: the OpenAI client, batching, bad input, the bounded
// queue, cancellation and its memory, SSE, and SIGTERM draining. Serial: the batching figures are per server.
import test from 'ava';
import OpenAI from 'openai';
import { decodePng } from '../lib/image/png.js';
import { createServer, type ScaleKVServer, type ServerOptions } from '../lib/serve/index.js';
import { metricValue, readEvents, spawnCli, stopChild, waitForLine } from './serve-helpers.js';

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

async function withServer(t: { teardown(fn: () => Promise<void>): void }, o: ServerOptions = {}): Promise<ScaleKVServer> {
  const server = await createServer({ model: { backend: 'cpu', threads: 2 }, port: 0, logger: false, ...o });
  t.teardown(() => server.close());
  return server;
}

const post = (server: ScaleKVServer, path: string, body: unknown, signal?: AbortSignal) =>
  fetch(`${server.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: typeof body === 'string' ? body : JSON.stringify(body), signal });

const metrics = async (server: ScaleKVServer) => (await fetch(`${server.url}/metrics`)).text();

test.serial('the official openai client gets valid PNGs for n = 1 and n = 3; concurrent requests of one size share one batch', async (t) => {
  const server = await withServer(t, { batchWindowMs: 300 });
  const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  for (const n of [1, 3]) {
    const r = await client.images.generate({ model: 'scalekv-tiny', prompt: 'a red fox', n, size: '256x256', response_format: 'b64_json' });
    t.is(r.data?.length, n);
    for (const d of r.data ?? []) {
      const png = Buffer.from(d.b64_json as string, 'base64');
      t.deepEqual(png.subarray(0, 8), PNG_SIGNATURE);
      const img = decodePng(png);
      t.deepEqual([img.width, img.height, img.channels], [256, 256, 3]);
    }
  }
  // Four clients at once, one size: one batch of four requests (the job record says so, and so does /metrics).
  const before = metricValue(await metrics(server), 'scalekv_batch_requests_count');
  const four = await Promise.all(['a', 'b', 'c', 'd'].map((p) => client.images.generate({ prompt: `a ${p}`, size: '256x256' })));
  for (const r of four) t.like((r as unknown as { batch: unknown }).batch, { images: 4, requests: 4 });
  const after = await metrics(server);
  t.is(metricValue(after, 'scalekv_batch_requests_count'), before + 1);
  t.is(metricValue(after, 'scalekv_requests_total{outcome="succeeded"}'), 6);
  // Another size is another schedule: its own batch.
  const [square, wide] = await Promise.all([post(server, '/v1/images/generations', { prompt: 'x' }), post(server, '/v1/images/generations', { prompt: 'y', size: '1024x768' })]);
  const [s, w] = (await Promise.all([square.json(), wide.json()])) as { size: string; batch: { requests: number } }[];
  t.is(s.size, '256x256');
  t.not(w.size, '256x256');
  t.is(s.batch.requests, 1);
  t.is(w.batch.requests, 1);
  // An 8-bit KV cache is another batch too, and its image comes back.
  const [plain, eight] = await Promise.all([post(server, '/v1/images/generations', { prompt: 'u' }), post(server, '/v1/images/generations', { prompt: 'v', kv_dtype: 'int8' })]);
  const [p8, q8] = (await Promise.all([plain.json(), eight.json()])) as { data: { b64_json: string }[]; batch: { requests: number } }[];
  t.is(q8.batch.requests, 1);
  t.is(p8.batch.requests, 1);
  t.is(Buffer.from(q8.data[0].b64_json, 'base64').subarray(1, 4).toString(), 'PNG');
});

test.serial('bad input is a 400 naming the field; an unknown job is a 404; a full queue is a 429 with Retry-After', async (t) => {
  const server = await withServer(t, { batchWindowMs: 0, maxQueue: 1 });
  const cases: [unknown, string][] = [
    ['{"prompt": "a fox",', 'body'],
    ['[1, 2]', 'body'],
    [{}, 'prompt'],
    [{ prompt: 7 }, 'prompt'],
    [{ prompt: 'x'.repeat(4001) }, 'prompt'],
    [{ prompt: 'a fox', n: 0 }, 'n'],
    [{ prompt: 'a fox', n: 99 }, 'n'],
    [{ prompt: 'a fox', n: 1.5 }, 'n'],
    [{ prompt: 'a fox', size: '12x12' }, 'size'],
    [{ prompt: 'a fox', size: 'big' }, 'size'],
    [{ prompt: 'a fox', kv_policy: 'nonsense:3' }, 'kv_policy'],
    [{ prompt: 'a fox', kv_policy: 'scalekv:plan=/etc/passwd' }, 'kv_policy'],
    [{ prompt: 'a fox', kv_dtype: 'int4' }, 'kv_dtype'],
    [{ prompt: 'a fox', cfg: 'high' }, 'cfg'],
    [{ prompt: 'a fox', seed: -1 }, 'seed'],
    [{ prompt: 'a fox', response_format: 'url' }, 'response_format'],
    [{ prompt: 'a fox', negative_prompt: ['blurry'] }, 'negative_prompt'],
  ];
  for (const [body, param] of cases) {
    const r = await post(server, '/v1/images/generations', body);
    t.is(r.status, 400, JSON.stringify(body).slice(0, 60));
    const e = (await r.json()) as { error: { param: string; type: string; message: string } };
    t.is(e.error.param, param, e.error.message);
    t.is(e.error.type, 'invalid_request_error');
  }
  for (const [method, path] of [['GET', '/v1/jobs/nope'], ['GET', '/v1/jobs/nope/events'], ['DELETE', '/v1/jobs/nope'], ['GET', '/v2/anything']]) {
    const r = await fetch(`${server.url}${path}`, { method });
    t.is(r.status, 404, `${method} ${path}`);
    t.is(((await r.json()) as { error: { type: string } }).error.type, 'not_found');
  }
  // One request runs, one waits (the queue holds one), the next is refused.
  const running = post(server, '/v1/images/generations', { prompt: 'a', size: '512x512' });
  await new Promise((r) => setTimeout(r, 50));
  const waiting = post(server, '/v1/images/generations', { prompt: 'b' });
  await new Promise((r) => setTimeout(r, 50));
  const refused = await post(server, '/v1/images/generations', { prompt: 'c' });
  t.is(refused.status, 429);
  t.true(Number(refused.headers.get('retry-after')) >= 1);
  t.is(((await refused.json()) as { error: { type: string } }).error.type, 'rate_limit_exceeded');
  t.is((await running).status, 200);
  t.is((await waiting).status, 200);
  t.is(metricValue(await metrics(server), 'scalekv_rejections_total{reason="queue_full"}'), 1);
  t.is((await fetch(`${server.url}/healthz`)).status, 200);
  t.is((await fetch(`${server.url}/readyz`)).status, 200);
});

test.serial('a request still unanswered after the timeout is a 504 and stops costing work', async (t) => {
  const server = await withServer(t, { batchWindowMs: 0, timeoutMs: 300 });
  const r = await post(server, '/v1/images/generations', { prompt: 'a castle', n: 4, size: '512x512' });
  t.is(r.status, 504);
  t.is(((await r.json()) as { error: { type: string } }).error.type, 'timeout');
  const m = await metrics(server);
  t.is(metricValue(m, 'scalekv_requests_total{outcome="failed"}'), 1);
  // Its batch was aborted (it had no other request): nothing of it reached the images counter.
  while (metricValue(await metrics(server), 'scalekv_batch_seconds_count') === 0) await new Promise((res) => setTimeout(res, 20));
  t.is(metricValue(await metrics(server), 'scalekv_images_total'), 0);
});

test.serial('SSE: queued, running, per-scale progress in order, done; DELETE mid-run cancels and the engine is back at its idle baseline', async (t) => {
  const server = await withServer(t, { batchWindowMs: 0 });
  const submit = async (body: unknown) => ((await (await post(server, '/v1/jobs', body)).json()) as { id: string }).id;
  const id = await submit({ prompt: 'a lighthouse', n: 2 });
  const events = await readEvents(`${server.url}/v1/jobs/${id}/events`);
  t.deepEqual(events.map((e) => (e.event === 'progress' ? `${e.data.stage} ${e.data.done}/${e.data.total}` : e.event)), [
    'queued', 'running', ...[1, 2, 3, 4, 5, 6, 7].map((s) => `sampling ${s}/7`), 'decode 1/1', 'done',
  ]);
  const done = events[events.length - 1].data as { state: string; result: { data: { b64_json: string }[] } };
  t.is(done.state, 'succeeded');
  t.is(done.result.data.length, 2);
  const record = (await (await fetch(`${server.url}/v1/jobs/${id}`)).json()) as { state: string; batch: { images: number } };
  t.is(record.state, 'succeeded');
  t.is(record.batch.images, 2);
  const engine = server.pipeline?.engine;
  if (!engine) return t.fail('no local engine');
  await engine.sync();
  const idle = engine.memory().inUse;
  t.is(metricValue(await metrics(server), 'scalekv_engine_bytes{category="kv"}'), 0);

  // Cancel at the third scale: the stream ends with done (cancelled), no images; the batch stops and frees its memory.
  const batchesBefore = metricValue(await metrics(server), 'scalekv_batch_seconds_count');
  const big = await submit({ prompt: 'a castle', n: 4, size: '512x512' });
  const seen = await readEvents(`${server.url}/v1/jobs/${big}/events`, (e) => {
    if (e.event === 'progress' && e.data.done === 3) void fetch(`${server.url}/v1/jobs/${big}`, { method: 'DELETE' });
  });
  const last = seen[seen.length - 1];
  t.is(last.event, 'done');
  t.like(last.data, { state: 'cancelled', result: null });
  t.false(seen.some((e) => e.event === 'progress' && e.data.stage === 'decode'), 'the cancelled batch was decoded');
  while (metricValue(await metrics(server), 'scalekv_batch_seconds_count') === batchesBefore) await new Promise((r) => setTimeout(r, 20));
  await engine.sync();
  t.deepEqual(engine.memory().inUse, idle);
  t.is(metricValue(await metrics(server), 'scalekv_requests_total{outcome="cancelled"}'), 1);

  // A client that disconnects from a waiting POST cancels it the same way.
  const ctl = new AbortController();
  const gone = post(server, '/v1/images/generations', { prompt: 'a fox', n: 4, size: '512x512' }, ctl.signal);
  setTimeout(() => ctl.abort(), 300);
  await t.throwsAsync(gone, { any: true });
  while (metricValue(await metrics(server), 'scalekv_requests_total{outcome="cancelled"}') < 2) await new Promise((r) => setTimeout(r, 20));
  t.is(metricValue(await metrics(server), 'scalekv_queue_depth'), 0);
});

test.serial('serve --demo: SIGTERM lets the running batch finish, then exits 0', async (t) => {
  const child = spawnCli(['serve', '--demo', '--backend', 'cpu', '--port', '0', '--batch-window-ms', '0']);
  t.teardown(() => void stopChild(child, 'SIGKILL'));
  let stdout = '';
  child.stdout?.on('data', (b: Buffer) => (stdout += b.toString()));
  const line = await waitForLine(child, /scalekv server listening/, 60_000);
  const url = (JSON.parse(line) as { url: string }).url;
  const { id } = (await (await fetch(`${url}/v1/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'a fox', n: 2, size: '512x512' }) })).json()) as { id: string };
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  const events = await readEvents(`${url}/v1/jobs/${id}/events`, (e) => {
    if (e.event === 'running') child.kill('SIGTERM');
  });
  t.like(events[events.length - 1].data, { state: 'succeeded' });
  t.is(await exited, 0);
  t.is(stdout, '', 'serve wrote to stdout');
});
