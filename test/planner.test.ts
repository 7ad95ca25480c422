import test from 'ava';
import { spawnSync } from 'node:child_process';
import { createEngine } from '../lib/engine.js';
import { decodeImage, generate } from '../lib/model/generate.js';
import { VaeDecoder } from '../lib/model/vae.js';
import { toHostArray } from '../lib/checkpoint/load.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { FULL_HISTORY, largestBatch, parseBytes, planMemory, weightBytes } from '../lib/kv/planner.js';
import { paperTokensForSpec, resolvePolicy } from '../lib/kv/resolve.js';
import { calibrate } from '../lib/kv/asi.js';
import { budgetPlanToJson } from '../lib/scalekv/budget.js';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { budgetTokens } from '../lib/scalekv/budget.js';

const MiB = 2 ** 20;
const tokens1M = scaleSchedule({ aspect: 1, pn: '1M' }).tokensPerScale;

test('paper accounting (fp32 K + bf16 V, history at the last scale) reproduces Table 1', (t) => {
  const cases: [('infinity-2b' | 'infinity-8b'), number | undefined, number][] = [
    ['infinity-2b', undefined, 38550],
    ['infinity-2b', 650, 3900],
    ['infinity-8b', undefined, 84328],
    ['infinity-8b', 650, 8531],
    ['infinity-2b', 1300, 7800],
    ['infinity-8b', 265, 3478],
  ];
  for (const [p, tokensPerLayer, mib] of cases) {
    const plan = planMemory({ preset: p, batch: 8, kDtype: 'f32', kvDtype: 'bf16', paperTokensPerLayer: tokensPerLayer });
    t.is(Math.round(plan.paperAccounting.mib), mib, `${p} ${tokensPerLayer ?? 'full'}`);
  }
  // Full cache: the paper figure is exactly the planner's kv (history = every scale but the last).
  const full = planMemory({ preset: 'infinity-2b', batch: 8, kDtype: 'f32' });
  t.is(full.bytes.kv, full.paperAccounting.bytes);
  t.is(full.bytes.kv / MiB, 38550);
  t.deepEqual(full.capacities, new Array(32).fill(6425));
  // The current-scale buffer: 4096 tokens, shared by the layers, plus the RoPE positions.
  t.is(full.bytes.scratch, 16 * 16 * 4096 * 128 * 6 + 4096 * 2 * 4);
  t.is(paperTokensForSpec('scalekv:10%', tokens1M), 650);
  t.is(paperTokensForSpec('streamingllm:4+646', tokens1M), 650);
  t.is(paperTokensForSpec('full', tokens1M), 6425);
  t.is(budgetTokens(0.1), 650);
});

test('weights: bf16 block Linears + f32 rest; largestBatch and sizes', (t) => {
  const p2 = planMemory({ preset: 'infinity-2b', batch: 1 });
  // About 2B parameters, mostly block Linears in bf16: between 2 and 4 bytes a parameter on average.
  t.true(p2.bytes.weights > 4e9 && p2.bytes.weights < 8e9, String(p2.bytes.weights));
  const o = { preset: 'infinity-8b' as const, kDtype: 'f32' as const };
  const b = largestBatch(o, parseBytes('80GiB'));
  t.true(b >= 1);
  t.true(planMemory({ ...o, batch: b }).bytes.total <= 80 * 2 ** 30);
  t.true(planMemory({ ...o, batch: b + 1 }).bytes.total > 80 * 2 ** 30);
  t.is(parseBytes('80GiB'), 80 * 2 ** 30);
  t.is(parseBytes('1.5 MB'), 1.5e6);
  t.throws(() => parseBytes('lots'));
});

test('tiny model, full cache: engine peaks equal the planner (weights, kv, scratch)', async (t) => {
  const tiny = createTinyModel(3);
  const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' });
  const e = await createEngine({ backend: 'cpu', threads: 2 });
  try {
    const model = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' });
    const loaded = e.memory().inUse.weights;
    t.is(loaded, weightBytes(tiny.config, 'f32'));
    const r = await generate(model, { text: tiny.text, schedule: schedule.scales, cfg: 3, seed: 1 });
    r.summedCodes.dispose();
    const plan = planMemory({ config: tiny.config, batch: 1, scaleTokens: schedule.tokensPerScale, kvDtype: 'f32', weightDtype: 'f32', policy: FULL_HISTORY });
    t.is(plan.weightDetail.transformer, r.memory.peak.weights);
    // With the VAE decoder loaded too: the planner's weights exactly; activations are an estimate (within 10 %).
    const vw = new Map<string, Float32Array>();
    for (const n of tiny.vae.names) if (n.startsWith('decoder.')) vw.set(n, toHostArray(await tiny.vae.read(n), 'f32', n) as Float32Array);
    const vae = await VaeDecoder.load(e, vw, tiny.vaeConfig);
    const r2 = await generate(model, { text: tiny.text, schedule: schedule.scales, cfg: 3, seed: 1 });
    await decodeImage(vae, r2.summedCodes);
    r2.summedCodes.dispose();
    const m2 = e.memory();
    t.is(m2.peak.weights, plan.bytes.weights);
    const est = planMemory({ config: tiny.config, batch: 1, scaleTokens: schedule.tokensPerScale, kvDtype: 'f32', weightDtype: 'f32', textTokens: tiny.text.lens[0] }).bytes.activations;
    t.log(`activations: engine peak ${m2.peak.activations}, estimate ${est}`);
    t.true(Math.abs(est / m2.peak.activations - 1) < 0.1);
    vae.dispose();
    // History in 'kv' (every scale but the last), the current scale in one shared 'scratch' (+ RoPE positions).
    t.is(r.memory.peak.kv, plan.bytes.kv);
    t.is(r.memory.peak.scratch, plan.bytes.scratch);
    t.is(r.kvBytes, plan.bytes.kv);
    model.dispose();
  } finally {
    e.dispose();
  }
});

test('tiny model, compressing policies (and a calibrated ScaleKV plan): engine peaks equal the planner', async (t) => {
  const tiny = createTinyModel(3);
  const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' });
  const dir = mkdtempSync(join(tmpdir(), 'scalekv-plan-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const planPath = join(dir, 'plan.json');
  {
    const e = await createEngine({ backend: 'cpu', threads: 2 });
    try {
      const m = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' });
      const cal = await calibrate(m, { prompts: [tiny.text], schedule: schedule.scales, budget: 0.2, drafters: 2 });
      writeFileSync(planPath, budgetPlanToJson(cal.plan));
      m.dispose();
    } finally {
      e.dispose();
    }
  }
  for (const spec of ['window:40', 'streamingllm:4+36', 'snapkv:40', 'pyramidkv:40', `scalekv-paper:plan=${planPath},base=53`]) {
    const policy = resolvePolicy(spec, { depth: tiny.config.depth });
    const plan = planMemory({ config: tiny.config, batch: 1, scaleTokens: schedule.tokensPerScale, kvDtype: 'f32', weightDtype: 'f32', policy });
    const e = await createEngine({ backend: 'cpu', threads: 2 });
    try {
      const m = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' });
      const r = await generate(m, { text: tiny.text, schedule: schedule.scales, cfg: 3, seed: 1, kvPolicy: policy });
      r.summedCodes.dispose();
      t.is(r.memory.peak.kv, plan.bytes.kv, spec);
      t.is(r.memory.peak.scratch, plan.bytes.scratch, spec);
      t.true(plan.bytes.kv < planMemory({ config: tiny.config, batch: 1, scaleTokens: schedule.tokensPerScale, kvDtype: 'f32' }).bytes.kv, spec);
      m.dispose();
    } finally {
      e.dispose();
    }
  }
});

test('scalekv plan CLI: table and JSON', (t) => {
  const cli = (...args: string[]) => spawnSync(process.execPath, ['--import=tsx', 'lib/cli.ts', ...args], { encoding: 'utf8', timeout: 120_000 });
  const r = cli('plan', '--preset', 'infinity-8b', '--batch', '8', '--policy', 'scalekv:10%', '--k-dtype', 'f32', '--device-memory', '80GiB');
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /\| kv \(history\) \|/);
  t.regex(r.stdout, /= 8531\.3 MiB/);
  t.regex(r.stdout, /largest batch in 81920\.0 MiB: \d+/);
  const j = cli('plan', '--preset', 'infinity-2b', '--batch', '8', '--k-dtype', 'f32', '--json');
  t.is(j.status, 0, j.stderr);
  const plan = JSON.parse(j.stdout);
  t.is(plan.bytes.kv, 38550 * MiB);
  t.is(plan.paperAccounting.mib, 38550);
  t.is(plan.bytes.total, plan.bytes.weights + plan.bytes.kv + plan.bytes.scratch + plan.bytes.activations);
  const bad = cli('plan', '--policy', 'nonsense:1');
  t.is(bad.status, 1);
  t.regex(bad.stderr, /ERR_INVALID_ARG/);
});
