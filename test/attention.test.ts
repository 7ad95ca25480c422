import test, { type ExecutionContext } from 'ava';
import type { Engine } from '../lib/engine.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../lib/dtype.js';
import { attentionRef, AttentionProblem, windowRef } from './reference.js';
import { bf16Round, maxAbs, maxAbsDiff, Rng, seedFor, testBackends, withEngine } from './helpers.js';
import { randomLayout, scatter } from './paged.js';

const roundBf16 = (x: number) => bf16BitsToF32(f32ToBf16Bits(x));

interface Case {
  rows: number;
  heads: number;
  lq: number;
  d: number;
  len: number;
  extraCap: number;
  lc: number;
  gathered: boolean;
  window: number;
}

// Shapes chosen to hit every path: Lq = 1, lengths off every tile size, empty history or current, both
// head dims, gathered and contiguous history, with and without the window output.
const CASES: Case[] = [
  { rows: 1, heads: 1, lq: 1, d: 64, len: 0, extraCap: 0, lc: 1, gathered: false, window: 0 },
  { rows: 2, heads: 2, lq: 1, d: 128, len: 37, extraCap: 5, lc: 0, gathered: false, window: 1 },
  { rows: 1, heads: 3, lq: 17, d: 64, len: 65, extraCap: 3, lc: 19, gathered: true, window: 4 },
  { rows: 2, heads: 1, lq: 70, d: 128, len: 130, extraCap: 0, lc: 64, gathered: false, window: 16 },
  { rows: 1, heads: 2, lq: 64, d: 64, len: 64, extraCap: 64, lc: 64, gathered: true, window: 0 },
  { rows: 1, heads: 1, lq: 33, d: 128, len: 0, extraCap: 7, lc: 129, gathered: false, window: 3 },
  { rows: 3, heads: 2, lq: 5, d: 64, len: 200, extraCap: 0, lc: 7, gathered: true, window: 5 },
  { rows: 1, heads: 1, lq: 129, d: 128, len: 300, extraCap: 1, lc: 1, gathered: false, window: 16 },
  // Enough (row, head, query block) tasks that the CPU keeps 128-query blocks; a head size off the 64-wide tiles.
  { rows: 2, heads: 4, lq: 300, d: 80, len: 90, extraCap: 2, lc: 300, gathered: true, window: 2 },
];

// The bf16 tensor-core kernel's tiles (32 query rows per warp, 64- and 128-row blocks, 64-key tiles for head
// dim 64 and 32-key tiles for 128) and split-KV: grids under one block per SM (132 on the emulator) with at
// least 4 key tiles split them and combine. `scaleMul` multiplies 1/sqrt(d): negative and zero scales too.
// The last case fills the wave (2 x 66 blocks), so it does not split.
const TILE_CASES: (Case & { scaleMul?: number })[] = [64, 128].flatMap((d) => [
  { rows: 1, heads: 1, lq: 1, d, len: 0, extraCap: 3, lc: 1, gathered: false, window: 0 },
  { rows: 1, heads: 2, lq: 5, d, len: 40, extraCap: 0, lc: 23, gathered: false, window: 2 },
  { rows: 2, heads: 1, lq: 33, d, len: 50, extraCap: 0, lc: 14, gathered: false, window: 3 },
  { rows: 1, heads: 2, lq: 100, d, len: 60, extraCap: 10, lc: 5, gathered: false, window: 0 },
  { rows: 2, heads: 2, lq: 33, d, len: 280, extraCap: 20, lc: 50, gathered: true, window: 5 },
  { rows: 1, heads: 2, lq: 1, d, len: 300, extraCap: 10, lc: 0, gathered: false, window: 1 },
  { rows: 2, heads: 2, lq: 100, d, len: 800, extraCap: 0, lc: 10, gathered: true, window: 4 },
  { rows: 1, heads: 1, lq: 65, d, len: 200, extraCap: 50, lc: 0, gathered: false, window: 0 },
  { rows: 1, heads: 2, lq: 33, d, len: 280, extraCap: 0, lc: 50, gathered: false, window: 2, scaleMul: -1 },
  { rows: 1, heads: 2, lq: 5, d, len: 40, extraCap: 0, lc: 25, gathered: false, window: 0, scaleMul: 0 },
  { rows: 2, heads: 66, lq: 1, d, len: 190, extraCap: 10, lc: 10, gathered: false, window: 0 },
]);

function makeProblem(rng: Rng, c: Case, dtype: 'f32' | 'bf16'): AttentionProblem & { windowRows: Int32Array } {
  const cap = c.len + c.extraCap;
  const round = dtype === 'bf16' ? bf16Round : (a: Float32Array) => a;
  const n = (x: number) => round(rng.normals(x));
  const pairs = c.rows * c.heads;
  let gather: Int32Array | undefined;
  if (c.gathered && c.len > 0) {
    const g = rng.int(1, c.len);
    gather = new Int32Array(pairs * g);
    for (let i = 0; i < gather.length; i++) gather[i] = rng.int(0, c.len - 1);
  }
  const windowRows = Int32Array.from({ length: c.window }, () => rng.int(0, c.lq - 1));
  return {
    rows: c.rows, heads: c.heads, lq: c.lq, d: c.d, cap, len: c.len, lc: c.lc, gather,
    q: n(pairs * c.lq * c.d), hk: n(pairs * cap * c.d), hv: n(pairs * cap * c.d),
    ck: n(pairs * c.lc * c.d), cv: n(pairs * c.lc * c.d), scale: 1 / Math.sqrt(c.d), windowRows,
  };
}

/** The history paged through a random table (test/paged.ts), the table given as a host array or a tensor. */
interface Paging {
  rng: Rng;
  pageTokens: number;
  tableOnDevice: boolean;
}

async function runAttention(e: Engine, p: AttentionProblem & { windowRows: Int32Array }, dtype: 'f32' | 'bf16', withOut = true, paging?: Paging) {
  const sh = (l: number) => [p.rows, p.heads, l, p.d];
  const nKeys = (p.gather ? p.gather.length / (p.rows * p.heads) : p.len) + p.lc;
  const q = e.tensor(p.q, sh(p.lq), dtype);
  const dims = { rows: p.rows, heads: p.heads, cap: p.cap, d: p.d };
  const layout = paging && p.cap > 0 ? randomLayout(paging.rng, p.rows, p.cap, paging.pageTokens) : undefined;
  const poolShape = layout ? [layout.pages, p.heads, layout.pageTokens, p.d] : sh(p.cap);
  const hk = p.cap > 0 ? e.tensor(layout ? scatter(layout, p.hk, dims, NaN) : p.hk, poolShape, dtype) : undefined;
  const hv = p.cap > 0 ? e.tensor(layout ? scatter(layout, p.hv, dims, NaN) : p.hv, poolShape, dtype) : undefined;
  const table = layout && (paging?.tableOnDevice ? e.tensor(layout.table, [p.rows, layout.tablePages], 'i32') : layout.table);
  const ck = p.lc > 0 ? e.tensor(p.ck, sh(p.lc), dtype) : undefined;
  const cv = p.lc > 0 ? e.tensor(p.cv, sh(p.lc), dtype) : undefined;
  const out = withOut ? e.empty(sh(p.lq), dtype, { fillByte: 0xff }) : undefined;
  const nw = p.windowRows.length;
  const logits = nw ? e.empty([p.rows, p.heads, nw, nKeys], 'f32', { fillByte: 0xff }) : undefined;
  const lse = nw ? e.empty([p.rows, p.heads, nw], 'f32', { fillByte: 0xff }) : undefined;
  e.ops.attention({
    q,
    history: hk && hv ? { k: hk, v: hv, len: p.len, gather: p.gather, pageTable: table } : undefined,
    current: ck && cv ? { k: ck, v: cv } : undefined,
    out,
    scale: p.scale,
    window: nw && logits ? { rows: p.windowRows, logits, lse } : undefined,
  });
  const result = {
    out: out ? ((await out.read()) as Float32Array) : undefined,
    logits: logits ? ((await logits.read()) as Float32Array) : undefined,
    lse: lse ? ((await lse.read()) as Float32Array) : undefined,
  };
  for (const t of [q, hk, hv, ck, cv, out, logits, lse, table instanceof Int32Array ? undefined : table]) t?.dispose();
  return result;
}

/** One unit in the last place of an f32 of magnitude x. */
const ulpF32 = (x: number) => 2 ** (Math.floor(Math.log2(Math.max(x, 2 ** -126))) - 23);

/**
 * Window logits and their log-sum-exp over all keys (history, gathered or not, and current) within twice the
 * error of the same computation in f32 arithmetic, plus one ulp of the largest value for the final rounding.
 */
function windowMatches(t: ExecutionContext, r: { logits?: Float32Array; lse?: Float32Array }, w: ReturnType<typeof windowRef>, label: string) {
  for (const [name, got, exact, f32] of [['logits', r.logits, w.logits, w.logitsF32], ['lse', r.lse, w.lse, w.lseF32]] as const) {
    const err = got ? maxAbsDiff(got, exact) : Infinity;
    const refErr = maxAbsDiff(f32, exact);
    t.true(err <= 2 * refErr + ulpF32(maxAbs(exact)), `${label}: window ${name} error ${err} vs f32 reference error ${refErr}`);
  }
}

for (const backend of testBackends()) {
  for (const dtype of ['f32', 'bf16'] as const) {
    test(`attention ${backend} ${dtype}: matches a float64 reference over many shapes`, async (t) => {
      const rng = new Rng(seedFor(t));
      await withEngine(backend, async (e) => {
        for (const c of CASES) {
          const p = makeProblem(rng, c, dtype);
          const r = await runAttention(e, p, dtype);
          const ref = attentionRef(p, dtype === 'bf16' ? roundBf16 : undefined);
          const label = `${JSON.stringify(c)}`;
          const err = maxAbsDiff(r.out!, ref.out);
          if (dtype === 'f32') {
            t.true(err <= 1e-5 * Math.max(1, maxAbs(ref.out)), `${label}: out error ${err}`);
          } else {
            // Within twice the error of a bf16 pipeline (probabilities and output rounded to bf16).
            const refErr = maxAbsDiff(ref.outBf16!, ref.out);
            t.true(err <= 2 * refErr + 1e-6, `${label}: out error ${err} vs bf16 reference error ${refErr}`);
          }
          if (c.window) windowMatches(t, r, windowRef(p, p.windowRows), label);
        }
      });
    });
  }

  test(`attention ${backend}: a paged history (pages of 1 to 64 tokens, shuffled ragged tables) matches the float64 reference and the contiguous history bit for bit`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const cases = [...CASES, ...TILE_CASES].filter((c) => c.len > 0);
      for (const [i, c] of cases.entries()) {
        const dtype = i % 2 ? 'bf16' : 'f32';
        const pageTokens = [1, 3, 16, 64, 7, 32][i % 6];
        const p = makeProblem(rng, c, dtype);
        const label = `${dtype} ${pageTokens}-token pages ${JSON.stringify(c)}`;
        const contiguous = await runAttention(e, p, dtype);
        const paged = await runAttention(e, p, dtype, true, { rng, pageTokens, tableOnDevice: i % 3 === 0 });
        t.deepEqual(paged, contiguous, label);
        const ref = attentionRef(p, dtype === 'bf16' ? roundBf16 : undefined);
        const err = maxAbsDiff(paged.out!, ref.out);
        const bound = dtype === 'f32' ? 1e-5 * Math.max(1, maxAbs(ref.out)) : 2 * maxAbsDiff(ref.outBf16!, ref.out) + 1e-6;
        t.true(err <= bound, `${label}: out error ${err}, bound ${bound}`);
        if (c.window) windowMatches(t, paged, windowRef(p, p.windowRows), label);
      }
    });
  });

  test(`attention ${backend} bf16: warp-tile tails and split-KV shapes match a float64 reference`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const c of TILE_CASES) {
        const p = makeProblem(rng, c, 'bf16');
        p.scale = (c.scaleMul ?? 1) / Math.sqrt(c.d);
        const r = await runAttention(e, p, 'bf16');
        const ref = attentionRef(p, roundBf16);
        const label = JSON.stringify(c);
        const err = maxAbsDiff(r.out!, ref.out);
        const refErr = maxAbsDiff(ref.outBf16!, ref.out);
        t.true(err <= 2 * refErr + 1e-6, `${label}: out error ${err} vs bf16 reference error ${refErr}`);
        if (c.window) windowMatches(t, r, windowRef(p, p.windowRows), label);
      }
    });
  });

  test(`attention ${backend}: window output alone (no out) matches the reference`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const cases: Case[] = [
        { rows: 2, heads: 2, lq: 40, d: 64, len: 90, extraCap: 2, lc: 0, gathered: false, window: 16 },
        { rows: 1, heads: 2, lq: 9, d: 128, len: 70, extraCap: 0, lc: 9, gathered: true, window: 9 },
        { rows: 2, heads: 1, lq: 20, d: 64, len: 0, extraCap: 4, lc: 20, gathered: false, window: 5 },
      ];
      for (const c of cases)
        for (const dtype of ['f32', 'bf16'] as const) {
          const p = makeProblem(rng, c, dtype);
          windowMatches(t, await runAttention(e, p, dtype, false), windowRef(p, p.windowRows), `${dtype} ${JSON.stringify(c)}`);
        }
    });
  });

  test(`attention ${backend}: bad inputs throw coded errors at the call or the next await`, async (t) => {
    await withEngine(backend, async (e) => {
      const q = e.tensor(new Float32Array(2 * 64).fill(0.5), [1, 1, 2, 64], 'f32');
      const k = e.tensor(new Float32Array(3 * 64).fill(0.25), [1, 1, 3, 64], 'f32');
      const kb = e.tensor(new Float32Array(3 * 64).fill(0.25), [1, 1, 3, 64], 'bf16');
      const out = e.empty([1, 1, 2, 64], 'f32');
      t.throws(() => e.ops.attention({ q, current: { k, v: kb }, out, scale: 1 }), { code: 'ERR_DTYPE' });
      t.throws(() => e.ops.attention({ q, current: { k, v: k }, out: e.empty([1, 1, 3, 64], 'f32'), scale: 1 }), { code: 'ERR_SHAPE' });
      t.throws(() => e.ops.attention({ q, current: { k, v: k }, out: q, scale: 1 }), { code: 'ERR_INVALID_ARG' });
      t.throws(() => e.ops.attention({ q, out, scale: 1 }), { code: 'ERR_SHAPE' });
      t.throws(() => e.ops.attention({ q, history: { k, v: k, len: 4 }, out, scale: 1 }), { code: 'ERR_SHAPE' });
      // Gather indices are data: they are checked where the data lives and reported at the next await.
      e.ops.attention({ q, history: { k, v: k, len: 2, gather: new Int32Array([0, 2]) }, out, scale: 1 });
      await t.throwsAsync(e.sync(), { code: 'ERR_INDEX_RANGE' });
      e.ops.attention({ q, current: { k, v: k }, out, scale: 1 });
      await t.notThrowsAsync(e.sync());
      // A paged history: its pool's first axis counts pages, which only a page table may make differ from the rows.
      const pool = e.tensor(new Float32Array(3 * 2 * 64).fill(0.25), [3, 1, 2, 64], 'f32');
      t.throws(() => e.ops.attention({ q, history: { k: pool, v: pool, len: 2 }, out, scale: 1 }), { code: 'ERR_SHAPE', message: /pages/ });
      t.throws(() => e.ops.attention({ q, history: { k: pool, v: pool, len: 5, pageTable: new Int32Array([0, 1]) }, out, scale: 1 }), { code: 'ERR_SHAPE' });
      const twoRows = e.tensor(new Int32Array([0, 1, 2, 0]), [2, 2], 'i32');
      t.throws(() => e.ops.attention({ q, history: { k: pool, v: pool, len: 2, pageTable: twoRows }, out, scale: 1 }), { code: 'ERR_SHAPE' }, 'a table row per q row');
      // Page-table entries are data: those a call reads must name pages of the pool.
      e.ops.attention({ q, history: { k: pool, v: pool, len: 3, pageTable: new Int32Array([2, 3]) }, out, scale: 1 });
      await t.throwsAsync(e.sync(), { code: 'ERR_INDEX_RANGE' });
      e.ops.attention({ q, history: { k: pool, v: pool, len: 2, pageTable: new Int32Array([2, -1]) }, out, scale: 1 });
      await t.notThrowsAsync(e.sync(), 'entries past the history are never read');
    });
  });
}
