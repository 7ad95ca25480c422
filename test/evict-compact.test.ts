import test, { type ExecutionContext } from 'ava';
import type { BackendName, Engine } from '../lib/engine.js';
import { Rng, seedFor, testBackends, withEngine } from './helpers.js';
import { firstOutsideChanged, gather, randomLayout, scatter } from './paged.js';

function sortedSample(rng: Rng, n: number, total: number): number[] {
  const all = Array.from({ length: total }, (_, i) => i);
  for (let i = total - 1; i > 0; i--) {
    const j = rng.int(0, i);
    [all[i], all[j]] = [all[j], all[i]];
  }
  return all.slice(0, n).sort((a, b) => a - b);
}

/** Expected buffer after compaction: rows [0, nKeep) gathered from [history ‖ current], the rest untouched. */
function expected(hist: Uint16Array | Float32Array, cur: Uint16Array | Float32Array, keep: Int32Array, pairs: number, cap: number, len: number, lc: number, d: number, n: number) {
  const out = hist.slice();
  for (let p = 0; p < pairs; p++) {
    for (let i = 0; i < n; i++) {
      const s = keep[p * n + i];
      const src = s < len ? hist.subarray((p * cap + s) * d, (p * cap + s + 1) * d) : cur.subarray((p * lc + s - len) * d, (p * lc + s - len + 1) * d);
      out.set(src, (p * cap + i) * d);
    }
  }
  return out;
}

/** A non-decreasing list with repeats: n draws with replacement, sorted; some lists one index n times. */
function sortedWithRepeats(rng: Rng, n: number, total: number): number[] {
  if (rng.int(0, 5) === 0) return new Array(n).fill(rng.int(0, total - 1));
  return Array.from({ length: n }, () => rng.int(0, total - 1)).sort((a, b) => a - b);
}

/** Patterns a float conversion could alter: ±0, ±inf, quiet and signalling NaNs of both signs, subnormals, ±max. */
const SPECIAL_BF16 = [0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0xffc0, 0x7f81, 0xff81, 0x7fff, 0xffff, 0x0001, 0x8001, 0x007f, 0x807f, 0x7f7f, 0xff7f];
const SPECIAL_F32 = [0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7fffffff, 0xffffffff, 0x00000001, 0x80000001, 0x007fffff, 0x807fffff, 0x7f7fffff, 0xff7fffff];
const BIT_CLASSES = ['+0', '-0', '+inf', '-inf', '+nan', '-nan', '+subnormal', '-subnormal', '+normal', '-normal'];

/** Uniform 16-bit patterns (every sign, exponent and NaN payload), one in eight drawn from SPECIAL_BF16. */
function randomBits16(rng: Rng, count: number): Uint16Array {
  return Uint16Array.from({ length: count }, () => (rng.int(0, 7) === 0 ? rng.pick(SPECIAL_BF16) : rng.int(0, 0xffff)));
}

function randomBits32(rng: Rng, count: number): Uint32Array {
  return Uint32Array.from({ length: count }, () => (rng.int(0, 7) === 0 ? rng.pick(SPECIAL_F32) : (rng.int(0, 0xffff) << 16) | rng.int(0, 0xffff)));
}

function bitsOf(a: Uint16Array | Float32Array): Uint16Array | Uint32Array {
  return a instanceof Uint16Array ? a : new Uint32Array(a.buffer, a.byteOffset, a.length);
}

function bitClass(bits: number, dtype: 'f32' | 'bf16'): string {
  const [expBits, manBits] = dtype === 'f32' ? [8, 23] : [8, 7];
  const sign = bits >>> (expBits + manBits) ? '-' : '+';
  const exp = (bits >>> manBits) & ((1 << expBits) - 1);
  const man = bits & ((1 << manBits) - 1);
  if (exp === (1 << expBits) - 1) return sign + (man ? 'nan' : 'inf');
  if (exp === 0) return sign + (man ? 'subnormal' : '0');
  return sign + 'normal';
}

/** Index of the first element whose bits differ (or -2 on a length mismatch), -1 when all are identical. */
function firstBitDifference(got: ArrayLike<number>, want: Uint16Array | Float32Array): number {
  if (got.length !== want.length || !(got instanceof Uint16Array || got instanceof Float32Array)) return -2;
  const [g, w] = [bitsOf(got), bitsOf(want)];
  for (let i = 0; i < w.length; i++) if (g[i] !== w[i]) return i;
  return -1;
}

/** Bits no random draw of the tests produces twice in a row... and never a kept value: the pages' poison. */
const POISON = { f32: 0xdeadbeef, bf16: 0xdead };
const bitView = (a: Float32Array | Uint16Array): Uint32Array | Uint16Array => (a instanceof Float32Array ? new Uint32Array(a.buffer, a.byteOffset, a.length) : a);
const dataView = (a: Uint32Array | Uint16Array): Float32Array | Uint16Array => (a instanceof Uint32Array ? new Float32Array(a.buffer, a.byteOffset, a.length) : a);

/** With pageTokens, the history is a shuffled paged pool (test/paged.ts) and is read back through its table. */
async function roundTrip(e: Engine, rng: Rng, dtype: 'f32' | 'bf16', rows: number, heads: number, cap: number, len: number, lc: number, d: number, n: number, repeats = false, pageTokens?: number) {
  const pairs = rows * heads;
  const mk = (count: number) => (dtype === 'f32' ? new Float32Array(randomBits32(rng, count).buffer) : randomBits16(rng, count));
  const hk = mk(pairs * cap * d), hv = mk(pairs * cap * d), ck = mk(pairs * lc * d), cv = mk(pairs * lc * d);
  const keep = new Int32Array(pairs * n);
  for (let p = 0; p < pairs; p++) keep.set(repeats ? sortedWithRepeats(rng, n, len + lc) : sortedSample(rng, n, len + lc), p * n);
  const T = (a: Float32Array | Uint16Array, l: number) => e.tensor(a, [rows, heads, l, d], dtype, { category: 'kv' });
  const dims = { rows, heads, cap, d };
  const layout = pageTokens ? randomLayout(rng, rows, cap, pageTokens) : undefined;
  const pool = (a: Float32Array | Uint16Array) =>
    layout ? e.tensor(dataView(scatter(layout, bitView(a), dims, POISON[dtype])), [layout.pages, heads, layout.pageTokens, d], dtype, { category: 'kv' }) : T(a, cap);
  const [HK, HV] = [pool(hk), pool(hv)];
  const cur = lc > 0 ? { k: T(ck, lc), v: T(cv, lc) } : undefined;
  // A host table needs another operand that knows the rows (the pool's first axis counts pages): without a current
  // one, the table goes as a tensor.
  const table = layout && (lc === 0 || rng.int(0, 1) ? e.tensor(layout.table, [rows, layout.tablePages], 'i32') : layout.table);
  const newLen = e.ops.evictCompact({ history: { k: HK, v: HV, len, pageTable: table }, current: cur, keep, repeats });
  const [rawK, rawV] = [await HK.readRaw(), await HV.readRaw()];
  for (const x of [HK, HV, cur?.k, cur?.v, table instanceof Int32Array ? undefined : table]) x?.dispose();
  // The pages past the history's reach still hold the poison; the rest, gathered, is the contiguous result.
  const outside = layout ? [rawK, rawV].map((raw) => firstOutsideChanged(layout, bitView(raw as Float32Array | Uint16Array), dims, POISON[dtype])) : [-1, -1];
  const unpaged = (raw: ArrayLike<number>) => (layout ? dataView(gather(layout, bitView(raw as Float32Array | Uint16Array), dims, cap)) : raw);
  return {
    newLen, gotK: unpaged(rawK), gotV: unpaged(rawV), outside,
    wantK: expected(hk, ck, keep, pairs, cap, len, lc, d, n), wantV: expected(hv, cv, keep, pairs, cap, len, lc, d, n),
  };
}

type Shape = [rows: number, heads: number, cap: number, len: number, lc: number, d: number, nKeep: number];

async function compactsExactly(t: ExecutionContext, backend: BackendName, shapes: Shape[], repeats: boolean, paged = false) {
  const rng = new Rng(seedFor(t));
  const covered = { f32: new Set<string>(), bf16: new Set<string>() };
  await withEngine(backend, async (e) => {
    for (const dtype of ['f32', 'bf16'] as const) {
      for (const [i, shape] of shapes.entries()) {
        const pageTokens = paged ? [1, 16, 5, 64, 2, 33, 8][i % 7] : undefined;
        const r = await roundTrip(e, rng, dtype, ...shape, repeats, pageTokens);
        t.is(r.newLen, shape[6]);
        t.deepEqual(r.outside, [-1, -1], `${dtype} ${shape} in ${pageTokens}-token pages: first changed element outside the table's reach`);
        t.is(firstBitDifference(r.gotK, r.wantK), -1, `${dtype} K ${shape}: first differing element`);
        t.is(firstBitDifference(r.gotV, r.wantV), -1, `${dtype} V ${shape}: first differing element`);
        for (const x of [r.wantK, r.wantV]) {
          const kept = bitsOf(x);
          for (let p = 0; p < shape[0] * shape[1]; p++)
            for (const v of kept.subarray(p * shape[2] * shape[5], (p * shape[2] + shape[6]) * shape[5])) covered[dtype].add(bitClass(v, dtype));
        }
      }
    }
  });
  // The moved rows held every class of pattern, so a kernel that converts through float arithmetic (and so
  // canonicalises NaNs, flushes subnormals or drops the sign of zero) cannot pass.
  for (const dtype of ['f32', 'bf16'] as const) t.deepEqual([...covered[dtype]].sort(), [...BIT_CLASSES].sort(), `${dtype} patterns moved`);
}

const SHAPES: Shape[] = [
  [1, 1, 8, 5, 3, 64, 4],
  [2, 3, 40, 33, 17, 128, 40],
  [1, 2, 300, 290, 0, 64, 123],
  [2, 1, 64, 0, 64, 64, 30],
  [1, 1, 650, 632, 400, 128, 632],
  [3, 2, 20, 20, 5, 8, 0],
  [1, 4, 100, 100, 0, 64, 100],
];

// Lists longer than the CUDA kernel's chunks and scan blocks, and lists that fill the capacity.
const REPEAT_SHAPES: Shape[] = [
  [1, 1, 8, 5, 3, 64, 8],
  [2, 3, 40, 33, 17, 128, 40],
  [1, 2, 1100, 1000, 100, 64, 1100],
  [2, 1, 64, 0, 64, 64, 30],
  [1, 1, 920, 521, 400, 128, 920],
  [1, 2, 30, 30, 0, 3, 17],
];

for (const backend of testBackends()) {
  test(`evictCompact ${backend}: moves exactly the kept rows, in place, for many shapes`, (t) => compactsExactly(t, backend, SHAPES, false));
  test(`evictCompact ${backend}: repeated indices copy their row once per occurrence (the official avgpool gather)`, (t) =>
    compactsExactly(t, backend, REPEAT_SHAPES, true));
  test(`evictCompact ${backend}: a paged history (pages of 1 to 64 tokens, shuffled ragged tables) compacts exactly, within its pages`, (t) =>
    compactsExactly(t, backend, SHAPES, false, true).then(() => compactsExactly(t, backend, REPEAT_SHAPES, true, true)));

  test(`evictCompact ${backend}: a bad keep list anywhere changes nothing and rejects with a code`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const [rows, heads, cap, len, lc, d] = [2, 2, 12, 10, 4, 64];
      const hk = rng.normals(rows * heads * cap * d), ck = rng.normals(rows * heads * lc * d);
      const HK = e.tensor(hk, [rows, heads, cap, d], 'f32'), HV = e.tensor(hk, [rows, heads, cap, d], 'f32');
      const CK = e.tensor(ck, [rows, heads, lc, d], 'f32'), CV = e.tensor(ck, [rows, heads, lc, d], 'f32');
      const good = [0, 3, 5, 11];
      const cases: [number[], string][] = [
        [[0, 3, 3, 11], 'ERR_INDEX_ORDER'],
        [[0, 5, 3, 11], 'ERR_INDEX_ORDER'],
        [[0, 3, 5, 14], 'ERR_INDEX_RANGE'],
        [[-1, 3, 5, 11], 'ERR_INDEX_RANGE'],
      ];
      for (const [bad, code] of cases) {
        // Only the last (row, head) is bad: the good ones must not move either.
        const keep = new Int32Array([...good, ...good, ...good, ...bad]);
        e.ops.evictCompact({ history: { k: HK, v: HV, len }, current: { k: CK, v: CV }, keep });
        await t.throwsAsync(e.sync(), { code }, `${bad}`);
        t.deepEqual(await HK.read(), hk, `history changed by a rejected list ${bad}`);
      }
      // With repeats, equal neighbours are allowed and a decrease is still refused.
      e.ops.evictCompact({ history: { k: HK, v: HV, len }, current: { k: CK, v: CV }, keep: new Int32Array([...good, ...good, ...good, 0, 5, 3, 11]), repeats: true });
      await t.throwsAsync(e.sync(), { code: 'ERR_INDEX_ORDER' });
      t.deepEqual(await HK.read(), hk);
      e.ops.evictCompact({ history: { k: HK, v: HV, len }, current: { k: CK, v: CV }, keep: new Int32Array([...good, ...good, ...good, 0, 3, 3, 11]), repeats: true });
      await e.sync();
      const got = (await HK.read()) as Float32Array;
      const row = (p: number, i: number) => hk.subarray((p * cap + i) * d, (p * cap + i + 1) * d);
      t.deepEqual(got.subarray((3 * cap + 2) * d, (3 * cap + 3) * d), row(3, 3), 'the repeated row is copied twice');
      // A paged history: the table entries of the tokens read or written ([0, max(len, kept))) must name pages.
      const pool = e.tensor(hk.subarray(0, 6 * heads * 4 * d), [6, heads, 4, d], 'f32');
      const poolV = e.tensor(hk.subarray(0, 6 * heads * 4 * d), [6, heads, 4, d], 'f32');
      const before = await pool.read();
      const keep4 = new Int32Array(rows * heads * 4).map((_, i) => [0, 3, 5, 11][i % 4]);
      for (const [table, code] of [[[0, 1, 2, 3, 4, 6], 'ERR_INDEX_RANGE'], [[0, 1, -1, 3, 4, 5], 'ERR_INDEX_RANGE']] as const) {
        e.ops.evictCompact({ history: { k: pool, v: poolV, len, pageTable: new Int32Array(table) }, current: { k: CK, v: CV }, keep: keep4 });
        await t.throwsAsync(e.sync(), { code }, `table ${table}`);
        t.deepEqual(await pool.read(), before, `pool changed by a rejected table ${table}`);
      }
      t.throws(() => e.ops.evictCompact({ history: { k: pool, v: poolV, len }, current: { k: CK, v: CV }, keep: keep4 }), { code: 'ERR_SHAPE' }, 'a pool without a table');
      t.throws(() => e.ops.evictCompact({ history: { k: HK, v: HV, len }, keep: new Int32Array(4), repeats: 1 as unknown as boolean }), { code: 'ERR_INVALID_ARG' });
      t.throws(() => e.ops.evictCompact({ history: { k: HK, v: HV, len }, keep: new Int32Array(rows * heads * 13) }), { code: 'ERR_SHAPE' });
      t.throws(() => e.ops.evictCompact({ history: { k: HK, v: HV, len: 13 }, keep: new Int32Array(4) }), { code: 'ERR_SHAPE' });
      t.throws(() => e.ops.evictCompact({ history: { k: HK, v: HK, len }, keep: new Int32Array(4) }), { code: 'ERR_INVALID_ARG' });
    });
  });
}
