// Static memory plans: the packer against its invariants on random traces, and the engine placing a real workload
// (the tiny model's generation and decode) by plan on every backend: the same results, the reserved peak of the
// plan, a divergent plan falling back safely, and the arena living as long as its last tensor.
import test from 'ava';
import type { AllocationTrace } from '../lib/counting-device.js';
import { createEngine, type Engine } from '../lib/engine.js';
import { livePeak, packAllocations, planAllocations } from '../lib/memory-plan.js';
import { decodeImage, generate, vaeBatchWithin } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { VaeDecoder } from '../lib/model/vae.js';
import { kvPageTokensFor } from '../lib/kv/cache.js';
import { Rng, seedFor, syntheticText, testBackends, withEngine } from './helpers.js';

/** A random trace: allocations of 512-byte blocks made and released in a random interleaving, some never released. */
function randomTrace(rng: Rng, n: number): AllocationTrace {
  const trace: AllocationTrace = { sizes: [], start: [], end: [] };
  const live: number[] = [];
  let events = 0;
  while (trace.sizes.length < n || live.length) {
    if (trace.sizes.length < n && (live.length === 0 || rng.int(0, 2) > 0)) {
      trace.sizes.push(512 * (rng.int(0, 4) === 0 ? rng.int(1, 4000) : rng.int(1, 64)));
      trace.start.push(events++);
      trace.end.push(Infinity);
      live.push(trace.sizes.length - 1);
    } else {
      const i = live.splice(rng.int(0, live.length - 1), 1)[0];
      if (rng.int(0, 20) > 0 || trace.sizes.length < n) trace.end[i] = events++;
    }
  }
  return trace;
}

test('packAllocations: no two allocations alive at once overlap, every offset is aligned, the arena is near the live peak', (t) => {
  const rng = new Rng(seedFor(t));
  let worst = 1;
  for (let round = 0; round < 40; round++) {
    const trace = randomTrace(rng, rng.int(1, 400));
    const plan = packAllocations(trace);
    const n = trace.sizes.length;
    t.is(plan.offsets.length, n);
    t.is(plan.livePeak, livePeak(trace));
    t.true(plan.total >= plan.livePeak);
    for (let i = 0; i < n; i++) {
      t.is(plan.offsets[i] % 512, 0);
      t.true(plan.offsets[i] + trace.sizes[i] <= plan.total);
      for (let j = i + 1; j < n; j++) {
        const together = trace.start[i] < trace.end[j] && trace.start[j] < trace.end[i];
        const apart = plan.offsets[i] + trace.sizes[i] <= plan.offsets[j] || plan.offsets[j] + trace.sizes[j] <= plan.offsets[i];
        if (together && !apart) t.fail(`allocations ${i} and ${j} are alive together and overlap`);
      }
    }
    worst = Math.max(worst, plan.total / plan.livePeak);
  }
  t.log(`worst arena / live peak over 40 random traces: ${worst.toFixed(3)}`);
  // Random interleavings are harder than a generation's nested lifetimes (1.000 at both presets); still bounded.
  t.true(worst < 1.5, `arena ${worst.toFixed(3)}x the live peak`);
});

/** The tiny model's generation and decode on `e` (the given twin, or loaded weights), with the KV pages of `pagesOf`. */
async function tinyWork(e: Engine, o: { allocate: boolean; schedule: [number, number][]; pagesOf: string }) {
  const tiny = createTinyModel(4);
  const model = o.allocate ? await InfinityModel.allocate(e, tiny.config, { dtype: 'f32' }) : await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' });
  const decoder = new Map(tiny.vae.names.filter((n) => n.startsWith('decoder.')).map((x) => [x, tiny.vae.f32(x)]));
  const vae = o.allocate ? await VaeDecoder.allocate(e, tiny.vaeConfig) : await VaeDecoder.load(e, decoder, tiny.vaeConfig);
  const run = async () => {
    const r = await generate(model, { text: syntheticText(), schedule: o.schedule, cfg: 3, seed: 7, kvPageTokens: kvPageTokensFor(o.pagesOf) });
    try {
      return { pixels: (await decodeImage(vae, r.summedCodes)).pixels, bits: r.bits };
    } finally {
      r.summedCodes.dispose();
    }
  };
  return { run, dispose: () => (model.dispose(), vae.dispose()) };
}

/** The static plan of tinyWork on a 'count' twin of a `backend` engine (its page size: the plan must match its arena). */
async function tinyPlan(schedule: [number, number][], backend: string) {
  const count = await createEngine({ backend: 'count' });
  try {
    const twin = await tinyWork(count, { allocate: true, schedule, pagesOf: backend });
    return await planAllocations(count, async () => void (await twin.run()));
  } finally {
    count.dispose();
  }
}

const grids = scaleSchedule({ aspect: 1, pn: '0.06M' }).scales.map(([h, w]) => [h, w] as [number, number]);

for (const backend of testBackends()) {
  test(`${backend}: the tiny model's generation placed by its static plan gives the same images, reserving exactly the weights and the arena`, async (t) => {
    const plan = await tinyPlan(grids, backend);
    t.is(plan.total, plan.livePeak);
    await withEngine(backend, async (e) => {
      const work = await tinyWork(e, { allocate: false, schedule: grids, pagesOf: backend });
      try {
        const plain = await work.run();
        e.trimCache();
        await e.sync();
        const before = e.memory();
        const planned = await e.withMemoryPlan(plan, work.run);
        t.deepEqual(planned.plan, { placed: plan.sizes.length, diverged: false });
        t.deepEqual(planned.result.bits, plain.bits);
        t.true(Buffer.from(planned.result.pixels).equals(Buffer.from(plain.pixels)), 'the same image');
        const after = e.memory();
        // Nothing but the arena was reserved on top of the weights; with its last tensor it joined the cache, where
        // the next plan takes it back without a new allocation; trimCache() returns it.
        const arena = Math.ceil(plan.total / 512) * 512;
        t.is(after.reservedPeak, Math.max(before.reservedPeak, before.reserved + arena));
        t.is(after.reserved, before.reserved + arena);
        t.deepEqual(after.inUse, before.inUse);
        const again = await e.withMemoryPlan(plan, work.run);
        t.deepEqual(again.plan, { placed: plan.sizes.length, diverged: false });
        t.true(Buffer.from(again.result.pixels).equals(Buffer.from(plain.pixels)), 'the same image from the reused arena');
        t.is(e.memory().reserved, before.reserved + arena, 'the second plan reused the arena');
        t.is(e.memory().reservedPeak, after.reservedPeak);
        e.trimCache();
        await e.sync();
        t.is(e.memory().reserved, before.reserved);
        // A plan made for a shorter schedule: the work leaves it, the caching allocator serves the rest, all correct.
        const short = await tinyPlan(grids.slice(0, 4), backend);
        const diverged = await e.withMemoryPlan(short, work.run);
        t.true(diverged.plan.diverged);
        t.true(diverged.plan.placed >= 1);
        t.deepEqual(diverged.result.bits, plain.bits);
        // (A smaller plan takes a cached block as large as its arena, the full plan's.)
        t.true(Buffer.from(diverged.result.pixels).equals(Buffer.from(plain.pixels)));
        t.deepEqual(e.memory().inUse, before.inUse);
      } finally {
        work.dispose();
      }
    });
  });

  test(`${backend}: the arena lives as long as the last tensor placed in it; bad plans are refused`, async (t) => {
    await withEngine(backend, async (e) => {
      const plan = { sizes: [1024, 512], offsets: [0, 1024], total: 1536, livePeak: 1536 };
      e.trimCache();
      await e.sync();
      const base = e.memory().reserved;
      e.beginMemoryPlan(plan);
      const a = e.tensor(new Float32Array(256).fill(1.5), [256], 'f32');
      const b = e.tensor(new Float32Array(100).fill(-2), [100], 'f32');
      const c = e.tensor(new Float32Array(10).fill(3), [10], 'f32');  // past the plan: the caching allocator
      t.deepEqual(e.endMemoryPlan(), { placed: 2, diverged: true });
      t.is(e.memory().reserved, base + 1536 + 512);
      a.dispose();
      c.dispose();
      await e.sync();
      t.deepEqual(Array.from((await b.read()) as Float32Array), new Array(100).fill(-2), 'a placed tensor outlives its plan');
      t.is(e.memory().reserved, base + 1536 + 512, 'the arena stays while b lives (c is cached)');
      b.dispose();
      e.trimCache();
      await e.sync();
      t.is(e.memory().reserved, base, 'the arena went with its last tensor');
      // A plan whose next placement would overlap a tensor still alive (here: another stretch of work on the engine
      // kept it) is left, not overrun: the allocation comes from the caching allocator, and both keep their data.
      e.beginMemoryPlan({ sizes: [1024, 1024], offsets: [0, 0], total: 1024, livePeak: 1024 });
      const first = e.tensor(new Float32Array(256).fill(7), [256], 'f32');
      const second = e.tensor(new Float32Array(256).fill(-3), [256], 'f32');
      t.deepEqual(e.endMemoryPlan(), { placed: 1, diverged: true });
      t.deepEqual(Array.from((await first.read()) as Float32Array), new Array(256).fill(7));
      t.deepEqual(Array.from((await second.read()) as Float32Array), new Array(256).fill(-3));
      first.dispose();
      second.dispose();
      for (const bad of [
        { sizes: [512], offsets: [100], total: 1024 },
        { sizes: [1024], offsets: [512], total: 1024 },
        { sizes: [512, 512], offsets: [0], total: 1024 },
        { sizes: [0], offsets: [0], total: 1024 },
      ])
        t.throws(() => e.beginMemoryPlan({ ...bad, livePeak: 0 }), { code: 'ERR_INVALID_ARG' }, JSON.stringify(bad));
      t.deepEqual(e.endMemoryPlan(), { placed: 0, diverged: false });
    });
  });
}

for (const backend of testBackends()) {
  test(`${backend}: decodeImage in slices (vaeBatch) gives the pixels and float image of the whole batch, with a lower peak`, async (t) => {
    const rng = new Rng(seedFor(t));
    const tiny = createTinyModel(rng.int(0, 1000));
    const decoder = new Map(tiny.vae.names.filter((n) => n.startsWith('decoder.')).map((x) => [x, tiny.vae.f32(x)]));
    const [B, d, h, w] = [5, tiny.vaeConfig.codebookDim, 4, 6];
    const latent = rng.normals(B * d * h * w, 0.7);
    await withEngine(backend, async (e) => {
      const vae = await VaeDecoder.load(e, decoder, tiny.vaeConfig);
      const codes = e.tensor(latent, [B, d, h, w], 'f32');
      try {
        const whole = await decodeImage(vae, codes, { float: true });
        for (const vaeBatch of [1, 2, 3]) {
          const sliced = await decodeImage(vae, codes, { float: true, vaeBatch });
          t.deepEqual(sliced.shape, whole.shape);
          t.true(Buffer.from(sliced.pixels).equals(Buffer.from(whole.pixels)), `vaeBatch ${vaeBatch}: pixels`);
          t.deepEqual(sliced.float, whole.float, `vaeBatch ${vaeBatch}: float image`);
        }
        await t.throwsAsync(decodeImage(vae, codes, { vaeBatch: 0 }), { code: 'ERR_INVALID_ARG' });
      } finally {
        codes.dispose();
        vae.dispose();
      }
    });
    // The decode's own peak, on a counting twin: one image at a time holds one image's activations.
    const count = await createEngine({ backend: 'count' });
    try {
      const vae = await VaeDecoder.allocate(count, tiny.vaeConfig);
      const codes = count.empty([B, d, h, w], 'f32');
      const peak = async (vaeBatch: number) => (await planAllocations(count, async () => void (await decodeImage(vae, codes, { vaeBatch })))).livePeak;
      const [single, all] = [await peak(1), await peak(B)];
      t.true(single * 3 < all, `decode peak ${single} bytes one image at a time, ${all} for ${B}`);
    } finally {
      count.dispose();
    }
    const one = await vaeBatchWithin(tiny.vaeConfig, { shape: [B, d, h, w], dtype: 'f32' }, 0);
    t.is(one, 1, 'no budget: one image at a time');
    t.is(await vaeBatchWithin(tiny.vaeConfig, { shape: [B, d, h, w], dtype: 'f32' }, Infinity), B, 'any budget: the whole batch');
  });
}
