// Pipeline: load once, generate many. It must equal the lower-level path (generate + decodeImage) bit for bit,
// cancel through its AbortSignal without leaking, and free everything on dispose.
import test from 'ava';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createEngine, Engine, MemoryCategory, Tensor } from '../lib/engine.js';
import { ScaleKVError } from '../lib/errors.js';
import { decodePng } from '../lib/image/png.js';
import { kvPolicyFromSpec } from '../lib/kv/spec.js';
import { decodeImage, generate } from '../lib/model/generate.js';
import { InfinityModel, TextFeatures } from '../lib/model/infinity.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel, TinyModel } from '../lib/model/tiny.js';
import { T5TextEncoder } from '../lib/text/t5-encoder.js';
import { VaeDecoder } from '../lib/model/vae.js';
import { Pipeline } from '../lib/pipeline.js';
import { writeTinyModelFiles } from './checkpoint-writers.js';
import { Rng, seedFor, testBackends, withEngine } from './helpers.js';

const WORDS = ['a', 'red', 'fox', 'lighthouse', 'at', 'dawn', 'bowl', 'of', 'fruit', 'city', 'rain', 'snow', 'castle', 'lake', 'blue'];

function randomPrompt(rng: Rng): string {
  return Array.from({ length: rng.int(1, 7) }, () => rng.pick(WORDS)).join(' ');
}

/** Each prompt's features `batch` times in a row, built independently of the Pipeline's helpers. */
function repeated(features: TextFeatures[], batch: number): TextFeatures {
  const parts = features.flatMap((f) => new Array<TextFeatures>(batch).fill(f));
  const kv = new Float32Array(parts.reduce((n, p) => n + p.kv.length, 0));
  parts.reduce((at, p) => (kv.set(p.kv, at), at + p.kv.length), 0);
  return { kv, lens: parts.map((p) => p.lens[0]) };
}

/** The tiny T5's features of each prompt, through the encoder directly (all prompts in one pass, as the Pipeline). */
async function t5Features(e: Engine, tiny: TinyModel, prompts: string[]): Promise<TextFeatures[]> {
  const encoder = await T5TextEncoder.load(e, tiny.t5, tiny.tokenizer);
  try {
    const all = await encoder.encode(prompts);
    const d = tiny.t5.config.dModel;
    let at = 0;
    return all.lens.map((n) => ({ kv: all.kv.slice(at * d, (at += n) * d), lens: [n] }));
  } finally {
    encoder.dispose();
  }
}

async function lowLevel(e: Engine, tinySeed: number, o: { prompts: string[]; batch: number; seed: number; aspect: number; kv: string; negative?: string }): Promise<{ pixels: Uint8Array; shape: number[]; kvBytes: number }> {
  const tiny = createTinyModel(tinySeed);
  const text = repeated(await t5Features(e, tiny, o.prompts), o.batch);
  const negativeText = o.negative === undefined ? undefined : repeated(await t5Features(e, tiny, o.prompts.map(() => o.negative as string)), o.batch);
  const model = await InfinityModel.load(e, tiny.weights, tiny.config);
  const decoder = new Map(tiny.vae.names.filter((n) => n.startsWith('decoder.')).map((n) => [n, tiny.vae.f32(n)]));
  const vae = await VaeDecoder.load(e, decoder, tiny.vaeConfig);
  try {
    const r = await generate(model, {
      textFeatures: text,
      negativeText,
      schedule: scaleSchedule({ aspect: o.aspect, pn: '0.06M' }).scales,
      cfg: 3,
      tau: 1,
      seed: o.seed,
      kvPolicy: kvPolicyFromSpec(o.kv, { depth: tiny.config.depth }),
    });
    try {
      const img = await decodeImage(vae, r.summedCodes);
      return { pixels: img.pixels, shape: img.shape, kvBytes: r.kvBytes };
    } finally {
      r.summedCodes.dispose();
    }
  } finally {
    model.dispose();
    vae.dispose();
  }
}

const inUseTotal = (e: Engine) => Object.values(e.memory().inUse).reduce((a, b) => a + b, 0);

// The cheap case runs on every backend; the CPU also takes a batch, two prompts, a tall aspect and a KV policy spec.
const CASES = [
  { name: 'one prompt, full cache', prompts: 1, batch: 1, aspect: '1', kv: 'full', backends: 'all', negative: undefined },
  { name: 'two prompts x batch 2, aspect 3:4, streamingllm:4+60, a negative prompt', prompts: 2, batch: 2, aspect: '3:4', kv: 'streamingllm:4+60', backends: 'cpu', negative: 'blurry dark' },
] as const;

// Reads of the engines a test watches, logged in order (one wrapper for the file: its tests run concurrently).
const readLogs = new Map<Engine, string[]>();
const readRaw = Tensor.prototype.readRaw;
Tensor.prototype.readRaw = function (this: Tensor) {
  readLogs.get(this.engine as Engine)?.push('read');
  return readRaw.call(this);
};

for (const backend of testBackends()) {
  test(`${backend}: generate queues scale after scale without waiting for the device, reports progress from markers once per scale in order, and samples the bits of a loop that drains every scale`, async (t) => {
    await withEngine(backend, async (e) => {
      const tiny = createTinyModel(5);
      const [textFeatures] = await t5Features(e, tiny, ['a red fox at dawn']);
      const model = await InfinityModel.load(e, tiny.weights, tiny.config);
      const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' }).scales.slice(0, 6);
      const S = schedule.length;
      const base = { textFeatures, schedule, cfg: 3, seed: 11 };
      // What the loop waits for: every sync and read of this engine, in order with the scales and progress.
      const log: string[] = [];
      readLogs.set(e, log);
      const sync = e.sync;
      e.sync = () => (log.push('sync'), sync.call(e));
      try {
        const r = await generate(model, {
          ...base,
          observer: { onScaleInput: (si) => void log.push(`scale ${si}`) },
          onProgress: (si, total) => (t.is(total, S), void log.push(`progress ${si}`)),
        });
        readLogs.delete(e);
        e.sync = sync;
        const progress = log.filter((x) => x.startsWith('progress'));
        t.deepEqual(progress, schedule.map((_, si) => `progress ${si}`), 'once per scale, in order');
        t.false(log.includes('sync'), log.join(', '));
        t.true(log.indexOf('read') > log.indexOf(`progress ${S - 1}`), `the bits are read once the loop is done: ${log.join(', ')}`);
        t.true(log.indexOf('scale 1') < log.indexOf('progress 0'), `scale 1 was queued before scale 0 was done: ${log.join(', ')}`);
        t.deepEqual(r.timings.map((x) => x.scaleIndex), schedule.map((_, si) => si));
        // The loop as it was: the device drained (and the bits read) at every scale.
        const drained = await generate(model, { ...base, observer: { onScaleInput: () => e.sync() } });
        t.deepEqual(r.bits, drained.bits);
        t.deepEqual(await r.summedCodes.read(), await drained.summedCodes.read());
        r.summedCodes.dispose();
        drained.summedCodes.dispose();
      } finally {
        readLogs.delete(e);
        model.dispose();
      }
    });
  });


  for (const c of CASES) {
    if (c.backends === 'cpu' && backend !== 'cpu') continue;
    test(`${backend}: Pipeline on the tiny model equals generate + decodeImage bit for bit (${c.name})`, async (t) => {
      const rng = new Rng(seedFor(t));
      const seed = rng.int(0, 2 ** 31 - 1);
      const tinySeed = rng.int(0, 1000);
      const prompts = Array.from({ length: c.prompts }, () => randomPrompt(rng));
      t.log(`prompts ${JSON.stringify(prompts)}, sampler seed ${seed}, tiny model seed ${tinySeed}`);
      await withEngine(backend, async (e) => {
        const aspect = c.aspect === '1' ? 1 : 3 / 4;
        const want = await lowLevel(e, tinySeed, { prompts, batch: c.batch, seed, aspect, kv: c.kv, negative: c.negative });
        const pipe = await Pipeline.load({ engine: e, tinySeed });
        try {
          const progress: string[] = [];
          const r = await pipe.generate({
            prompts, negativePrompts: c.negative, batch: c.batch, seed, aspect: c.aspect, kv: c.kv, png: true, onProgress: (p) => progress.push(`${p.stage} ${p.done}/${p.total}`),
          });
          const [B, H, W] = want.shape;
          t.is(r.images.length, B);
          t.is(B, c.prompts * c.batch);
          t.is(r.kvBytes, want.kvBytes);
          t.deepEqual(r.truncated, prompts.map(() => false));
          t.true(r.timings.textMs > 0);
          t.true(r.memory.peak.kv >= r.kvBytes && r.kvBytes > 0);
          t.is(r.schedule.length, 7);
          t.deepEqual(progress, [...Array.from({ length: 7 }, (_, i) => `sampling ${i + 1}/7`), 'decode 1/1']);
          // The generation and decode ran from their static memory plan, every allocation placed.
          t.false(r.memoryPlan?.diverged, 'the work stayed in its static memory plan');
          t.true((r.memoryPlan?.placed ?? 0) > 100, `placed ${r.memoryPlan?.placed}`);
          for (let b = 0; b < B; b++) {
            const img = r.images[b];
            t.deepEqual([img.width, img.height, img.channels], [W, H, 3]);
            t.true(Buffer.from(img.data).equals(Buffer.from(want.pixels.subarray(b * H * W * 3, (b + 1) * H * W * 3))), `image ${b} differs`);
            const png = decodePng(img.png as Buffer);
            t.true(Buffer.from(png.data).equals(Buffer.from(img.data)), `PNG of image ${b} does not decode to its pixels`);
          }
          if (c.batch > 1) t.false(Buffer.from(r.images[0].data).equals(Buffer.from(r.images[1].data)), 'images of one prompt must sample their own bits');
        } finally {
          await pipe.dispose();
        }
        t.is(inUseTotal(e), 0);
      });
    });
  }

  test(`${backend}: abort through the AbortSignal rejects with ERR_ABORTED and frees what the generation allocated`, async (t) => {
    await withEngine(backend, async (e) => {
      const pipe = await Pipeline.load({ engine: e });
      try {
        const baseline = e.memory().inUse;
        t.true(baseline.weights > 0);
        e.trimCache();
        await e.sync();
        const reserved = e.memory().reserved;
        const ctl = new AbortController();
        const reason = new Error('user cancelled');
        const seen: string[] = [];
        const err = await t.throwsAsync(
          pipe.generate({
            prompts: ['a red fox'], seed: 3, signal: ctl.signal,
            onProgress: (p) => {
              seen.push(`${p.stage} ${p.done}`);
              if (p.done === 3) ctl.abort(reason);
            },
          }),
          { instanceOf: ScaleKVError },
        );
        t.is((err as ScaleKVError).code, 'ERR_ABORTED');
        t.is((err as ScaleKVError).cause, reason);
        t.deepEqual(seen, ['sampling 1', 'sampling 2', 'sampling 3']);
        await e.sync();
        t.deepEqual(e.memory().inUse, baseline);
        // The plan's arena went back to the device with its last tensor (the cache holds only the text encoder's).
        e.trimCache();
        await e.sync();
        t.is(e.memory().reserved, reserved, 'the arena was freed');
        // Already aborted: nothing is allocated at all.
        const peak = e.memory().totalPeak;
        const pre = await t.throwsAsync(pipe.generate({ prompts: ['a red fox'], signal: AbortSignal.abort() }), { instanceOf: ScaleKVError });
        t.is((pre as ScaleKVError).code, 'ERR_ABORTED');
        t.deepEqual(e.memory().inUse, baseline);
        t.is(e.memory().totalPeak, peak);
        if (backend === 'cpu') {
          // Cancelled once the batch is decoded: the pixels are dropped, the memory is back all the same.
          const late = new AbortController();
          const err2 = await t.throwsAsync(
            pipe.generate({ prompts: ['a red fox'], signal: late.signal, onProgress: (p) => p.stage === 'decode' && late.abort() }),
            { instanceOf: ScaleKVError },
          );
          t.is((err2 as ScaleKVError).code, 'ERR_ABORTED');
          await e.sync();
          t.deepEqual(e.memory().inUse, baseline);
        }
      } finally {
        await pipe.dispose();
      }
      t.is(inUseTotal(e), 0);
    });
  });
}

test('cpu: dispose lets the generations already asked for finish, then frees everything; later calls reject; idempotent', async (t) => {
  await withEngine('cpu', async (e) => {
    t.is(inUseTotal(e), 0);
    const pipe = await Pipeline.load({ engine: e });
    t.true(e.memory().inUse.weights > 0);
    const first = pipe.generate({ prompts: ['a blue lake'], seed: 1 });
    const second = pipe.generate({ prompts: ['a blue lake'], seed: 2 });
    const disposing = pipe.dispose();
    t.false(pipe.model.disposed, 'weights freed under a running generation');
    const [a, b] = await Promise.all([first, second]);
    t.is(a.images.length, 1);
    t.false(Buffer.from(a.images[0].data).equals(Buffer.from(b.images[0].data)), 'two seeds gave the same image');
    await disposing;
    t.true(pipe.disposed && pipe.model.disposed);
    await e.sync();
    for (const [category, bytes] of Object.entries(e.memory().inUse)) t.is(bytes, 0, `${category as MemoryCategory} still holds ${bytes} bytes`);
    const after = await t.throwsAsync(pipe.generate({ prompts: ['a blue lake'] }), { instanceOf: ScaleKVError });
    t.is((after as ScaleKVError).code, 'ERR_DISPOSED');
    await pipe.dispose();
    t.false(e.disposed, 'an engine the caller gave stays alive');
  });
  const own = await Pipeline.load({ backend: 'cpu', threads: 2 });
  await own.dispose();
  t.true(own.engine.disposed, 'the engine the pipeline created is disposed with it');
});

test('cpu: checkpoint files with a T5 directory or a T5-features file give the images of the built-in model; the encoder is freed unless kept', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'scalekv-pipeline-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const rng = new Rng(seedFor(t));
  const tinySeed = rng.int(0, 1000);
  const seed = rng.int(0, 2 ** 31 - 1);
  const prompts = [randomPrompt(rng), randomPrompt(rng)];
  const files = await writeTinyModelFiles(dir, createTinyModel(tinySeed), prompts);
  const e = await createEngine({ backend: 'cpu', threads: 2 });
  const builtIn = await Pipeline.load({ engine: e, tinySeed });
  const fromFiles = await Pipeline.load({ engine: e, weights: files.weights, vae: files.vae, preset: 'tiny', dtype: 'f32' });
  try {
    const want = await builtIn.generate({ prompts, seed, pn: '0.06M' });
    const got = await fromFiles.generate({ textFeatures: files.text, seed, pn: '0.06M' });
    t.is(got.images.length, 2);
    for (let b = 0; b < 2; b++) t.true(Buffer.from(got.images[b].data).equals(Buffer.from(want.images[b].data)), `image ${b}`);
    t.false(fromFiles.encodesPrompts);
    const err = await t.throwsAsync(fromFiles.text({ prompts }), { instanceOf: ScaleKVError });
    t.is((err as ScaleKVError).code, 'ERR_INVALID_ARG');
    // The tiny T5 as a Hugging Face directory: prompts as text give the built-in model's images.
    const withT5 = await Pipeline.load({ engine: e, weights: files.weights, vae: files.vae, preset: 'tiny', dtype: 'f32', t5: files.t5 });
    try {
      t.true(withT5.encodesPrompts);
      const weightsBefore = e.memory().inUse.weights;
      const viaT5 = await withT5.generate({ prompts, seed, pn: '0.06M' });
      for (let b = 0; b < 2; b++) t.true(Buffer.from(viaT5.images[b].data).equals(Buffer.from(want.images[b].data)), `image ${b} through t5`);
      t.is(e.memory().inUse.weights, weightsBefore, 'the encoder is freed after encoding');
      t.true(viaT5.memory.peak.weights > weightsBefore, 'and it was loaded for the encoding');
    } finally {
      await withT5.dispose();
    }
    const kept = await Pipeline.load({ engine: e, weights: files.weights, vae: files.vae, preset: 'tiny', dtype: 'f32', t5: files.t5, keepTextEncoder: true });
    try {
      const weightsBefore = e.memory().inUse.weights;
      const a = await kept.generate({ prompts, seed, pn: '0.06M' });
      t.is(e.memory().inUse.weights, weightsBefore, 'a kept encoder stays loaded, nothing more');
      t.true(Buffer.from(a.images[0].data).equals(Buffer.from(want.images[0].data)));
      const neg = await kept.generate({ prompts, negativePrompts: ['blurry', 'dark'], seed, pn: '0.06M' });
      t.false(Buffer.from(neg.images[0].data).equals(Buffer.from(a.images[0].data)), 'a negative prompt changes the image');
      await t.throwsAsync(kept.generate({ prompts, negativePrompts: ['one', 'two', 'three'] }), { instanceOf: ScaleKVError, message: /negativePrompts/ });
      await t.throwsAsync(kept.generate({ prompts: 'a red fox' as unknown as string[] }), { instanceOf: ScaleKVError, message: /prompts must be/ });
      // A bad option fails before any text encoding.
      await t.throwsAsync(kept.generate({ prompts, kv: 'nonsense:1' }), { instanceOf: ScaleKVError, code: 'ERR_INVALID_ARG' });
      await t.throwsAsync(kept.generate({ textFeatures: files.text, negativePrompts: 'x' }), { instanceOf: ScaleKVError, message: /negativeTextFeatures/ });
    } finally {
      await kept.dispose();
    }
    await t.throwsAsync(Pipeline.load({ engine: e, t5: files.t5 }), { instanceOf: ScaleKVError, message: /t5 needs weights/ });
    const both = await t.throwsAsync(builtIn.generate({ prompts, textFeatures: files.text }), { instanceOf: ScaleKVError });
    t.is((both as ScaleKVError).code, 'ERR_INVALID_ARG');
    const badSpec = await t.throwsAsync(builtIn.generate({ prompts, kv: 'nonsense:1' }), { instanceOf: ScaleKVError });
    t.is((badSpec as ScaleKVError).code, 'ERR_INVALID_ARG');
    await t.throwsAsync(Pipeline.load({ engine: e, weights: files.weights, preset: 'tiny' }), { instanceOf: ScaleKVError, message: /VAE/ });
  } finally {
    await builtIn.dispose();
    await fromFiles.dispose();
    t.is(inUseTotal(e), 0);
    e.dispose();
  }
});
