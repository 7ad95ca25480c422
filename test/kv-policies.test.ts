import test from 'ava';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import type { Engine } from '../lib/engine.js';
import {
  FullKvPolicy, kvPolicyFromSpec, KvPolicy, KvTraceRecord, PyramidKvPolicy, ScaleKvPolicy, SelectionPolicy,
  SlidingWindowPolicy, SnapKvPolicy, StreamingLlmPolicy, builtinPlan, gridWindow, pyramidBudgets,
} from '../lib/kv/index.js';
import { generate } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { budgetPlanToJson, officialRulePlan } from '../lib/scalekv/budget.js';
import { verifyForwardScalekv } from '../lib/verify/forward-scalekv.js';
import { goldenDir, testBackends, withEngine } from './helpers.js';

// 0.06M 1:1 schedule: 1+4+16+36+64+144+256 = 521 tokens.
const schedule: [number, number][] = [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8], [12, 12], [16, 16]];
const tokens = schedule.map(([h, w]) => h * w);
const tiny = createTinyModel(11);
const depth = tiny.config.depth;
const plan = officialRulePlan({ depth, tokensPerLayer: 80, drafters: [0, 3], scaleTokens: tokens, refinerFloor: 20 });

async function run(e: Engine, policy?: KvPolicy, sched: [number, number][] = schedule, dtype: 'f32' | 'bf16' = 'f32') {
  const m = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype });
  try {
    const r = await generate(m, {
      textFeatures: tiny.text, schedule: sched, cfg: 3, tau: 1, seed: 5, kvPolicy: policy, capture: { logits: true },
    });
    r.summedCodes.dispose();
    return r;
  } finally {
    m.dispose();
  }
}

const policies = (): [string, KvPolicy][] => [
  ['full', new FullKvPolicy()],
  ['scalekv reference', new ScaleKvPolicy({ mode: 'reference', plan, baseCapacity: 80 })],
  ['scalekv paper', new ScaleKvPolicy({ mode: 'paper', plan, baseCapacity: 80 })],
  ['scalekv reference avgpool', new ScaleKvPolicy({ mode: 'reference', plan, baseCapacity: 80, pooling: 'avgpool' })],
  ['window', new SlidingWindowPolicy(100)],
  ['streamingllm', new StreamingLlmPolicy(4, 60)],
  ['snapkv', SnapKvPolicy.uniform(depth, 64)],
  ['pyramidkv', new PyramidKvPolicy(depth, 64)],
];

for (const backend of testBackends()) {
  test(`${backend}: every policy runs on the tiny model and holds no more KV than its capacities`, async (t) => {
    const { numHeads, headDim } = tiny.config;
    // The emulator is slow: there, one policy per code path (append, scored raw-q/logits, scored q/probs, positions).
    const subset = backend === 'cpu' ? undefined : ['full', 'scalekv reference', 'scalekv paper', 'streamingllm'];
    // ... and 6 scales (265 tokens; ScaleKV still compresses at scale 4).
    const sched = backend === 'cpu' ? schedule : schedule.slice(0, 6);
    const tok = sched.map(([h, w]) => h * w);
    for (const [name, policy] of policies().filter(([n]) => !subset || subset.includes(n))) {
      await withEngine(backend, async (e) => {
        const records: KvTraceRecord[] = [];
        if (policy instanceof SelectionPolicy) (policy as unknown as { opts: { trace?: (r: KvTraceRecord) => void } }).opts.trace = (r) => records.push(r);
        const r = await run(e, policy, sched);
        const caps = Array.from({ length: depth }, (_, l) => policy.capacity(l, tok));
        const promised = caps.reduce((a, b) => a + b, 0) * 2 /* rows */ * numHeads * headDim * 4 * 2;
        t.is(r.kvBytes, promised, name);
        t.true(r.memory.peak.kv <= promised, `${name}: peak kv ${r.memory.peak.kv} > ${promised}`);
        for (const [k, v] of r.captured) t.true(v.every(Number.isFinite), `${name} ${k}`);
        for (const rec of records) {
          t.true(rec.lenAfter <= Math.max(caps[rec.layer], 0) || rec.scaleIndex === sched.length - 1, `${name} L${rec.layer} s${rec.scaleIndex}`);
        }
        if (name !== 'full') t.true(records.some((x) => x.compressed), `${name} never compressed`);
        t.log(`${name}: history capacities ${caps.join(',')} (full: ${new FullKvPolicy().capacity(0, tok)}), ${promised} bytes`);
      });
    }
  });
}

test('cpu: ScaleKV reference mode with avgpool keeps the repeated entries of the official gather (unit u06 behaviour)', async (t) => {
  // Scale 4 (8x8, key_len 121) keeps 120: avg pooling spreads the window's -inf over most of the map, so top-k
  // reaches -inf ties, window positions among them, which the union with the window then repeats.
  const cacheSizes: (number[] | null)[] = Array.from({ length: 14 }, () => null);
  cacheSizes[6] = new Array(depth).fill(120);
  cacheSizes[7] = new Array(depth).fill(200);
  cacheSizes[8] = new Array(depth).fill(200);
  const records: KvTraceRecord[] = [];
  const policy = new ScaleKvPolicy({ mode: 'reference', cacheSizes, baseCapacity: 100, pooling: 'avgpool', trace: (r) => records.push(r), traceKept: true });
  await withEngine('cpu', async (e) => {
    const r = await run(e, policy);
    for (const [k, v] of r.captured) t.true(v.every(Number.isFinite), k);
  });
  const s4 = records.filter((r) => r.scaleIndex === 4);
  t.is(s4.length, depth);
  let repeated = 0;
  for (const rec of s4) {
    t.is(rec.lenAfter, 120, 'the full official budget, not a capped one');
    const kept = rec.kept as Int32Array;
    for (let p = 0; p < kept.length / 120; p++)
      for (let i = 1; i < 120; i++) {
        t.true(kept[p * 120 + i] >= kept[p * 120 + i - 1]);
        if (kept[p * 120 + i] === kept[p * 120 + i - 1]) repeated++;
      }
  }
  t.true(repeated > 0, 'some list repeats an entry');
  t.log(`${repeated} repeated entries over ${depth} layers x 2 rows x ${tiny.config.numHeads} heads at scale 4`);
});

test('cpu: the full policy, the default, and non-compressing baselines give identical logits', async (t) => {
  await withEngine('cpu', async (e) => {
    const a = await run(e);
    for (const p of [new FullKvPolicy(), new SlidingWindowPolicy(10000), SnapKvPolicy.uniform(depth, 10000), new StreamingLlmPolicy(4, 5000)]) {
      const b = await run(e, p);
      for (const [k, v] of a.captured) t.deepEqual(b.captured.get(k), v, `${p.name} ${k}`);
      t.is(p.capacity(0, tokens), 265);
    }
  });
});

test('history capacities follow the control flow', (t) => {
  const full = new FullKvPolicy();
  t.is(full.capacity(0, tokens), 265);
  t.is(full.capacity(0, [1]), 0);
  t.is(new SlidingWindowPolicy(100).capacity(0, tokens), 100);
  t.is(new StreamingLlmPolicy(4, 60).capacity(0, tokens), 64);
  t.is(new SlidingWindowPolicy(1000).capacity(0, tokens), 265);
  // 2B at 10% on the 1M schedule: drafter layer 0 holds 6385 after si=11, refiners at most min(650 base, ...) = 632.
  const p2b = kvPolicyFromSpec('scalekv:10%', { depth: 32, preset: 'infinity-2b' }) as ScaleKvPolicy;
  const t1m = [1, 4, 16, 36, 64, 144, 256, 400, 576, 1024, 1600, 2304, 4096];
  t.is(p2b.capacity(0, t1m), 6385);
  t.is(p2b.capacity(23, t1m), 4100);
  t.is(p2b.capacity(5, t1m), 632);
  const sum = Array.from({ length: 32 }, (_, l) => p2b.capacity(l, t1m)).reduce((a, b) => a + b, 0);
  t.true(sum < 32 * 6425);
  t.deepEqual(pyramidBudgets(4, 64).reduce((a, b) => a + b, 0), 256);
  const pb = pyramidBudgets(32, 650);
  t.is(pb.reduce((a, b) => a + b, 0), 32 * 650);
  t.true(pb[0] > pb[31]);
  const c = [2, 7, 12, 17];
  t.deepEqual([...gridWindow(20, 20, 16)], c.flatMap((r) => c.map((x) => r * 20 + x)));
  const nonSquare = gridWindow(12, 16, 16);
  t.is(nonSquare.length, 16);
  t.true(nonSquare.every((x) => x >= 0 && x < 192));
  t.deepEqual([...gridWindow(2, 2, 16)], [0, 1, 2, 3]);
});

test('kvPolicyFromSpec: grammar and built-in plans', (t) => {
  t.is(kvPolicyFromSpec('full', { depth: 4 }).name, 'full');
  const r = kvPolicyFromSpec('scalekv:10%', { depth: 32, preset: 'infinity-2b' }) as ScaleKvPolicy;
  t.is(r.mode, 'reference');
  t.is(r.baseCapacity, 650);
  t.deepEqual(r.cacheSizes[9]?.slice(0, 2), [920, 632]);
  t.is(r.cacheSizes[13]?.[23], 465);
  const p8 = kvPolicyFromSpec('scalekv-paper:10%,pool=max,kernel=7,window=9,base=700', { depth: 40, preset: 'infinity-8b' }) as ScaleKvPolicy;
  t.is(p8.mode, 'paper');
  t.is(p8.pooling, 'maxpool');
  t.is(p8.kernelSize, 7);
  t.is(p8.windowSize, 9);
  t.is(p8.baseCapacity, 700);
  t.is(p8.cacheSizes[13]?.[0], 6200);
  const dir = mkdtempSync(join(tmpdir(), 'skv-plan-'));
  const file = join(dir, 'plan.json');
  writeFileSync(file, budgetPlanToJson(plan));
  const fromFile = kvPolicyFromSpec(`scalekv:plan=${file}`, { depth }) as ScaleKvPolicy;
  t.deepEqual(fromFile.plan, plan);
  t.is((kvPolicyFromSpec('window:650', { depth }) as SlidingWindowPolicy).budget, 650);
  const s = kvPolicyFromSpec('streamingllm:4+646', { depth }) as StreamingLlmPolicy;
  t.deepEqual([s.sinks, s.recent], [4, 646]);
  t.deepEqual((kvPolicyFromSpec('snapkv:650', { depth }) as SnapKvPolicy).budgets, [650, 650, 650, 650]);
  t.deepEqual((kvPolicyFromSpec('snapkv:10%', { depth }) as SnapKvPolicy).budgets, [650, 650, 650, 650]);
  const py = kvPolicyFromSpec('pyramidkv:650', { depth }) as SnapKvPolicy;
  t.is(py.name, 'pyramidkv');
  t.is(py.budgets.reduce((a, b) => a + b, 0), 4 * 650);
  // The built-in plans are the shipped files (when the spec directory has them).
  const shipped = join(process.cwd(), '..', 'shared', 'spec', 'budgets', '2b_10%_budget.json');
  try {
    t.is(budgetPlanToJson(builtinPlan('infinity-2b', 32, 0.1)), readFileSync(shipped, 'utf8'));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
  }
  for (const bad of ['', 'nope', 'full:3', 'scalekv', 'scalekv:abc', 'scalekv:10%,foo=1', 'scalekv:plan=/nonexistent.json', 'window:', 'window:0',
    'window:-5', 'streamingllm:4', 'streamingllm:4+0', 'snapkv:x', 'pyramidkv:650,kernel=4', 'scalekv:0%', 'scalekv:10%,pool=mean'])
    t.throws(() => kvPolicyFromSpec(bad, { depth: 32, preset: 'infinity-2b' }), { code: 'ERR_INVALID_ARG' }, bad);
  t.throws(() => kvPolicyFromSpec('scalekv:10%', { depth: 0 }), { code: 'ERR_INVALID_ARG' });
  t.throws(() => kvPolicyFromSpec(`scalekv:plan=${file}`, { depth: 32 }), { code: 'ERR_INVALID_ARG' });
});

test('ScaleKV reference: a base capacity below 521 hits the official None budget row (ERR_BUDGET)', (t) => {
  const p = new ScaleKvPolicy({ mode: 'reference', plan: builtinPlan('infinity-2b', 32, 0.1), baseCapacity: 121 });
  t.throws(() => p.capacity(0, [1, 4, 16, 36, 64, 144, 256, 400, 576, 1024, 1600, 2304, 4096]), { code: 'ERR_BUDGET' });
});

const skvDir = goldenDir('forward_scalekv');
if (skvDir) {
  test('cpu: ScaleKV reference mode matches the official forward_scalekv fixture (13 scales, 10521 tokens)', async (t) => {
    const manifest = JSON.parse(readFileSync(join(skvDir, 'manifest.json'), 'utf8'));
    await withEngine('cpu', async (e) => {
      const checks = await verifyForwardScalekv(e, manifest, skvDir);
      for (const c of checks) t.true(c.pass, `${c.name}: ${c.value} ${c.note ?? ''}`);
      t.true(checks.some((c) => c.name === 'kv/*/kept'));
    });
  });
}

test('cpu: ScaleKV paper mode with a uniform plan equals SnapKV with that budget (same scoring path)', async (t) => {
  const uniform = officialRulePlan({ depth, tokensPerLayer: 80, drafters: [], scaleTokens: tokens });
  await withEngine('cpu', async (e) => {
    const a = await run(e, new ScaleKvPolicy({ mode: 'paper', plan: uniform, baseCapacity: 80 }));
    const b = await run(e, SnapKvPolicy.uniform(depth, 80));
    const full = await run(e);
    for (const [k, v] of a.captured) t.deepEqual(b.captured.get(k), v, k);
    t.notDeepEqual(a.captured.get('s06/logits'), full.captured.get('s06/logits'));
  });
});
