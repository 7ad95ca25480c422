import test from 'ava';
import { selectionRef, SelectionProblem } from './reference.js';
import { Rng, seedFor, testBackends, withEngine } from './helpers.js';
import type { Engine } from '../lib/engine.js';

/**
 * Logits on a grid of k/8 with small |k|: every sum is exact in f32 and f64, so scores, plateaus and the
 * top-k cut are identical on every backend and in the reference, and ties are real ties.
 */
function exactLogits(rng: Rng, n: number, levels: number): Float32Array {
  return Float32Array.from({ length: n }, () => rng.int(-levels, levels) / 8);
}

function windowKeysFor(rng: Rng, nWindow: number, nKeys: number): Int32Array {
  const set = new Set<number>();
  while (set.size < nWindow) set.add(rng.int(0, nKeys - 1));
  return Int32Array.from(set).sort();
}

async function runSelection(e: Engine, p: SelectionProblem) {
  const logits = e.tensor(p.logits, [p.rows, p.heads, p.nWindow, p.nKeys], 'f32');
  const lse = p.lse ? e.tensor(p.lse, [p.rows, p.heads, p.nWindow], 'f32') : undefined;
  const out = e.empty([p.rows, p.heads, p.budget], 'i32', { fillByte: 0xff });
  const pooled = e.empty([p.rows, p.heads, p.nKeys], 'f32', { fillByte: 0xff });
  e.ops.selection({ logits, lse, windowKeys: p.windowKeys, budget: p.budget, mode: p.mode, pooling: p.pooling, kernel: p.kernel, out, pooledScores: pooled });
  const r = { kept: (await out.read()) as Int32Array, pooled: (await pooled.read()) as Float32Array };
  for (const x of [logits, lse, out, pooled]) x?.dispose();
  return r;
}

for (const backend of testBackends()) {
  test(`selection ${backend}: exact top-k with lowest-index ties over many shapes, pools and budgets`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const shapes = [
        // rows, heads, nWindow, nKeys
        [1, 1, 1, 1],
        [2, 2, 16, 57],
        [1, 3, 16, 921],
        [2, 1, 9, 300],
        [1, 2, 4, 4],
        [1, 1, 16, 4196],
      ];
      for (const [rows, heads, nWindow, nKeys] of shapes) {
        for (const pooling of ['max', 'avg', 'none'] as const) {
          for (const levels of [2, 40]) {
            const budgets = [nWindow, nKeys, Math.min(nKeys, nWindow + 1), rng.int(nWindow, nKeys)];
            for (const budget of budgets) {
              const p: SelectionProblem = {
                rows, heads, nWindow, nKeys, budget, pooling, mode: 'logits', kernel: pooling === 'none' ? 1 : rng.pick([3, 5, 7]),
                logits: exactLogits(rng, rows * heads * nWindow * nKeys, levels),
                windowKeys: windowKeysFor(rng, nWindow, nKeys),
              };
              const got = await runSelection(e, p);
              const ref = selectionRef(p);
              const label = JSON.stringify({ rows, heads, nWindow, nKeys, budget, pooling, kernel: p.kernel, levels });
              t.deepEqual(Array.from(got.kept), Array.from(ref.kept), label);
              t.deepEqual(Array.from(got.pooled), Array.from(ref.pooled, Math.fround), `${label} pooled`);
            }
          }
        }
      }
    });
  });

  test(`selection ${backend}: a plateau across the cut keeps the lowest indices`, async (t) => {
    await withEngine(backend, async (e) => {
      const nKeys = 50, nWindow = 2;
      const logits = new Float32Array(nWindow * nKeys).fill(0.5);
      const p: SelectionProblem = { rows: 1, heads: 1, nWindow, nKeys, budget: 12, mode: 'logits', pooling: 'max', kernel: 5, logits, windowKeys: new Int32Array([20, 40]) };
      const got = await runSelection(e, p);
      // Window keys are -inf before pooling, so their neighbours within 2 stay finite (max pool).
      t.deepEqual(Array.from(got.kept), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20, 40]);
    });
  });

  test(`selection ${backend}: probability mode keeps a valid top-k of the softmax mass`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const [rows, heads, nWindow, nKeys, budget] = [2, 2, 16, 700, 120];
      const logits = rng.normals(rows * heads * nWindow * nKeys, 3);
      const lse = new Float32Array(rows * heads * nWindow);
      for (let r = 0; r < lse.length; r++) {
        let m = -Infinity, s = 0;
        for (let j = 0; j < nKeys; j++) m = Math.max(m, logits[r * nKeys + j]);
        for (let j = 0; j < nKeys; j++) s += Math.exp(logits[r * nKeys + j] - m);
        lse[r] = m + Math.log(s);
      }
      const p: SelectionProblem = { rows, heads, nWindow, nKeys, budget, mode: 'probs', pooling: 'avg', kernel: 5, logits, lse, windowKeys: windowKeysFor(rng, nWindow, nKeys) };
      const got = await runSelection(e, p);
      const ref = selectionRef(p);
      // f32 error of a pooled score, relative to it (every term is positive): the rounding of x - lse carried
      // through exp, exp itself, the sum over the window rows, the pooling sum and its division.
      let maxArg = 0;
      for (let i = 0; i < logits.length; i++) maxArg = Math.max(maxArg, Math.abs(logits[i] - lse[Math.floor(i / nKeys)]));
      const relBound = 2 ** -24 * (maxArg + 2 + nWindow + p.kernel + 1);
      const bound = (x: number) => relBound * Math.abs(x);
      let worst = 0;
      for (let j = 0; j < ref.pooled.length; j++) {
        const [g, r] = [got.pooled[j], ref.pooled[j]];
        worst = Math.max(worst, Number.isFinite(r) ? Math.abs(g - r) / (bound(r) || 2 ** -149) : g === r ? 0 : Infinity);
      }
      t.true(worst <= 1, `pooled scores: worst error ${worst} times the f32 bound (relative ${relBound})`);
      for (let rh = 0; rh < rows * heads; rh++) {
        const pooled = ref.pooled.subarray(rh * nKeys, (rh + 1) * nKeys);
        const kept = new Set(got.kept.subarray(rh * budget, (rh + 1) * budget));
        const win = new Set(p.windowKeys);
        const keptScores = [...kept].filter((j) => !win.has(j)).map((j) => pooled[j]);
        const droppedScores = Array.from(pooled).filter((_, j) => !kept.has(j) && !win.has(j));
        t.is(kept.size, budget);
        // The kernel ranks its own f32 scores: the cut may only be off where two scores lie within their bounds.
        const [lowKept, highDropped] = [Math.min(...keptScores), Math.max(...droppedScores)];
        t.true(lowKept >= highDropped - bound(lowKept) - bound(highDropped), `(row, head) ${rh}: kept set is not a top-k`);
      }
    });
  });

  test(`selection ${backend}: invalid budgets and window keys are rejected`, async (t) => {
    await withEngine(backend, async (e) => {
      const logits = e.tensor(new Float32Array(2 * 10).fill(1), [1, 1, 2, 10], 'f32');
      const out = (n: number) => e.empty([1, 1, n], 'i32');
      t.throws(() => e.ops.selection({ logits, windowKeys: new Int32Array([1, 2]), budget: 1, out: out(1) }), { code: 'ERR_BUDGET' });
      t.throws(() => e.ops.selection({ logits, windowKeys: new Int32Array([1, 2]), budget: 11, out: out(11) }), { code: 'ERR_BUDGET' });
      t.throws(() => e.ops.selection({ logits, windowKeys: new Int32Array([1, 2]), budget: 4, out: out(5) }), { code: 'ERR_SHAPE' });
      t.throws(() => e.ops.selection({ logits, windowKeys: new Int32Array([1, 2]), budget: 4, out: out(4), kernel: 4 }), { code: 'ERR_INVALID_ARG' });
      t.throws(() => e.ops.selection({ logits, windowKeys: new Int32Array([1, 2]), budget: 4, out: out(4), mode: 'probs' }), { code: 'ERR_INVALID_ARG' });
      e.ops.selection({ logits, windowKeys: new Int32Array([1, 10]), budget: 4, out: out(4) });
      await t.throwsAsync(e.sync(), { code: 'ERR_INDEX_RANGE' });
    });
  });
}
