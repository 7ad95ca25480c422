// The addon is context-aware: the main thread and worker threads each load it into their own environment (their
// own classes, as napi instance data) and run engines side by side; an environment that ends (a worker exiting)
// leaves the others working. Before, the classes were per-process statics: a worker's load replaced the main
// thread's, and once the worker was gone the main thread built tensors through a dead reference.
import test from 'ava';
import { Worker } from 'node:worker_threads';
import { loadNative } from '../lib/native.js';
import { Rng, seedFor, testBackends, withEngine } from './helpers.js';

// A worker: its own engine, `rounds` adds of its own data, the sums back to the parent, then exit.
const WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const addon = require(workerData.path);
const engine = new addon.NativeEngine(workerData.backend, 1);
(async () => {
  const x = Float32Array.from(workerData.x);
  const a = engine.tensor('f32', [x.length], x);
  const out = engine.tensor('f32', [x.length]);
  let sum = a;
  for (let i = 0; i < workerData.rounds; i++) {
    engine.add({ a: sum, b: a, out });
    await engine.sync();
    sum = engine.tensor('f32', [x.length], new Float32Array(await out.read()));
  }
  parentPort.postMessage(Array.from(new Float32Array(await sum.read())));
  engine.dispose();
})().catch((e) => parentPort.postMessage({ error: String(e && e.code) + ': ' + e.message }));
`;

function runWorker(backend: string, x: Float32Array, rounds: number): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const w = new Worker(WORKER, { eval: true, workerData: { path: loadNative().path, backend, x: Array.from(x), rounds } });
    let result: unknown;
    w.on('message', (m) => (result = m));
    w.on('error', reject);
    w.on('exit', (code) => {
      if (code !== 0) reject(new Error(`worker exited with ${code}`));
      else if (!Array.isArray(result)) reject(new Error(`worker: ${JSON.stringify(result)}`));
      else resolve(result as number[]);
    });
  });
}

for (const backend of testBackends().filter((b) => b !== 'cuda')) {
  test(`${backend}: the addon runs in three worker threads and the main thread at once, and the main thread keeps working after they exit`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const inputs = [0, 1, 2].map(() => rng.normals(257));
      const main = e.tensor(rng.normals(257), [257], 'f32');
      const workers = inputs.map((x, i) => runWorker(backend, x, i + 2));
      const results = await Promise.all(workers);
      results.forEach((r, i) => {
        // (i + 3) x, summed in f32 one add at a time.
        const want = Array.from(inputs[i], (v) => {
          let s = v;
          for (let k = 0; k < i + 2; k++) s = Math.fround(s + v);
          return s;
        });
        t.deepEqual(r, want, `worker ${i}`);
      });
      // Every worker's environment is gone: the main thread's classes must be its own.
      const out = e.empty([257], 'f32');
      e.ops.add({ a: main, b: main, out });
      const mv = (await main.read()) as Float32Array;
      t.deepEqual(await out.read(), Float32Array.from(mv, (v) => Math.fround(v + v)));
      t.is(out.view([1, 257]).shape.join(','), '1,257');
      main.dispose();
      out.dispose();
      // And a worker started after the others ended loads the addon anew.
      t.is((await runWorker(backend, Float32Array.of(1.5), 1))[0], 3);
    });
  });
}
