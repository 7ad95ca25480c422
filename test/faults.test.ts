// Faults injected into whole generations: an abort (AbortSignal) at every scale and an out-of-memory (the engine's
// memoryLimit, the cache emptied so the next new block fails) at every scale and at random (scale, layer) points,
// and an out-of-memory while a checkpoint loads. Each ends with its coded error, the engine's live bytes back to the
// model's weights, and the next generation on the same engine bit-identical to one on a fresh engine.
import test, { type ExecutionContext } from 'ava';
import { createEngine, type Engine } from '../lib/engine.js';
import { FullKvPolicy } from '../lib/kv/baselines.js';
import { generate, type GenerateObserver } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { resolvePolicy } from '../lib/kv/resolve.js';
import { Rng, seedFor, syntheticText, testBackends } from './helpers.js';

const tiny = createTinyModel(7);
const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' }).scales;
const S = schedule.length;

async function run(model: InfinityModel, observer?: GenerateObserver, signal?: AbortSignal, policy = 'full') {
  const kvPolicy = policy === 'full' ? new FullKvPolicy() : resolvePolicy(policy, { depth: tiny.config.depth });
  const r = await generate(model, { text: syntheticText('a lighthouse'), schedule, cfg: 3, seed: 5, kvPolicy, observer, signal });
  try {
    return { bits: r.bits, codes: (await r.summedCodes.read()) as Float32Array };
  } finally {
    r.summedCodes.dispose();
  }
}

/** The generation a fresh engine makes, per (backend, policy). */
const fresh = new Map<string, Promise<Awaited<ReturnType<typeof run>>>>();
function freshRun(backend: 'cpu' | 'emu', policy: string) {
  const key = `${backend} ${policy}`;
  if (!fresh.has(key))
    fresh.set(key, (async () => {
      const e = await createEngine({ backend, threads: 2 });
      try {
        return await run(await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'bf16' }), undefined, undefined, policy);
      } finally {
        e.dispose();
      }
    })());
  return fresh.get(key) as Promise<Awaited<ReturnType<typeof run>>>;
}

/** After a failed generation: only the weights are live, and the next generation is a fresh engine's. */
async function recovered(t: ExecutionContext, e: Engine, model: InfinityModel, weights: number, what: string, policy = 'full') {
  await e.sync().catch(() => undefined);
  t.is(e.memory().totalInUse, weights, `${what}: live bytes back to the weights`);
  const again = await run(model, undefined, undefined, policy);
  const want = await freshRun(e.backend as 'cpu' | 'emu', policy);
  t.deepEqual(again.bits, want.bits, `${what}: the next generation's bits are a fresh engine's`);
  t.deepEqual(again.codes, want.codes, `${what}: and so are its codes`);
}

for (const backend of testBackends().filter((b): b is 'cpu' | 'emu' => b !== 'cuda')) {
  // The emulator runs a generation in ~10 s: one scale there (the CPU takes them all, and random layers).
  const scales = Array.from({ length: S }, (_, i) => i).filter((si) => backend === 'cpu' || si === S - 3);

  test(`${backend}: an abort at every scale rejects with ERR_ABORTED, frees the generation, and the engine generates on as a fresh one`, async (t) => {
    const e = await createEngine({ backend, threads: 2 });
    try {
      const model = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'bf16' });
      const weights = e.memory().totalInUse;
      for (const si of scales) {
        const stop = new AbortController();
        const observer: GenerateObserver = { onScaleInput: (s) => void (s === si && stop.abort(new Error(`scale ${si}`))) };
        const err = await t.throwsAsync(run(model, observer, stop.signal), { code: 'ERR_ABORTED' }, `abort at scale ${si}`);
        t.is((err?.cause as Error | undefined)?.message, `scale ${si}`, 'the cause is the signal\'s reason');
        await recovered(t, e, model, weights, `abort at scale ${si}`);
      }
    } finally {
      e.dispose();
    }
  });

  test(`${backend}: out of device memory at every scale and at random layers (memoryLimit) rejects with ERR_OUT_OF_MEMORY and recovers exactly`, async (t) => {
    const rng = new Rng(seedFor(t));
    const e = await createEngine({ backend, threads: 2 });
    try {
      const model = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'bf16' });
      const weights = e.memory().totalInUse;
      // A full device from this point: the cache given back (in queue order, hence the sync), then no new block fits.
      const exhaust = async () => {
        e.trimCache();
        await e.sync();
        e.setMemoryLimit(e.memory().reserved);
      };
      const points: [string, GenerateObserver, string][] = scales.map((si) => [`scale ${si}`, { onScaleInput: async (s) => (s === si ? exhaust() : undefined) }, 'full']);
      for (let i = 0; i < (backend === 'cpu' ? 4 : 0); i++) {
        const [si, layer] = [rng.int(0, S - 1), rng.int(0, tiny.config.depth - 1)];
        // ScaleKV too: its selection and eviction allocate between the layers.
        points.push([`scale ${si} layer ${layer}`, { onLayer: async (s, l) => (s === si && l === layer ? exhaust() : undefined) }, i % 2 ? 'scalekv:30%' : 'full']);
      }
      for (const [where, observer, policy] of points) {
        await t.throwsAsync(run(model, observer, undefined, policy), { code: 'ERR_OUT_OF_MEMORY' }, `OOM at ${where} (${policy})`);
        e.setMemoryLimit(undefined);
        await recovered(t, e, model, weights, `OOM at ${where} (${policy})`, policy);
      }
    } finally {
      e.dispose();
    }
  });
}

test('cpu: a checkpoint that does not fit (memoryLimit) fails to load with ERR_OUT_OF_MEMORY and leaves nothing allocated', async (t) => {
  const probe = await createEngine({ backend: 'cpu', threads: 2 });
  const model = await InfinityModel.load(probe, tiny.weights, tiny.config, { dtype: 'f32' });
  const weights = probe.memory().totalInUse;
  model.dispose();
  probe.dispose();
  for (const fraction of [0.1, 0.5, 0.9]) {
    const e = await createEngine({ backend: 'cpu', threads: 2, memoryLimit: Math.floor(weights * fraction) });
    try {
      await t.throwsAsync(InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' }), { code: 'ERR_OUT_OF_MEMORY', message: /memoryLimit/ }, `${fraction} of the weights`);
      await e.sync().catch(() => undefined);
      t.is(e.memory().totalInUse, 0, `${fraction}: nothing left allocated`);
      e.setMemoryLimit(undefined);
      t.truthy(await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' }), 'without the limit it loads');
    } finally {
      e.dispose();
    }
  }
  await t.throwsAsync(createEngine({ backend: 'cpu', memoryLimit: -1 }), { code: 'ERR_INVALID_ARG' });
  await t.throwsAsync(createEngine({ backend: 'count', memoryLimit: 1.5 }), { code: 'ERR_INVALID_ARG' });
});

test('count: memoryLimit fails the same allocation as on the CPU engine', async (t) => {
  const sizes = [1000, 5000, 300, 70000, 4096, 12345];
  const outcome = async (backend: 'cpu' | 'count') => {
    const e = await createEngine({ backend, threads: 1, memoryLimit: 60000 });
    try {
      return sizes.map((n) => {
        try {
          e.empty([n], 'f32');
          return 'ok';
        } catch (err) {
          return (err as { code?: string }).code;
        }
      });
    } finally {
      e.dispose();
    }
  };
  const cpu = await outcome('cpu');
  t.deepEqual(await outcome('count'), cpu);
  t.true(cpu.includes('ERR_OUT_OF_MEMORY') && cpu.includes('ok'));
});

test('cpu: generations started from several async contexts at once on one engine each equal their run alone; disposing the engine mid-run rejects them with ERR_DISPOSED', async (t) => {
  const e = await createEngine({ backend: 'cpu', threads: 2 });
  const model = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'bf16' });
  const one = async (seed: number) => {
    const r = await generate(model, { text: syntheticText(`prompt ${seed}`), schedule, cfg: 3, seed, kvPolicy: resolvePolicy('scalekv:30%', { depth: tiny.config.depth }) });
    try {
      return { bits: r.bits, codes: (await r.summedCodes.read()) as Float32Array };
    } finally {
      r.summedCodes.dispose();
    }
  };
  const alone = [];
  for (const seed of [1, 2, 3]) alone.push(await one(seed));
  const together = await Promise.all([1, 2, 3].map((seed) => one(seed)));
  t.deepEqual(together, alone, 'interleaved on one queue, each generation is its own');

  // Disposed while three generations have work queued: each rejects with a code, nothing hangs or crashes.
  const running = [4, 5, 6].map((seed) => one(seed).then(() => 'finished', (err: { code?: string }) => err.code));
  await new Promise((resolve) => setTimeout(resolve, 5));
  e.dispose();
  const outcomes = await Promise.all(running);
  t.true(outcomes.every((o) => o === 'ERR_DISPOSED' || o === 'finished'), outcomes.join(', '));
  t.true(outcomes.includes('ERR_DISPOSED'), `at least one was cut short: ${outcomes.join(', ')}`);
  const next = await createEngine({ backend: 'cpu', threads: 2 });
  t.is(next.memory().totalInUse, 0);
  next.dispose();
});
