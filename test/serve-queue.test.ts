// `serve --redis` with two `scalekv worker --demo` processes on a redis-server of the test's own (loopback, a free
// port): jobs are batched on the workers, and a worker killed mid-job (SIGKILL) loses its jobs to the other one,
// each of which completes exactly once.
import test from 'ava';
import type { ChildProcess } from 'node:child_process';
import { QueueEvents } from 'bullmq';
import OpenAI from 'openai';
import { decodePng } from '../lib/image/png.js';
import { createServer } from '../lib/serve/index.js';
import { readEvents, redisServerInstalled, spawnCli, startRedis, stopChild, waitForLine } from './serve-helpers.js';

const installed = redisServerInstalled();
const name = 'two workers on one queue: a worker killed mid-job (SIGKILL) hands its jobs to the other; every job completes exactly once' +
  (installed ? '' : ' (skipped: redis-server is not installed; apt-get install redis-server)');

(installed ? test.serial : test.serial.skip)(name, async (t) => {
  const redis = await startRedis();
  t.teardown(() => redis.stop());
  const queue = 'scalekv-test';
  // A short lock, so the dead worker's jobs go back to the queue within seconds; not shorter: a live worker renews
  // it from its event loop, which PNG encoding on two busy cores can hold for over a second.
  const workerArgs = ['worker', '--redis', redis.url, '--queue', queue, '--demo', '--backend', 'cpu', '--lock-ms', '5000', '--max-batch', '4'];
  const workers: ChildProcess[] = [spawnCli(workerArgs), spawnCli(workerArgs)];
  for (const w of workers) t.teardown(() => void stopChild(w, 'SIGKILL'));
  await Promise.all(workers.map((w) => waitForLine(w, /worker ready/, 60_000)));
  const server = await createServer({ redis: redis.url, queue, tinyWorkers: true, port: 0, logger: false });
  t.teardown(() => server.close());
  const completions = new Map<string, number>();
  const events = new QueueEvents(queue, { connection: { url: redis.url } });
  t.teardown(() => events.close());
  await events.waitUntilReady();
  events.on('completed', ({ jobId }) => completions.set(jobId, (completions.get(jobId) ?? 0) + 1));

  // The OpenAI path through the queue.
  const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  const r = await client.images.generate({ prompt: 'a red fox', n: 2, size: '256x256' });
  t.is(r.data?.length, 2);
  t.deepEqual([decodePng(Buffer.from(r.data?.[0].b64_json as string, 'base64')).width], [256]);

  const ids = await Promise.all([1, 2, 3].map(async (i) => {
    const res = await fetch(`${server.url}/v1/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: `a castle ${i}`, n: 2, size: '512x512' }) });
    t.is(res.status, 202);
    return ((await res.json()) as { id: string }).id;
  }));
  let killed: number | undefined;
  const streams = await Promise.all(ids.map((id) => readEvents(`${server.url}/v1/jobs/${id}/events`, (e) => {
    if (e.event !== 'running' || killed !== undefined) return;
    // The batch id names the worker that holds the job: host:pid#batch.
    killed = Number(/:(\d+)#/.exec((e.data.batch as { id: string }).id)?.[1]);
    const victim = workers.find((w) => w.pid === killed);
    t.truthy(victim, `no worker with pid ${killed}`);
    victim?.kill('SIGKILL');
  })));
  t.truthy(killed);
  for (const s of streams) {
    t.is(s.filter((e) => e.event === 'done').length, 1);
    const done = s[s.length - 1].data as { state: string; result: { data: { b64_json: string }[] } };
    t.is(done.state, 'succeeded', JSON.stringify(done).slice(0, 300));
    t.is(done.result.data.length, 2);
    for (const d of done.result.data) t.is(decodePng(Buffer.from(d.b64_json, 'base64')).width, 512);
  }
  const retried = streams.filter((s) => s.filter((e) => e.event === 'running').length > 1).length;
  t.true(retried >= 1, 'no job was retried after the kill');
  t.log(`${retried} of 3 jobs were retried by the surviving worker`);
  // BullMQ's own record: each job completed once.
  await new Promise((res) => setTimeout(res, 200));
  for (const id of ids) t.is(completions.get(id), 1, `job ${id} completed ${completions.get(id) ?? 0} times`);
  // Cancelled while the surviving worker runs it: the client sees 'cancelled', never the images that worker makes.
  const res = await fetch(`${server.url}/v1/jobs`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'a lake', n: 2, size: '512x512' }) });
  const cancelled = ((await res.json()) as { id: string }).id;
  const seen = await readEvents(`${server.url}/v1/jobs/${cancelled}/events`, (e) => {
    if (e.event === 'progress' && e.data.done === 2) void fetch(`${server.url}/v1/jobs/${cancelled}`, { method: 'DELETE' });
  });
  t.like(seen[seen.length - 1].data, { state: 'cancelled', result: null });
  await new Promise((r) => setTimeout(r, 500));
  t.like(await (await fetch(`${server.url}/v1/jobs/${cancelled}`)).json(), { state: 'cancelled', result: null });
  t.is(completions.get(cancelled), undefined, 'the worker completed a cancelled job');
  const survivor = workers.find((w) => w.pid !== killed) as ChildProcess;
  t.is(await stopChild(survivor, 'SIGTERM'), 0);
});
