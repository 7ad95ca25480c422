// The batcher alone, with a stand-in for the model: packing by key up to the max batch, fairness across keys,
// cancellation of waiting and running requests, the bounded queue, draining.
import test from 'ava';
import { ApiError } from '../lib/serve/api-error.js';
import { Batcher, type BatchContext } from '../lib/serve/batcher.js';
import { ScaleKVError } from '../lib/errors.js';

interface Req {
  key: string;
  n: number;
  name: string;
}

/** A batcher whose batches take `ms` (or until their signal aborts) and return each request's name. */
function batcher(o: { maxBatch?: number; windowMs?: number; maxQueue?: number; ms?: number } = {}) {
  const batches: { names: string[]; ctx: BatchContext }[] = [];
  const b = new Batcher<Req, string>({
    maxBatch: o.maxBatch ?? 4,
    windowMs: o.windowMs ?? 30,
    maxQueue: o.maxQueue ?? 100,
    keyOf: (r) => (r.key === 'alone' ? undefined : r.key),
    sizeOf: (r) => r.n,
    run: (reqs, ctx) => {
      batches.push({ names: reqs.map((r) => r.name), ctx });
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => resolve(reqs.map((r) => r.name)), o.ms ?? 30);
        ctx.signal.addEventListener('abort', () => {
          clearTimeout(timer);
          reject(new ScaleKVError('ERR_ABORTED', 'aborted', { cause: ctx.signal.reason }));
        });
      });
    },
  });
  return { b, batches };
}

const req = (name: string, key = 'a', n = 1): Req => ({ key, n, name });

test('requests of one key share a batch up to the max images; other keys and seeded requests get their own', async (t) => {
  const { b, batches } = batcher({ maxBatch: 4 });
  const results = await Promise.all([
    b.add(req('a1', 'a', 2)), b.add(req('a2')), b.add(req('b1', 'b')), b.add(req('a3')), b.add(req('a4')), b.add(req('s1', 'alone')),
  ]);
  t.deepEqual(results.map((r) => r.result), ['a1', 'a2', 'b1', 'a3', 'a4', 's1']);
  t.deepEqual(batches.map((x) => x.names), [['a1', 'a2', 'a3'], ['b1'], ['a4'], ['s1']]);
  t.like(results[0].batch, { images: 4, requests: 3 });
});

test('the oldest request goes first across keys: a busy key does not starve another', async (t) => {
  const { b, batches } = batcher({ maxBatch: 2, windowMs: 0 });
  const all = [b.add(req('a1')), b.add(req('b1', 'b')), b.add(req('a2')), b.add(req('a3')), b.add(req('a4')), b.add(req('a5'))];
  await Promise.all(all);
  // a1 and a2 go together (a1 is oldest), then b1 (now oldest), then the rest of a.
  t.deepEqual(batches.map((x) => x.names), [['a1', 'a2'], ['b1'], ['a3', 'a4'], ['a5']]);
});

test('cancelled while waiting: out of the queue at once; while running: answered ERR_ABORTED, its row dropped, the batch aborted only when all are', async (t) => {
  const { b, batches } = batcher({ windowMs: 0, ms: 200 });
  const c1 = new AbortController();
  const c2 = new AbortController();
  const first = b.add(req('r1'), { signal: c1.signal });
  const second = b.add(req('r2'), { signal: c2.signal });
  const positions: number[] = [];
  const c3 = new AbortController();
  const waiting = b.add(req('w', 'b'), { signal: c3.signal, onPosition: (p) => positions.push(p) });
  await new Promise((r) => setTimeout(r, 20));
  t.is(b.waiting, 1);
  c3.abort();
  t.is(b.waiting, 0);
  t.is(((await t.throwsAsync(waiting)) as ScaleKVError).code, 'ERR_ABORTED');
  c1.abort();
  t.is(((await t.throwsAsync(first)) as ScaleKVError).code, 'ERR_ABORTED');
  t.false(batches[0].ctx.signal.aborted, 'the batch stopped while a request still wanted it');
  t.is((await second).result, 'r2');

  const c4 = new AbortController();
  const c5 = new AbortController();
  const both = [b.add(req('x1'), { signal: c4.signal }), b.add(req('x2'), { signal: c5.signal })];
  await new Promise((r) => setTimeout(r, 20));
  c4.abort();
  c5.abort();
  for (const p of both) await t.throwsAsync(p);
  t.true(batches[batches.length - 1].ctx.signal.aborted, 'a batch nobody wants kept running');
  t.deepEqual(positions, [2, 0], 'two ahead of it, then none once their batch started');
});

test('a full queue refuses at once with 429 and Retry-After; close answers the waiting 503 and lets the running batch finish', async (t) => {
  const { b } = batcher({ windowMs: 0, maxQueue: 1, ms: 100 });
  const running = b.add(req('r'));
  await new Promise((r) => setTimeout(r, 10));
  const waiting = b.add(req('w', 'b'));
  const refused = t.throws(() => b.add(req('x')), { instanceOf: ApiError }) as ApiError;
  t.is(refused.status, 429);
  t.true((refused.retryAfter ?? 0) >= 1);
  await b.close();
  t.is((await running).result, 'r');
  t.is(((await t.throwsAsync(waiting)) as ApiError).status, 503);
  t.is((t.throws(() => b.add(req('y')), { instanceOf: ApiError }) as ApiError).status, 503);
});
