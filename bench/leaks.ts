// Leaks over many generations: the built-in tiny model through the Pipeline (T5 prompt encoding, sampling with
// ScaleKV, VAE decode, PNG), N generations in a loop on one engine, with the process RSS, the V8 heap and the
// engine's live and reserved bytes sampled after each. Prints the least-squares slope of each over the second half
// (after warm-up: caches, JIT, allocator pools) in bytes per generation, and the samples' range.
// `npm run bench:leaks [-- --generations 200] [--backend cpu]`.
import { parseArgs } from 'node:util';
import type { BackendChoice } from '../lib/engine.js';
import { Pipeline } from '../lib/pipeline.js';

const { values } = parseArgs({
  args: process.argv.slice(2),
  options: { generations: { type: 'string', default: '200' }, backend: { type: 'string', default: 'cpu' } },
});
const n = Number(values.generations);
const pipe = await Pipeline.load({ backend: values.backend as BackendChoice });
const series: Record<string, number[]> = { rss: [], heapUsed: [], external: [], engineLive: [], engineReserved: [] };
const started = performance.now();
for (let i = 0; i < n; i++) {
  const r = await pipe.generate({ prompts: [`a lighthouse number ${i % 7}`], seed: i, kv: 'scalekv:30%', png: true });
  if (r.images.length !== 1 || !r.images[0].png) throw new Error('no image');
  const m = process.memoryUsage();
  series.rss.push(m.rss);
  series.heapUsed.push(m.heapUsed);
  series.external.push(m.external + m.arrayBuffers);
  series.engineLive.push(r.memory.totalInUse);
  series.engineReserved.push(r.memory.reserved);
}
const seconds = (performance.now() - started) / 1000;
await pipe.dispose();

/** Least-squares slope of ys over their index. */
function slope(ys: number[]): number {
  const k = ys.length;
  const mx = (k - 1) / 2;
  const my = ys.reduce((a, b) => a + b, 0) / k;
  let num = 0;
  let den = 0;
  ys.forEach((y, x) => {
    num += (x - mx) * (y - my);
    den += (x - mx) ** 2;
  });
  return den ? num / den : 0;
}

const KiB = (b: number) => `${(b / 1024).toFixed(1)} KiB`;
const lines = [`# ${n} generations, tiny model, backend ${values.backend}, ${seconds.toFixed(1)} s (${(seconds / n * 1000).toFixed(0)} ms each)`, '| series | slope over the second half, per generation | min .. max over it |', '|---|---:|---|'];
for (const [name, ys] of Object.entries(series)) {
  const tail = ys.slice(Math.floor(ys.length / 2));
  lines.push(`| ${name} | ${(slope(tail) / 1024).toFixed(2)} KiB | ${KiB(Math.min(...tail))} .. ${KiB(Math.max(...tail))} |`);
}
process.stdout.write(lines.join('\n') + '\n');
