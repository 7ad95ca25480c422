import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createEngine } from '../lib/engine.js';
import { largestBatch, paperKvBytes, parseBytes, planMemory } from '../lib/kv/planner.js';
import { paperTokensForSpec, resolvePolicy } from '../lib/kv/resolve.js';
import { toHostArray } from '../lib/checkpoint/load.js';
import { decodeImage, generate } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { FullKvPolicy } from '../lib/kv/baselines.js';
import { kvPageTokensFor } from '../lib/kv/cache.js';
import { expectedVaeShapes, expectedWeightShapes, InfinityConfig, preset } from '../lib/model/presets.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { syntheticText } from './helpers.js';
import { Pipeline } from '../lib/pipeline.js';
import { VaeDecoder } from '../lib/model/vae.js';
import { calibrate } from '../lib/scalekv/asi.js';
import { budgetPlanToJson, budgetTokens } from '../lib/scalekv/budget.js';

const MiB = 2 ** 20;
const tokens1M = scaleSchedule({ aspect: 1, pn: '1M' }).tokensPerScale;

// A second opinion, written from the loaders' code rather than run: the transformer's device bytes (block Linears in
// the model dtype, every other uploaded tensor f32; the host-only tensors cfg_uncond, text_norm, pos_start,
// lvl_embed, ... are not uploaded) and the VAE decoder's (every decoder.* tensor, f32).
function transformerWeightBytes(c: InfinityConfig, dtype: 'bf16' | 'f32'): number {
  const shapes = expectedWeightShapes(c);
  const numel = (k: string) => (shapes.get(k) as number[]).reduce((a, b) => a * b, 1);
  const C = c.embedDim;
  let bytes = 4 * (
    numel('text_proj_for_sos.ca.mat_kv.weight') + 2 * C + numel('text_proj_for_sos.ca.proj.weight') + C +
    numel('text_proj_for_ca.0.weight') + numel('text_proj_for_ca.0.bias') + numel('text_proj_for_ca.2.weight') + numel('text_proj_for_ca.2.bias') +
    numel('word_embed.weight') + numel('shared_ada_lin.1.weight') + numel('head_nm.ada_lin.1.weight') + numel('head_nm.ada_lin.1.bias') +
    numel('head.weight') + numel('head.bias'));
  const F = c.ffnHidden;
  const linear = 3 * C * C + C * C + C * C + 2 * C * C + C * C + F * C + C * F;
  // adaBias 6C, q_bias, v_bias, scale_mul H, proj.bias, ca.mat_q.bias, ca K/V bias 2C, ca.proj.bias, ca_norm w+b, fc1.bias F, fc2.bias.
  const small = 6 * C + C + C + c.numHeads + C + C + 2 * C + C + 2 * C + F + C;
  return bytes + c.depth * (linear * (dtype === 'bf16' ? 2 : 4) + small * 4);
}

// The Pipeline loads the VAE in the transformer's dtype.
function vaeWeightBytes(c: InfinityConfig, dtype: 'f32' | 'bf16'): number {
  let n = 0;
  for (const [k, shape] of expectedVaeShapes(c.vae)) if (k.startsWith('decoder.')) n += shape.reduce((a, b) => a * b, 1);
  return (dtype === 'bf16' ? 2 : 4) * n;
}

test('paper accounting (fp32 K + bf16 V, history at the last scale) reproduces Table 1', async (t) => {
  const cases: [('infinity-2b' | 'infinity-8b'), number | undefined, number][] = [
    ['infinity-2b', undefined, 38550],
    ['infinity-2b', 650, 3900],
    ['infinity-8b', undefined, 84328],
    ['infinity-8b', 650, 8531],
    ['infinity-2b', 1300, 7800],
    ['infinity-8b', 265, 3478],
  ];
  const full = tokens1M.slice(0, -1).reduce((a, b) => a + b, 0);
  for (const [p, tokensPerLayer, mib] of cases)
    t.is(Math.round(paperKvBytes(preset(p), 16, tokensPerLayer ?? full, 'f32', 'bf16') / MiB), mib, `${p} ${tokensPerLayer ?? 'full'}`);
  const plan = await planMemory({ preset: 'infinity-2b', batch: 8, paperKDtype: 'f32', paperTokensPerLayer: 650 });
  t.is(plan.paperAccounting.mib, 3900);
  t.is(paperTokensForSpec('scalekv:10%', tokens1M), 650);
  t.is(paperTokensForSpec('streamingllm:4+646', tokens1M), 650);
  t.is(paperTokensForSpec('full', tokens1M), 6425);
  t.is(budgetTokens(0.1), 650);
});

test('the dry run agrees with closed forms at the real presets (weights, full-cache KV, the current-scale scratch)', async (t) => {
  for (const p of ['infinity-2b', 'infinity-8b'] as const) {
    const c = preset(p);
    for (const [batch, dtype] of [[8, 'bf16'], [3, 'f32']] as const) {
      const plan = await planMemory({ preset: p, batch, dtype });
      const rows = 2 * batch;
      const perToken = rows * c.numHeads * c.headDim * 2 * (dtype === 'bf16' ? 2 : 4);
      t.is(plan.weightDetail.transformer, transformerWeightBytes(c, dtype), `${p} ${dtype}`);
      t.is(plan.weightDetail.vae, vaeWeightBytes(c, dtype), `${p} ${dtype}`);
      // flan-t5-xl: the Linears in the model dtype, norms and the expanded position bias [32 heads, 257] in f32.
      const t5Linears = 24 * (4 * 2048 * 2048 + 3 * 5120 * 2048) * (dtype === 'bf16' ? 2 : 4);
      t.is(plan.weightDetail.textEncoder, t5Linears + (24 * 2 + 1) * 2048 * 4 + 32 * 257 * 4, `${p} ${dtype} T5`);
      // The encoder is loaded on top of the model and freed before sampling: the weights peak while it runs.
      t.is(plan.bytes.weights, plan.weightDetail.transformer + plan.weightDetail.vae + plan.weightDetail.textEncoder);
      // Every layer holds every scale but the last (6425 tokens, in whole pages per row, each with its page table);
      // the current scale's K/V (the largest, 4096 tokens) and its RoPE positions are shared.
      const P = kvPageTokensFor('cuda');
      const pages = Math.ceil(6425 / P);
      t.deepEqual(plan.capacities, new Array(c.depth).fill(6425));
      t.is(plan.bytes.kv, c.depth * pages * P * perToken + c.depth * rows * pages * 4, `${p} kv`);
      // The full cache is at its largest at the last boundary: it holds there all it ever holds.
      t.deepEqual(plan.kvArena, { pageTokens: P, poolPages: c.depth * rows * pages, tableBytes: c.depth * rows * pages * 4, boundaryPages: c.depth * rows * pages, boundaryBytes: plan.bytes.kv });
      t.is(plan.bytes.scratch, 4096 * perToken + 4096 * 2 * 4, `${p} scratch`);
      t.is(c.depth * 6425 * perToken, paperKvBytes(c, rows, 6425, dtype, dtype));
      // The categories peak at different times; the total is the peak of their sum, at least the weights with the
      // text encoder loaded, and at least the model's weights with the whole cache.
      const sum = plan.bytes.weights + plan.bytes.kv + plan.bytes.scratch + plan.bytes.activations;
      t.true(plan.bytes.total <= sum && plan.bytes.total >= plan.bytes.weights, `${p} total`);
      t.true(plan.bytes.total > plan.weightDetail.transformer + plan.weightDetail.vae + plan.bytes.kv, `${p} total`);
      t.true(plan.reservedPeak >= plan.bytes.total);
    }
  }
  // 8-bit K/V: a byte per element and a scale byte per (token, head) for K and V, the same pages and tables.
  for (const kvDtype of ['int8', 'fp8'] as const) {
    const c = preset('infinity-2b');
    const plan = await planMemory({ preset: 'infinity-2b', batch: 8, kvDtype });
    const perToken = 16 * c.numHeads * (2 * c.headDim + 1);
    t.is(plan.kvDtype, kvDtype);
    const pages = Math.ceil(6425 / kvPageTokensFor('cuda'));
    t.is(plan.bytes.kv, c.depth * pages * kvPageTokensFor('cuda') * perToken + c.depth * 16 * pages * 4, `${kvDtype} kv`);
    t.is(plan.bytes.scratch, 4096 * perToken + 4096 * 2 * 4, `${kvDtype} scratch`);
  }
  await t.throwsAsync(() => planMemory({ preset: 'infinity-2b', batch: 1, kvDtype: 'f32' }), { code: 'ERR_INVALID_ARG', message: /model's dtype/ });
  // A window policy: every layer holds 650 tokens.
  const c2 = preset('infinity-2b');
  const w = await planMemory({ preset: 'infinity-2b', batch: 2, policy: resolvePolicy('window:650', { depth: 32 }) });
  t.is(w.bytes.kv, 32 * 650 * 4 * c2.numHeads * c2.headDim * 2 * 2 + 32 * 4 * 650 * 4); // 650 pages of one token
  t.is(w.kvArena.boundaryBytes, w.bytes.kv, 'a window holds its 650 tokens between scales too');
  // With the CPU's 16-token pages: 41 pages, 656 tokens.
  const w16 = await planMemory({ preset: 'infinity-2b', batch: 2, policy: resolvePolicy('window:650', { depth: 32 }), kvPageTokens: 16 });
  t.is(w16.bytes.kv, 32 * 656 * 4 * c2.numHeads * c2.headDim * 2 * 2 + 32 * 4 * 41 * 4);
});

test('largestBatch: the largest batch whose planned peak fits', async (t) => {
  const o = { preset: 'infinity-8b' as const, policy: resolvePolicy('scalekv:10%', { depth: 40, preset: 'infinity-8b' }) };
  const device = parseBytes('80GiB');
  const b = await largestBatch(o, device);
  t.true(b >= 1);
  t.true((await planMemory({ ...o, batch: b })).bytes.total <= device);
  t.true((await planMemory({ ...o, batch: b + 1 })).bytes.total > device);
  t.is(await largestBatch(o, parseBytes('1GiB')), 0);
  t.is(parseBytes('80GiB'), 80 * 2 ** 30);
  t.is(parseBytes('1.5 MB'), 1.5e6);
  t.throws(() => parseBytes('lots'), { code: 'ERR_INVALID_ARG' });
  await t.throwsAsync(() => planMemory({ preset: 'infinity-2b', batch: 0 }), { code: 'ERR_INVALID_ARG' });
  await t.throwsAsync(() => planMemory({ preset: 'infinity-2b', batch: 1, textTokens: 513 }), { code: 'ERR_INVALID_ARG' });
});

// The planner's claim: its figures are the engine's counters. Run the same generation + decode on the CPU engine.
test('tiny model: the planner equals the CPU engine counters, every category, the total and the reserved peak, for every policy', async (t) => {
  const tiny = createTinyModel(3);
  const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' });
  const dir = mkdtempSync(join(tmpdir(), 'scalekv-plan-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const vaeWeights = new Map<string, Float32Array>();
  for (const n of tiny.vae.names) if (n.startsWith('decoder.')) vaeWeights.set(n, toHostArray(await tiny.vae.read(n), 'f32', n) as Float32Array);
  const planPath = join(dir, 'plan.json');
  {
    const e = await createEngine({ backend: 'cpu', threads: 2 });
    try {
      const m = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' });
      const cal = await calibrate(m, { prompts: [syntheticText()], schedule: schedule.scales, budget: 0.2, drafters: 2 });
      writeFileSync(planPath, budgetPlanToJson(cal.plan));
      m.dispose();
    } finally {
      e.dispose();
    }
  }
  const B = syntheticText().lens.length;
  const textTokens = syntheticText().lens[0];
  t.true(syntheticText().lens.every((n) => n === textTokens), 'the planner gives every prompt the same length');
  const fullKv = new Map<string, number>();
  const fullPool = new Map<string, number>();
  for (const spec of ['full', 'window:40', 'streamingllm:4+36', 'snapkv:40', 'pyramidkv:40', `scalekv-paper:plan=${planPath},base=53`, 'scalekv:20%']) {
    // 8-bit K/V on two of the policies (the whole suite's time allows no more).
    const storage = spec === 'full' || spec === 'scalekv:20%' ? (['f32', 'bf16', 'bf16/int8', 'f32/fp8'] as const) : (['f32', 'bf16'] as const);
    for (const kind of storage) {
      const [dtype, kvDtype] = kind.split('/') as ['f32' | 'bf16', 'int8' | 'fp8' | undefined];
      const policy = spec === 'full' ? new FullKvPolicy() : resolvePolicy(spec, { depth: tiny.config.depth });
      // The GPU's page size on the bf16 kinds, the CPU's own (its default) on the f32 ones: the planner follows either.
      const kvPageTokens = dtype === 'bf16' ? kvPageTokensFor('cuda') : undefined;
      const plan = await planMemory({ config: tiny.config, batch: B, schedule: schedule.scales, dtype, kvDtype, textTokens, policy, kvPageTokens: kvPageTokens ?? kvPageTokensFor('cpu') });
      const e = await createEngine({ backend: 'cpu', threads: 2 });
      try {
        const m = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype });
        const vae = await VaeDecoder.load(e, vaeWeights, { ...tiny.vaeConfig, weightDtype: dtype, dtype });  // as the Pipeline does
        const r = await generate(m, { text: syntheticText(), schedule: schedule.scales, cfg: 3, seed: 1, kvPolicy: policy, kvDtype, kvPageTokens });
        await decodeImage(vae, r.summedCodes, { vaeBatch: plan.vaeBatch });
        r.summedCodes.dispose();
        const mem = e.memory();
        const what = `${spec} ${kind}`;
        t.deepEqual({ ...mem.peak, total: mem.totalPeak }, plan.bytes, what);
        t.is(mem.reservedPeak, plan.reservedPeak, what);
        t.is(r.kvBytes + r.kvArena.tableBytes, plan.bytes.kv, what);
        const { pageTokens, poolPages, tableBytes, boundaryPages } = r.kvArena;
        t.deepEqual(plan.kvArena, { pageTokens, poolPages, tableBytes, boundaryPages, boundaryBytes: (r.kvBytes / poolPages) * boundaryPages + tableBytes }, what);
        t.true(boundaryPages > 0 && boundaryPages <= poolPages, what);
        const { headDim } = tiny.config;
        if (!kvDtype) fullPool.set(`${spec} ${dtype}`, r.kvBytes);
        else t.is(r.kvBytes, (fullPool.get(`${spec} ${dtype}`) as number) * (2 * headDim + 1) / (2 * headDim * (dtype === 'bf16' ? 2 : 4)), `${what}: a byte an element and a scale byte a token`);
        // (The official-mode 20 % plan keeps every token of this 7-scale schedule at its largest history.)
        if (spec === 'full' && !kvDtype) fullKv.set(dtype, plan.bytes.kv);
        else if (!spec.startsWith('scalekv:') && !kvDtype) t.true(plan.bytes.kv < (fullKv.get(dtype) as number), `${what}: the policy shrinks the cache`);
        vae.dispose();
        m.dispose();
        const after = e.memory();
        t.is(after.totalInUse, 0, `${what}: everything freed`);
      } finally {
        e.dispose();
      }
    }
  }
});

test('the count backend keeps the CPU engine counters through random allocations, disposals and cache reuse', async (t) => {
  const seed = (Math.random() * 2 ** 31) >>> 0;
  let s = seed;
  const rand = () => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32);
  const cpu = await createEngine({ backend: 'cpu', threads: 1 });
  const count = await createEngine({ backend: 'count' });
  try {
    const dtypes = ['f32', 'bf16', 'f16', 'i32', 'u8'] as const;
    const cats = ['weights', 'kv', 'activations', 'scratch'] as const;
    const live: [import('../lib/engine.js').Tensor, import('../lib/engine.js').Tensor][] = [];
    for (let step = 0; step < 600; step++) {
      if (live.length && rand() < 0.45) {
        const [a, b] = live.splice(Math.floor(rand() * live.length), 1)[0];
        a.dispose();
        b.dispose();
      } else {
        // Sizes that collide (reuse), nearly collide (the quarter rule) and differ; zero-size tensors too.
        const shape = [1 + Math.floor(rand() * 4), Math.floor(rand() * 3) * 512 + Math.floor(rand() * 700)];
        const dtype = dtypes[Math.floor(rand() * dtypes.length)];
        const category = cats[Math.floor(rand() * cats.length)];
        live.push([cpu.empty(shape, dtype, { category }), count.empty(shape, dtype, { category })]);
      }
      if (step === 300) {
        cpu.trimCache();
        count.trimCache();
        await cpu.sync();
      }
      const [m1, m2] = [cpu.memory(), count.memory()];
      if (JSON.stringify(m1) !== JSON.stringify(m2)) {
        t.fail(`seed ${seed}, step ${step}: cpu ${JSON.stringify(m1)} vs count ${JSON.stringify(m2)}`);
        return;
      }
    }
    t.pass();
    for (const [a, b] of live) {
      a.dispose();
      b.dispose();
    }
    t.deepEqual(cpu.memory().inUse, count.memory().inUse);
  } finally {
    cpu.dispose();
    count.dispose();
  }
});

test('scalekv plan CLI: table and JSON', (t) => {
  const cli = (...args: string[]) => spawnSync(process.execPath, ['--import=tsx', 'lib/cli.ts', ...args], { encoding: 'utf8', timeout: 120_000 });
  const r = cli('plan', '--preset', 'infinity-8b', '--batch', '8', '--policy', 'scalekv:10%', '--k-dtype', 'f32', '--device-memory', '80GiB');
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /\| kv \(history\) \|/);
  t.regex(r.stdout, /\| activations \| \d+ \|/);
  t.regex(r.stdout, /= 8531\.3 MiB/);
  t.regex(r.stdout, /largest batch in 81920\.0 MiB: \d+/);
  const j = cli('plan', '--preset', 'infinity-2b', '--batch', '8', '--k-dtype', 'f32', '--json');
  t.is(j.status, 0, j.stderr);
  const plan = JSON.parse(j.stdout);
  // 32 layers x 16 rows x 6425 tokens (in pages of one token, the GPU's) x 8 KiB (K and V, bf16), and the page tables.
  t.is(plan.bytes.kv, 32 * 16 * 6425 * 8192 + 32 * 16 * 6425 * 4);
  t.is(plan.kvArena.boundaryBytes, plan.bytes.kv, 'the full cache holds everything at the last boundary');
  t.regex(cli('plan', '--preset', 'infinity-2b', '--batch', '8', '--policy', 'scalekv:10%').stdout, /kv held between scales \(what the policy keeps\), at most: 2601\.8 MiB = 20800 tokens a row/);
  // For a CPU engine: its 16-token pages, up to 15 tokens more a (layer, row).
  t.regex(cli('plan', '--preset', 'infinity-2b', '--batch', '8', '--policy', 'scalekv:10%', '--for', 'cpu').stdout, /pages of 16 tokens[^]*at most: 2660\.1 MiB = 21280 tokens a row/);
  t.regex(cli('plan', '--for', 'tpu').stderr, /--for must be cuda or cpu.*\[ERR_INVALID_ARG\]/);
  t.is(plan.paperAccounting.mib, 38550);
  t.true(plan.bytes.total <= plan.bytes.weights + plan.bytes.kv + plan.bytes.scratch + plan.bytes.activations);
  const bad = cli('plan', '--policy', 'nonsense:1');
  t.is(bad.status, 1);
  t.regex(bad.stderr, /ERR_INVALID_ARG/);
  // 8-bit K/V: a byte per element and a scale byte per (token, head): 2 x 128 + 1 bytes a token and head instead of 512.
  const q = cli('plan', '--preset', 'infinity-2b', '--batch', '8', '--kv-dtype', 'int8', '--json');
  t.is(q.status, 0, q.stderr);
  const plan8 = JSON.parse(q.stdout);
  t.is(plan8.kvDtype, 'int8');
  t.is(plan8.bytes.kv, 32 * 16 * 6425 * 16 * (2 * 128 + 1) + 32 * 16 * 6425 * 4);
  t.regex(cli('plan', '--preset', 'tiny', '--kv-dtype', 'fp8').stdout, /K and V fp8 \+ a scale byte per \(token, head\)/);
  const wrong = cli('plan', '--kv-dtype', 'int4');
  t.is(wrong.status, 1);
  t.regex(wrong.stderr, /kvDtype must be .*\[ERR_INVALID_ARG\]/);
});

test('the planner counts the T5 encoder as the Pipeline runs it (freed before sampling, or kept; negative prompts): peaks equal the CPU engine\'s', async (t) => {
  const tiny = createTinyModel(2);
  // Prompts of one token length: the planner gives every prompt the same length.
  const prompts = ['a red fox', 'a blue cat'];
  const textTokens = tiny.tokenizer.encode(prompts[0]).ids.length;
  t.true(prompts.every((p) => tiny.tokenizer.encode(p).ids.length === textTokens));
  const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' });
  const peaks: number[] = [];
  for (const [keep, negative] of [[false, false], [true, false], [false, true]] as const) {
    const what = `keep ${keep}, negative prompts ${negative}`;
    const plan = await planMemory({
      config: tiny.config, batch: 2, schedule: schedule.scales, dtype: 'f32', textTokens, textEncoder: tiny.t5.config, keepTextEncoder: keep, negativePrompts: negative,
      kvPageTokens: kvPageTokensFor('cpu'),
    });
    t.deepEqual(plan.textEncoder, { dModel: 128, layers: 2, kept: keep, dtype: 'f32' });
    const e = await createEngine({ backend: 'cpu', threads: 2 });
    try {
      const pipe = await Pipeline.load({ engine: e, tinySeed: 2, dtype: 'f32', keepTextEncoder: keep });
      try {
        await pipe.generate({ prompts, negativePrompts: negative ? ['a dark sea', 'a cold sky'] : undefined, seed: 1, pn: '0.06M' });
      } finally {
        await pipe.dispose();
      }
      const mem = e.memory();
      t.deepEqual({ ...mem.peak, total: mem.totalPeak }, plan.bytes, what);
      // The Pipeline runs from a static memory plan: the engine reserves exactly what the planner says it would.
      t.is(mem.reservedPeak, plan.staticPlan?.reservedPeak ?? NaN, what);
      t.true(mem.reservedPeak < plan.reservedPeak, `${what}: the plan reserves less than the caching allocator alone`);
      peaks.push(plan.bytes.total);
    } finally {
      e.dispose();
    }
  }
  t.true(peaks[1] >= peaks[0], 'keeping the encoder never lowers the peak');
  const none = await planMemory({ config: tiny.config, batch: 2, schedule: schedule.scales, dtype: 'f32', textTokens });
  t.is(none.weightDetail.textEncoder, 0, 'no encoder is counted for a model no known T5 fits');
});
