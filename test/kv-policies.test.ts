import test from 'ava';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Engine, Tensor } from '../lib/engine.js';
import {
  FullKvPolicy, KvCache, kvPolicyFromSpec, KvPolicy, KvTraceRecord, PyramidKvPolicy, SelectionPolicyOptions, SlidingWindowPolicy,
  SnapKvPolicy, StreamingLlmPolicy, builtinPlan, gridWindow, pyramidBudgets,
} from '../lib/kv/index.js';
import { policyHistoryLengths, type AfterAttentionContext, type KvStep } from '../lib/kv/policy.js';
import { kvBoundaryPages, kvPageTokensFor, type KvTarget } from '../lib/kv/cache.js';
import type { SelectionPolicy } from '../lib/kv/selection.js';
import { generate, GenerateOptions } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { budgetPlanToJson, officialRulePlan, planEntry } from '../lib/scalekv/budget.js';
import { ScaleKvPolicy } from '../lib/scalekv/policy.js';
import { verifyForwardScalekv } from '../lib/verify/forward-scalekv.js';
import { goldenDir, Rng, seedFor, testBackends, withEngine, syntheticText } from './helpers.js';

// 0.06M 1:1 schedule: 1+4+16+36+64+144+256 = 521 tokens.
const schedule: [number, number][] = [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8], [12, 12], [16, 16]];
const tokens = schedule.map(([h, w]) => h * w);
const tiny = createTinyModel(11);
const depth = tiny.config.depth;
const plan = officialRulePlan({ depth, tokensPerLayer: 80, drafters: [0, 3], scaleTokens: tokens, refinerFloor: 20 });

async function run(e: Engine, policy?: KvPolicy, sched: [number, number][] = schedule, dtype: 'f32' | 'bf16' = 'f32', kvPageTokens?: number) {
  const m = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype });
  try {
    const r = await generate(m, {
      textFeatures: syntheticText(), schedule: sched, cfg: 3, tau: 1, seed: 5, kvPolicy: policy, capture: { logits: true }, kvPageTokens,
    });
    r.summedCodes.dispose();
    return r;
  } finally {
    m.dispose();
  }
}

/** Every policy, built with the given trace options. */
const policies = (o: SelectionPolicyOptions = {}): [string, KvPolicy][] => [
  ['full', new FullKvPolicy()],
  ['scalekv reference', new ScaleKvPolicy({ ...o, mode: 'reference', plan, baseCapacity: 80 })],
  ['scalekv paper', new ScaleKvPolicy({ ...o, mode: 'paper', plan, baseCapacity: 80 })],
  ['scalekv reference avgpool', new ScaleKvPolicy({ ...o, mode: 'reference', plan, baseCapacity: 80, pooling: 'avgpool' })],
  ['window', new SlidingWindowPolicy(100, o)],
  ['streamingllm', new StreamingLlmPolicy(4, 60, o)],
  ['snapkv', SnapKvPolicy.uniform(depth, 64, o)],
  ['pyramidkv', new PyramidKvPolicy(depth, 64, o)],
];

for (const backend of testBackends()) {
  test(`${backend}: every policy runs on the tiny model; its capacities are the most history it held, and the engine's kv peak is exactly that`, async (t) => {
    const { numHeads, headDim } = tiny.config;
    // The emulator is slow: there, one policy per code path (append, scored raw-q/logits, scored q/probs, positions).
    const subset = backend === 'cpu' ? undefined : ['full', 'scalekv reference', 'scalekv paper', 'streamingllm'];
    // ... and 6 scales (265 tokens; ScaleKV still compresses at scale 4).
    const sched = backend === 'cpu' ? schedule : schedule.slice(0, 6);
    const tok = sched.map(([h, w]) => h * w);
    const records: KvTraceRecord[] = [];
    for (const [name, policy] of policies({ trace: (r) => records.push(r) }).filter(([n]) => !subset || subset.includes(n))) {
      records.length = 0;
      await withEngine(backend, async (e) => {
        const r = await run(e, policy, sched);
        const caps = Array.from({ length: depth }, (_, l) => policy.capacity(l, tok));
        // What each layer actually held, from the session's trace of every stored step (the full cache: every scale
        // but the last, in closed form); the replayed capacities must be exactly that, no more.
        const held = Array.from({ length: depth }, (_, l) =>
          name === 'full'
            ? tok.slice(0, -1).reduce((a, b) => a + b, 0)
            : Math.max(0, ...records.filter((x) => x.layer === l && x.scaleIndex < sched.length - 1).map((x) => x.lenAfter)),
        );
        t.deepEqual(caps, held, name);
        // The pages the layers held, replayed from the trace in loop order (a layer holds the larger of its old and new
        // length while it works on a scale): the arena's pool is exactly their peak, and it was reached.
        const P = r.kvArena.pageTokens;
        const len = new Array<number>(depth).fill(0);
        const pagesNow = () => len.reduce((a, n) => a + Math.ceil(n / P), 0);
        let peak = 0;
        let boundary = 0;
        for (let si = 0; si < sched.length - 1; si++) {
          for (let l = 0; l < depth; l++) {
            const after = name === 'full' ? len[l] + tok[si] : (records.find((x) => x.layer === l && x.scaleIndex === si)?.lenAfter ?? NaN);
            const before = len[l];
            len[l] = Math.max(before, after);
            peak = Math.max(peak, pagesNow());
            len[l] = after;
          }
          boundary = Math.max(boundary, pagesNow());
        }
        const rows = 2;
        t.is(r.kvArena.poolPages, rows * peak, `${name}: pool pages`);
        t.is(r.kvArena.peakPages, r.kvArena.poolPages, `${name}: every page of the pool was used`);
        // Between scales: what the policy keeps, in whole pages; the closed form from the policy's lengths agrees.
        t.is(r.kvArena.boundaryPages, rows * boundary, `${name}: pages held between scales`);
        t.is(kvBoundaryPages(policyHistoryLengths(policy, depth, tok), rows, P), rows * boundary, `${name}: kvBoundaryPages`);
        // ScaleKV's layers change roles between scales: they are never all at their most at once.
        if (name.startsWith('scalekv')) t.true(peak < caps.reduce((a, c) => a + Math.ceil(c / P), 0), `${name}: the pool is smaller than every layer at its most`);
        // The engine's own counter: the K and V pools (f32) and the page tables are the only 'kv' allocations.
        t.is(r.memory.peak.kv, 2 * r.kvArena.poolPages * numHeads * P * headDim * 4 + r.kvArena.tableBytes, name);
        for (const [k, v] of r.captured) t.true(v.every(Number.isFinite), `${name} ${k}`);
        if (name !== 'full') t.true(records.some((x) => x.compressed), `${name} never compressed`);
        t.log(`${name}: history capacities ${caps.join(',')} (full: ${new FullKvPolicy().capacity(0, tok)})`);
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

test('cpu: one ScaleKV policy serves two concurrent generations, each bit-identical to its own run alone', async (t) => {
  // Each generation keeps its own has_reached_base flags and pending decisions: B starts while A is at scale 3,
  // when A's layers have reached the base capacity and B's (at 1 token) have not.
  const policy = new ScaleKvPolicy({ mode: 'reference', plan, baseCapacity: 80, trace: () => undefined, traceKept: true });
  await withEngine('cpu', async (e) => {
    const m = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' });
    try {
      const optsA: GenerateOptions = { textFeatures: syntheticText(), schedule, cfg: 3, seed: 5, kvPolicy: policy, capture: { logits: true } };
      const optsB: GenerateOptions = {
        textFeatures: syntheticText('a red fox in the snow'), schedule: schedule.slice(0, 6), cfg: 2, seed: 9, kvPolicy: policy, capture: { logits: true },
      };
      const go = async (o: GenerateOptions) => {
        const r = await generate(m, o);
        r.summedCodes.dispose();
        return r;
      };
      const aloneA = await go(optsA);
      const aloneB = await go(optsB);
      let startB!: () => void;
      const bStarted = new Promise<void>((res) => (startB = res));
      const both = go({ ...optsA, onProgress: (si) => si === 2 && startB() });
      const second = bStarted.then(() => go(optsB));
      const [a, b] = await Promise.all([both, second]);
      for (const [x, alone, name] of [[a, aloneA, 'A'], [b, aloneB, 'B']] as const) {
        t.deepEqual(x.bits, alone.bits, `${name} bits`);
        t.deepEqual([...x.captured.keys()], [...alone.captured.keys()]);
        for (const [k, v] of alone.captured) t.deepEqual(x.captured.get(k), v, `${name} ${k}`);
      }
      t.notDeepEqual(a.captured.get('s05/logits'), b.captured.get('s05/logits'));
    } finally {
      m.dispose();
    }
  });
});

test('cpu: the KV cache changes only through place and compact, which check lengths and capacities', async (t) => {
  await withEngine('cpu', async (e) => {
    const cache = new KvCache(e, { layers: 2, rows: 1, heads: 2, headDim: 8, capacity: [10, 4], dtype: 'f32' });
    try {
      t.throws(() => cache.place(0, 'append'), { code: 'ERR_INTERNAL' }, 'outside a scale');
      cache.beginScale(6);
      t.is(cache.place(0, 'append').offset, 0);
      t.throws(() => cache.place(0, 'decide'), { code: 'ERR_INTERNAL' }, 'placed twice');
      t.throws(() => cache.place(1, 'append'), { code: 'ERR_BUDGET' }, '6 tokens > capacity 4');
      t.throws(() => cache.compact(0, new Int32Array(2 * 3), 3), { code: 'ERR_INTERNAL' }, 'appended: nothing to decide');
      cache.endScale();
      t.is(cache.len(0), 6);
      cache.beginScale(6);
      t.throws(() => cache.place(0, 'append'), { code: 'ERR_BUDGET' }, '6 + 6 > capacity 10');
      t.is(cache.len(0), 6, 'a refused append changes nothing');
      t.throws(() => cache.place(2, 'append'), { code: 'ERR_INVALID_ARG' });
    } finally {
      cache.dispose();
    }
    const c2 = new KvCache(e, { layers: 1, rows: 1, heads: 2, headDim: 8, capacity: 5, dtype: 'f32' });
    try {
      c2.beginScale(4);
      c2.place(0, 'decide');
      const ops = c2.attentionOperands(0);
      t.is(ops.history, undefined);
      t.deepEqual(ops.current?.k.shape, [1, 2, 4, 8]);
      t.throws(() => c2.compact(0, new Int32Array(2 * 6), 6), { code: 'ERR_BUDGET' }, 'more than capacity and key length');
      t.throws(() => c2.compact(0, new Int32Array(2 * 3), 2), { code: 'ERR_SHAPE' });
      c2.compact(0, Int32Array.from([0, 2, 1, 3]), 2);
      t.is(c2.len(0), 2);
    } finally {
      c2.dispose();
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

test('ScaleKV reference: the official budget rules (Scale N = si + 2, scale 12 reuses 13 and re-arms, budget = window keeps the window)', (t) => {
  t.deepEqual(planEntry(7), { scale: 9, rearmsBase: false });
  t.deepEqual(planEntry(12, true), { scale: 13, rearmsBase: true });
  t.deepEqual(planEntry(12), { scale: 14, rearmsBase: false });
  const cacheSizes: (number[] | null)[] = Array.from({ length: 14 }, () => null);
  cacheSizes[9] = [16];
  cacheSizes[13] = [15];
  const p = new ScaleKvPolicy({ mode: 'reference', cacheSizes, baseCapacity: 650 });
  const state = p.newLayerState();
  // si 7 (20x20) with 921 keys and a budget equal to the 16-token grid window: the window alone, unscored.
  const d = p.decide(0, 7, 921, [], state);
  t.is(d.kind, 'positions');
  t.deepEqual(d.kind === 'positions' ? [...d.positions] : [], [...p.referenceWindow(7, 921)]);
  t.true(state.reachedBase);
  // si 12 uses entry 13 (15 < the window: the official UnboundLocalError), after re-arming the base check.
  t.throws(() => p.decide(0, 12, 4200, [], state), { code: 'ERR_BUDGET' });
  t.false(state.reachedBase);
});

/** ../shared/spec or $SCALEKV_SPEC, where it holds the official budget files. */
const specDir = [process.env.SCALEKV_SPEC, resolve('..', 'shared', 'spec')].find((d) => d && existsSync(join(d, 'budgets')));
if (!specDir) {
  test('built-in plans vs the official budget files (skipped: no ../shared/spec/budgets and no $SCALEKV_SPEC/budgets)', (t) => {
    t.log('NOTICE: official budget files not found; the built-in plans are not compared with them');
    t.pass();
  });
} else {
  test('built-in plans are the official budget files, byte for byte', (t) => {
    for (const [preset, depth, file] of [['infinity-2b', 32, '2b_10%_budget.json'], ['infinity-8b', 40, '8b_10%_budget.json']] as const)
      t.is(budgetPlanToJson(builtinPlan(preset, depth, 0.1)), readFileSync(join(specDir, 'budgets', file), 'utf8'), file);
  });
}

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
if (!skvDir) {
  test('cpu: ScaleKV reference mode vs the official forward_scalekv fixture (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixture forward_scalekv not found; ScaleKV whole-forward conformance is skipped');
    t.pass();
  });
} else {
  test('cpu: ScaleKV reference mode matches the official forward_scalekv fixture (13 scales, 10521 tokens)', async (t) => {
    const manifest = JSON.parse(readFileSync(join(skvDir, 'manifest.json'), 'utf8'));
    await withEngine('cpu', async (e) => {
      const checks = await verifyForwardScalekv(e, manifest, skvDir);
      for (const c of checks) t.true(c.pass, `${c.name}: ${c.value} ${c.note ?? ''}`);
      t.true(checks.some((c) => c.name === 'kv/*/kept'));
    });
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The paper's selection against an independent float64 reference.

/**
 * The paper's window selection in float64, per (row, head) p: softmax probabilities of the window query rows
 * (q · k, scale 1) over all keys, summed over the window queries; window keys −inf; average pooling (zero padding,
 * divided by the kernel); window keys −inf again. Returns the masked pooled scores.
 */
function paperScores(q: Float32Array, keys: Float32Array, pairs: number, n: number, keyLen: number, hd: number, windowRel: Int32Array, kernel: number): Float64Array[] {
  const hist = keyLen - n;
  const out: Float64Array[] = [];
  for (let p = 0; p < pairs; p++) {
    const score = new Float64Array(keyLen);
    for (const w of windowRel) {
      const logit = new Float64Array(keyLen);
      let max = -Infinity;
      for (let j = 0; j < keyLen; j++) {
        let s = 0;
        for (let c = 0; c < hd; c++) s += q[(p * n + w) * hd + c] * keys[(p * keyLen + j) * hd + c];
        logit[j] = s;
        max = Math.max(max, s);
      }
      let z = 0;
      for (let j = 0; j < keyLen; j++) z += Math.exp(logit[j] - max);
      for (let j = 0; j < keyLen; j++) score[j] += Math.exp(logit[j] - max) / z;
    }
    for (const w of windowRel) score[hist + w] = -Infinity;
    const half = kernel >> 1;
    const pooled = new Float64Array(keyLen);
    for (let j = 0; j < keyLen; j++) {
      let s = 0;
      for (let t = Math.max(0, j - half); t <= Math.min(keyLen - 1, j + half); t++) s += score[t];
      pooled[j] = s / kernel;
    }
    for (const w of windowRel) pooled[hist + w] = -Infinity;
    out.push(pooled);
  }
  return out;
}

for (const [label, make] of [
  ['ScaleKV paper mode', (budget: number, si: number, trace: SelectionPolicyOptions) => {
    const cacheSizes: (number[] | null)[] = Array.from({ length: 14 }, () => null);
    cacheSizes[planEntry(si).scale] = [budget];
    return new ScaleKvPolicy({ ...trace, mode: 'paper', cacheSizes, baseCapacity: 10000 });
  }],
  ['SnapKV', (budget: number, _si: number, trace: SelectionPolicyOptions) => SnapKvPolicy.uniform(1, budget, trace)],
] as const) {
  test(`cpu: ${label} keeps the paper's selection (float64 reference, random inputs) and compacts exactly those K/V`, async (t) => {
    const rng = new Rng(seedFor(t));
    const rows = 2;
    const heads = 2;
    const hd = 32;
    const si = 3; // a 6 x 6 map after a history of arbitrary length
    const [h, w] = schedule[si];
    const n = h * w;
    const hist = rng.int(120, 180);
    const keyLen = hist + n;
    const budget = rng.int(40, keyLen - 16 * 4 - 1); // within the avg-pool-safe range: no -inf entries kept
    const pairs = rows * heads;
    const keys = rng.normals(pairs * keyLen * hd, 1 / Math.sqrt(hd));
    const values = rng.normals(pairs * keyLen * hd);
    const q = rng.normals(pairs * n * hd, 2);
    const records: KvTraceRecord[] = [];
    const policy: SelectionPolicy<unknown> = make(budget, si, { trace: (r) => records.push(r), traceKept: true }) as SelectionPolicy<unknown>;
    await withEngine('cpu', async (e) => {
      const cache = new KvCache(e, { layers: 1, rows, heads, headDim: hd, capacity: keyLen, dtype: 'f32' });
      const temps: Tensor[] = [];
      const session = policy.begin(cache, { schedule, batch: 1 });
      // qkNormRope without normalisation, biases or positions writes q, k and v unchanged, where the cache says.
      const write = (first: number, len: number, target: KvTarget, withQ: boolean) => {
        const qkv = new Float32Array(rows * len * 3 * heads * hd);
        for (let p = 0; p < pairs; p++)
          for (let i = 0; i < len; i++) {
            const dst = ((Math.floor(p / heads) * len + i) * 3 * heads + (p % heads)) * hd;
            if (withQ) qkv.set(q.subarray((p * n + i) * hd, (p * n + i + 1) * hd), dst);
            qkv.set(keys.subarray((p * keyLen + first + i) * hd, (p * keyLen + first + i + 1) * hd), dst + heads * hd);
            qkv.set(values.subarray((p * keyLen + first + i) * hd, (p * keyLen + first + i + 1) * hd), dst + 2 * heads * hd);
          }
        const qkvT = e.tensor(qkv, [rows, len, 3 * heads * hd], 'f32');
        const qT = e.empty([rows, heads, len, hd], 'f32', { fillByte: 0xff });
        temps.push(qkvT, qT);
        e.ops.qkNormRope({ qkv: qkvT, normalize: false, q: qT, k: target.k, v: target.v, kvOffset: target.offset, pageTable: target.pageTable });
        return { qkv: qkvT, q: qT };
      };
      try {
        cache.beginScale(hist);
        write(0, hist, cache.place(0, 'append'), false);
        cache.endScale();
        cache.beginScale(n);
        const step: KvStep = { layer: 0, scaleIndex: si, tokens: n, lastScale: false };
        const placement = session.placement(step);
        t.is(placement, 'decide');
        const { qkv, q: qT } = write(hist, n, cache.place(0, placement), true);
        const ctx: AfterAttentionContext = { ...step, engine: e, cache, placement, historyLength: hist, schedule, scaleStarts: [], qkv, q: qT };
        await session.afterAttention?.(ctx);
        t.is(records.length, 1);
        const kept = records[0].kept as Int32Array;
        t.is(records[0].lenAfter, budget);
        t.is(cache.len(0), budget);
        // The reference: window ∪ top-(budget − window) of the pooled scores. f32 scoring may order elements whose
        // float64 scores lie within its rounding of the cut differently; nothing else may differ.
        const rel = gridWindow(h, w, 16);
        const scores = paperScores(q, keys, pairs, n, keyLen, hd, rel, 5);
        let exactMismatches = 0;
        for (let p = 0; p < pairs; p++) {
          const mine = kept.subarray(p * budget, (p + 1) * budget);
          const s = scores[p];
          const ranked = [...s.keys()].filter((j) => Number.isFinite(s[j])).sort((a, b) => s[b] - s[a] || a - b);
          const cut = s[ranked[budget - rel.length - 1]];
          const tol = 1e-5 * Math.max(...ranked.map((j) => Math.abs(s[j])));
          const want = new Set([...ranked.slice(0, budget - rel.length), ...Array.from(rel, (r) => hist + r)]);
          for (let i = 1; i < budget; i++) t.true(mine[i] > mine[i - 1], 'strictly increasing');
          const mineSet = new Set(mine);
          for (const r of rel) t.true(mineSet.has(hist + r), `window key ${hist + r} kept`);
          for (let j = 0; j < keyLen; j++) {
            if (!Number.isFinite(s[j])) continue;
            if (mineSet.has(j)) t.true(s[j] >= cut - tol, `kept ${j}: ${s[j]} below the cut ${cut}`);
            else t.true(s[j] <= cut + tol, `dropped ${j}: ${s[j]} above the cut ${cut}`);
            if (mineSet.has(j) !== want.has(j)) exactMismatches++;
          }
          // The cache holds exactly the kept rows of [history ‖ current], in order.
          const { k: kc, v: vc } = await cache.readHistory(0);
          for (let i = 0; i < budget; i++) {
            const src = (p * keyLen + mine[i]) * hd;
            const dst = (p * budget + i) * hd;
            t.deepEqual((kc as Float32Array).subarray(dst, dst + hd), keys.subarray(src, src + hd));
            t.deepEqual((vc as Float32Array).subarray(dst, dst + hd), values.subarray(src, src + hd));
          }
        }
        t.log(`history ${hist}, budget ${budget}: ${exactMismatches} entries ordered differently from float64 within rounding of the cut`);
      } finally {
        session.end?.();
        cache.dispose();
        for (const x of temps) x.dispose();
      }
    });
  });
}

for (const backend of testBackends())
  test(`${backend}: the arena's page size moves bytes, never values: ScaleKV's logits and bits are the same with pages of 1, 3 or 16 tokens (emu: 1 and 16)`, async (t) => {
    await withEngine(backend, async (e) => {
      // The backend's default first, then the other sizes (the emulator, slow, runs one).
      const sizes = [undefined, ...(backend === 'emu' ? [16] : [1, 3])];
      const runs = [];
      for (const P of sizes) {
        const r = await run(e, kvPolicyFromSpec('scalekv:30%', { depth: tiny.config.depth }), schedule, 'bf16', P);
        t.is(r.kvArena.pageTokens, P ?? kvPageTokensFor(backend));
        runs.push(r);
      }
      for (const r of runs.slice(1)) {
        t.deepEqual(r.bits, runs[0].bits);
        for (const [k, v] of runs[0].captured) t.deepEqual(r.captured.get(k), v, k);
      }
      for (const bad of [0, -1, 1.5, NaN])
        await t.throwsAsync(() => run(e, undefined, schedule, 'f32', bad), { code: 'ERR_INVALID_ARG', message: /kvPageTokens/ });
    });
  });
