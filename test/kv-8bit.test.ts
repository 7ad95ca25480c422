// 8-bit K/V (kvFormat 'int8' / 'fp8', kernels/kv_quant.h, lib/kv/quant.ts): the TypeScript quantiser against the
// formats' definitions; qkNormRope's stored codes and scales equal that quantiser applied to the op's own f32 K/V,
// bit for bit, on every backend; attention over 8-bit history and current rows (contiguous and paged, gathered,
// with the window output) against a float64 reference over the dequantised rows; evictCompact moving codes and
// scales exactly; and the coded errors of a mismatched call.
import test from 'ava';
import type { Engine, Tensor } from '../lib/engine.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../lib/dtype.js';
import { decodeKvCode, dequantiseKvRows, fp8E4m3ToNumber, numberToFp8E4m3, quantiseKvRow, type QuantisedKvFormat } from '../lib/kv/quant.js';
import { attentionRef, type AttentionProblem, windowRef } from './reference.js';
import { bf16Round, maxAbs, maxAbsDiff, Rng, seedFor, syntheticText, testBackends, withEngine } from './helpers.js';
import { FullKvPolicy } from '../lib/kv/baselines.js';
import { generate } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { pagedRow, randomLayout, scatter, type PageLayout } from './paged.js';

const FORMATS: QuantisedKvFormat[] = ['int8', 'fp8'];
const roundBf16 = (x: number) => bf16BitsToF32(f32ToBf16Bits(x));

test('fp8 e4m3: every finite code round-trips, midpoints round to the even code, large values saturate', (t) => {
  for (let b = 0; b < 256; b++) {
    if ((b & 0x7f) === 0x7f) continue;  // the two NaN codes
    t.is(numberToFp8E4m3(fp8E4m3ToNumber(b)), b === 0x80 ? 0x80 : b, `code ${b}`);
  }
  for (let b = 0; b < 0x7e; b++) {
    const mid = (fp8E4m3ToNumber(b) + fp8E4m3ToNumber(b + 1)) / 2;
    t.is(numberToFp8E4m3(mid), b % 2 === 0 ? b : b + 1, `midpoint above code ${b}`);
    t.is(numberToFp8E4m3(-mid), 0x80 | (b % 2 === 0 ? b : b + 1), `midpoint below code ${0x80 | b}`);
  }
  t.is(fp8E4m3ToNumber(0x7e), 448);
  t.is(fp8E4m3ToNumber(0x01), 2 ** -9);
  t.is(fp8E4m3ToNumber(0x08), 2 ** -6);
  for (const x of [448, 449, 1e6, Infinity]) t.is(numberToFp8E4m3(x), 0x7e);
  t.is(numberToFp8E4m3(-1e6), 0xfe);
});

test('quantiseKvRow: within half a step (int8) or 2^-4 relative (fp8) of the row, zero and NaN rows kept visible', (t) => {
  const rng = new Rng(seedFor(t));
  for (const format of FORMATS)
    for (let i = 0; i < 200; i++) {
      const row = rng.normals(rng.int(1, 256)).map((x) => x * 10 ** rng.int(-3, 3));
      const { codes, scale } = quantiseKvRow(format, row);
      const amax = maxAbs(row);
      t.is(scale, Math.fround(amax / (format === 'int8' ? 127 : 448)));
      const back = dequantiseKvRows(format, codes, Float32Array.of(scale), row.length);
      for (let d = 0; d < row.length; d++) {
        const bound = format === 'int8' ? scale * 0.5 * (1 + 1e-6) : Math.max(Math.abs(row[d]) * 2 ** -4, scale * 2 ** -10) * (1 + 1e-6);
        if (!(Math.abs(back[d] - row[d]) <= bound)) {
          t.fail(`${format} row ${i} element ${d}: ${row[d]} -> ${back[d]}, bound ${bound}`);
          return;
        }
      }
      t.is(Math.max(...Array.from(codes, (c) => Math.abs(decodeKvCode(format, c)))), format === 'int8' ? 127 : 448, 'the largest element takes the largest code');
    }
  t.deepEqual(quantiseKvRow('int8', new Float32Array(4)), { codes: new Uint8Array(4), scale: 0 });
  t.true(Number.isNaN(quantiseKvRow('fp8', Float32Array.of(1, NaN)).scale));
});

/** Per-row codes and scales of [rows, d] f32 data. */
function quantiseRows(format: QuantisedKvFormat, data: Float32Array, d: number): { codes: Uint8Array; scales: Float32Array; values: Float32Array } {
  const n = data.length / d;
  const codes = new Uint8Array(data.length);
  const scales = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const q = quantiseKvRow(format, data.subarray(i * d, (i + 1) * d));
    codes.set(q.codes, i * d);
    scales[i] = q.scale;
  }
  return { codes, scales, values: dequantiseKvRows(format, codes, scales, d) };
}

for (const backend of testBackends()) {
  test(`qkNormRope ${backend}: 8-bit K/V are the quantiser's codes and scales of the op's own f32 K/V, paged and contiguous`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const [i, format] of [...FORMATS, ...FORMATS].entries()) {
        const [B, L, H, c] = [2, rng.int(1, 9), rng.int(1, 3), [8, 64, 128, 40][i % 4]];
        const offset = rng.int(0, 5);
        const cap = offset + L + rng.int(0, 3);
        const layout = i >= 2 ? randomLayout(rng, B, cap, [1, 4][i % 2]) : undefined;
        const poolShape = layout ? [layout.pages, H, layout.pageTokens] : [B, H, cap];
        const qkv = e.tensor(rng.normals(B * L * 3 * H * c).map((x) => x * 3), [B, L, 3 * H * c], 'f32');
        const positions = Int32Array.from({ length: 2 * L }, () => rng.int(0, 30));
        const vBias = e.tensor(rng.normals(H * c), [H * c], 'f32');
        const table = layout?.table;
        const q = e.empty([B, H, L, c], 'f32');
        const k = e.empty([...poolShape, c], 'f32', { fillByte: 0 });
        const v = e.empty([...poolShape, c], 'f32', { fillByte: 0 });
        e.ops.qkNormRope({ qkv, positions, vBias, q, k, v, kvOffset: offset, pageTable: table });
        const [kf, vf] = (await Promise.all([k.read(), v.read()])) as Float32Array[];
        const k8 = e.empty([...poolShape, c], 'u8', { fillByte: 0xa5 });
        const v8 = e.empty([...poolShape, c], 'u8', { fillByte: 0xa5 });
        const ks = e.empty(poolShape, 'f32', { fillByte: 0xff });
        const vs = e.empty(poolShape, 'f32', { fillByte: 0xff });
        e.ops.qkNormRope({ qkv, positions, vBias, q, k: k8, v: v8, kScale: ks, vScale: vs, kvFormat: format, kvOffset: offset, pageTable: table });
        const [kc, vc, ksc, vsc] = await Promise.all([k8.read(), v8.read(), ks.read(), vs.read()]);
        const label = `${format} B=${B} L=${L} H=${H} c=${c} offset=${offset}${layout ? ` ${layout.pageTokens}-token pages` : ''}`;
        let checked = 0;
        for (let r = 0; r < B; r++)
          for (let h = 0; h < H; h++)
            for (let tok = 0; tok < cap; tok++) {
              const row = layout ? pagedRow(layout, H, r, h, tok) : (r * H + h) * cap + tok;
              const written = tok >= offset && tok < offset + L;
              for (const [f32, codes, scales, name] of [[kf, kc, ksc, 'k'], [vf, vc, vsc, 'v']] as const) {
                const got = codes.subarray(row * c, (row + 1) * c) as Uint8Array;
                if (!written) {
                  if (got.some((x) => x !== 0xa5) || !Number.isNaN((scales as Float32Array)[row])) t.fail(`${label}: ${name} row ${tok} of (${r}, ${h}) was written`);
                  continue;
                }
                const want = quantiseKvRow(format, f32.subarray(row * c, (row + 1) * c) as Float32Array);
                if (Buffer.compare(Buffer.from(got), Buffer.from(want.codes)) !== 0 || (scales as Float32Array)[row] !== want.scale)
                  t.fail(`${label}: ${name} token ${tok} of (${r}, ${h}): codes or scale differ from the quantiser's`);
                checked++;
              }
            }
        t.is(checked, 2 * B * H * L, label);
        for (const x of [qkv, vBias, q, k, v, k8, v8, ks, vs]) x.dispose();
      }
    });
  });
}

/** Queries, history and current keys per (row, head); a gathered history; window rows; a paged history's page size. */
type Case = { rows: number; heads: number; lq: number; d: number; len: number; lc: number; gathered: boolean; window: number; pageTokens?: number };

// Every attention path with 8-bit rows: the tensor-core kernel's tiles (head dims 64 and 128, 64- and 128-row
// query blocks, split-KV), the SIMT kernel (f32 q, head dim 80), gathered and paged histories, current rows only.
const CASES: Case[] = [
  { rows: 1, heads: 1, lq: 1, d: 64, len: 0, lc: 1, gathered: false, window: 0 },
  { rows: 2, heads: 2, lq: 5, d: 64, len: 40, lc: 23, gathered: false, window: 2, pageTokens: 16 },
  { rows: 2, heads: 1, lq: 33, d: 128, len: 50, lc: 14, gathered: false, window: 3 },
  { rows: 1, heads: 2, lq: 100, d: 128, len: 60, lc: 5, gathered: false, window: 0, pageTokens: 3 },
  { rows: 2, heads: 2, lq: 33, d: 64, len: 280, lc: 50, gathered: true, window: 5, pageTokens: 16 },
  { rows: 1, heads: 2, lq: 1, d: 128, len: 300, lc: 0, gathered: false, window: 1 },
  { rows: 1, heads: 1, lq: 65, d: 64, len: 200, lc: 0, gathered: false, window: 0, pageTokens: 64 },
  { rows: 2, heads: 2, lq: 17, d: 80, len: 65, lc: 19, gathered: true, window: 4, pageTokens: 7 },
];

async function attend8(e: Engine, rng: Rng, c: Case, format: QuantisedKvFormat, dtype: 'f32' | 'bf16') {
  const pairs = c.rows * c.heads;
  const round = dtype === 'bf16' ? bf16Round : (a: Float32Array) => a;
  const q = round(rng.normals(pairs * c.lq * c.d));
  const hist = { k: quantiseRows(format, rng.normals(pairs * c.len * c.d).map((x) => x * 2), c.d), v: quantiseRows(format, rng.normals(pairs * c.len * c.d), c.d) };
  const cur = { k: quantiseRows(format, rng.normals(pairs * c.lc * c.d).map((x) => x * 2), c.d), v: quantiseRows(format, rng.normals(pairs * c.lc * c.d), c.d) };
  let gatherList: Int32Array | undefined;
  if (c.gathered && c.len > 0) {
    const g = rng.int(1, c.len);
    gatherList = Int32Array.from({ length: pairs * g }, () => rng.int(0, c.len - 1));
  }
  const windowRows = Int32Array.from({ length: c.window }, () => rng.int(0, c.lq - 1));
  // The reference attends over the dequantised rows (f32 products, as every kernel forms them).
  const p: AttentionProblem = {
    rows: c.rows, heads: c.heads, lq: c.lq, d: c.d, cap: c.len, len: c.len, lc: c.lc, gather: gatherList, q,
    hk: hist.k.values, hv: hist.v.values, ck: cur.k.values, cv: cur.v.values, scale: 1 / Math.sqrt(c.d),
  };

  const dims = { rows: c.rows, heads: c.heads, cap: c.len, d: c.d };
  const layout: PageLayout | undefined = c.pageTokens && c.len > 0 ? randomLayout(rng, c.rows, c.len, c.pageTokens) : undefined;
  const made: Tensor[] = [];
  const put = (data: Uint8Array | Float32Array, shape: number[], dtypeOf: 'u8' | 'f32' | 'bf16') => {
    made.push(e.tensor(data, shape, dtypeOf));
    return made[made.length - 1];
  };
  const pool = (x: { codes: Uint8Array; scales: Float32Array }) => {
    if (!layout) return { codes: put(x.codes, [c.rows, c.heads, c.len, c.d], 'u8'), scales: put(x.scales, [c.rows, c.heads, c.len], 'f32') };
    const codes = scatter(layout, new Uint32Array(x.codes), dims, 0xff);
    const scales = scatter(layout, new Float32Array(x.scales), { ...dims, d: 1 }, NaN);
    return { codes: put(Uint8Array.from(codes), [layout.pages, c.heads, layout.pageTokens, c.d], 'u8'), scales: put(scales, [layout.pages, c.heads, layout.pageTokens], 'f32') };
  };
  const hk = c.len > 0 ? pool(hist.k) : undefined;
  const hv = c.len > 0 ? pool(hist.v) : undefined;
  const ck = c.lc > 0 ? put(cur.k.codes, [c.rows, c.heads, c.lc, c.d], 'u8') : undefined;
  const cv = c.lc > 0 ? put(cur.v.codes, [c.rows, c.heads, c.lc, c.d], 'u8') : undefined;
  const cks = c.lc > 0 ? put(cur.k.scales, [c.rows, c.heads, c.lc], 'f32') : undefined;
  const cvs = c.lc > 0 ? put(cur.v.scales, [c.rows, c.heads, c.lc], 'f32') : undefined;
  const qt = put(q, [c.rows, c.heads, c.lq, c.d], dtype);
  const out = e.empty([c.rows, c.heads, c.lq, c.d], dtype, { fillByte: 0xff });
  const nKeys = (gatherList ? gatherList.length / pairs : c.len) + c.lc;
  const logits = c.window ? e.empty([c.rows, c.heads, c.window, nKeys], 'f32', { fillByte: 0xff }) : undefined;
  const lse = c.window ? e.empty([c.rows, c.heads, c.window], 'f32', { fillByte: 0xff }) : undefined;
  made.push(out, ...(logits && lse ? [logits, lse] : []));
  e.ops.attention({
    q: qt,
    history: hk && hv ? { k: hk.codes, v: hv.codes, kScale: hk.scales, vScale: hv.scales, len: c.len, gather: gatherList, pageTable: layout?.table } : undefined,
    current: ck && cv ? { k: ck, v: cv, kScale: cks, vScale: cvs } : undefined,
    kvFormat: format,
    out,
    scale: p.scale,
    window: logits ? { rows: windowRows, logits, lse } : undefined,
  });
  const got = {
    out: (await out.read()) as Float32Array,
    logits: logits ? ((await logits.read()) as Float32Array) : undefined,
    lse: lse ? ((await lse.read()) as Float32Array) : undefined,
  };
  for (const x of made) x.dispose();
  return { p, windowRows, got };
}

for (const backend of testBackends()) {
  for (const dtype of ['f32', 'bf16'] as const) {
    test(`attention ${backend} ${dtype}: 8-bit history and current rows match a float64 reference over the dequantised rows`, async (t) => {
      const rng = new Rng(seedFor(t));
      await withEngine(backend, async (e) => {
        for (const format of FORMATS)
          for (const c of CASES) {
            const { p, windowRows, got } = await attend8(e, rng, c, format, dtype);
            const label = `${format} ${JSON.stringify(c)}`;
            const ref = attentionRef(p, dtype === 'bf16' ? roundBf16 : undefined);
            const err = maxAbsDiff(got.out, ref.out);
            if (dtype === 'f32') {
              t.true(err <= 1e-5 * Math.max(1, maxAbs(ref.out)), `${label}: out error ${err}`);
            } else {
              // Twice a bf16 pipeline's error, plus what rounding the decoded rows to bf16 (the tensor-core tiles) moves.
              const tiles = attentionRef({ ...p, hk: bf16Round(p.hk), hv: bf16Round(p.hv), ck: bf16Round(p.ck), cv: bf16Round(p.cv) });
              const bound = 2 * maxAbsDiff(ref.outBf16!, ref.out) + maxAbsDiff(tiles.out, ref.out) + 1e-6;
              t.true(err <= bound, `${label}: out error ${err}, bound ${bound}`);
            }
            if (c.window) {
              const w = windowRef(p, windowRows);
              for (const [name, have, exact, f32] of [['logits', got.logits, w.logits, w.logitsF32], ['lse', got.lse, w.lse, w.lseF32]] as const) {
                const e2 = have ? maxAbsDiff(have, exact) : Infinity;
                t.true(e2 <= 2 * maxAbsDiff(f32, exact) + 2 ** -20 * Math.max(1, maxAbs(exact)), `${label}: window ${name} error ${e2}`);
              }
            }
          }
      });
    });
  }

  test(`evictCompact ${backend}: 8-bit rows and their scales move exactly, paged and contiguous, with repeats`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (let i = 0; i < 8; i++) {
        const [rows, heads, d] = [rng.int(1, 3), rng.int(1, 3), [4, 16, 64, 128, 5][i % 5]];
        const len = rng.int(0, 40);
        const lc = rng.int(len === 0 ? 1 : 0, 20);
        const cap = len + lc;
        const nKeep = rng.int(1, cap);
        const repeats = i % 3 === 2;
        const pairs = rows * heads;
        const keep = new Int32Array(pairs * nKeep);
        for (let rh = 0; rh < pairs; rh++) {
          // Repeats: nKeep draws, sorted. Otherwise a sorted random subset: each entry kept with the odds left.
          const picks: number[] = [];
          if (repeats) for (let j = 0; j < nKeep; j++) picks.push(rng.int(0, cap - 1));
          else for (let j = 0; j < cap && picks.length < nKeep; j++) if (rng.next() * (cap - j) < nKeep - picks.length) picks.push(j);
          keep.set(picks.sort((a, b) => a - b), rh * nKeep);
        }
        const layout = i % 2 ? randomLayout(rng, rows, cap, [1, 4, 16][i % 3]) : undefined;
        const dims = { rows, heads, cap, d };
        const histCodes = Uint8Array.from({ length: pairs * cap * d }, () => rng.int(0, 255));
        const histScales = rng.normals(pairs * cap);
        const curCodes = Uint8Array.from({ length: pairs * lc * d }, () => rng.int(0, 255));
        const curScales = rng.normals(pairs * lc);
        const poolShape = layout ? [layout.pages, heads, layout.pageTokens] : [rows, heads, cap];
        const hk = e.tensor(layout ? Uint8Array.from(scatter(layout, new Uint32Array(histCodes), dims, 0x77)) : histCodes, [...poolShape, d], 'u8');
        const ks = e.tensor(layout ? scatter(layout, histScales, { ...dims, d: 1 }, 7) : histScales, poolShape, 'f32');
        const hv = e.tensor(layout ? Uint8Array.from(scatter(layout, new Uint32Array(histCodes.map((x) => x ^ 0x3c)), dims, 0x77)) : histCodes.map((x) => x ^ 0x3c), [...poolShape, d], 'u8');
        const vs = e.tensor(layout ? scatter(layout, histScales.map((x) => -x), { ...dims, d: 1 }, 7) : histScales.map((x) => -x), poolShape, 'f32');
        const ck = lc ? e.tensor(curCodes, [rows, heads, lc, d], 'u8') : undefined;
        const cv = lc ? e.tensor(curCodes.map((x) => x ^ 0x3c), [rows, heads, lc, d], 'u8') : undefined;
        const cks = lc ? e.tensor(curScales, [rows, heads, lc], 'f32') : undefined;
        const cvs = lc ? e.tensor(curScales.map((x) => -x), [rows, heads, lc], 'f32') : undefined;
        // The table on the device: with no current rows, nothing else says how many rows a host table has.
        const table = layout && e.tensor(layout.table, [rows, layout.tablePages], 'i32');
        e.ops.evictCompact({
          history: { k: hk, v: hv, kScale: ks, vScale: vs, len, pageTable: table },
          current: ck && cv ? { k: ck, v: cv, kScale: cks, vScale: cvs } : undefined,
          keep, repeats, kvFormat: 'int8',
        });
        const [gk, gks] = [(await hk.read()) as Uint8Array, (await ks.read()) as Float32Array];
        const [gv, gvs] = [(await hv.read()) as Uint8Array, (await vs.read()) as Float32Array];
        const label = `rows=${rows} heads=${heads} d=${d} len=${len} lc=${lc} keep=${nKeep}${repeats ? ' repeats' : ''}${layout ? ` ${layout.pageTokens}-token pages` : ''}`;
        const wantK = new Uint8Array(pairs * nKeep * d);
        const wantKs = new Float32Array(pairs * nKeep);
        for (let rh = 0; rh < pairs; rh++)
          for (let j = 0; j < nKeep; j++) {
            const src = keep[rh * nKeep + j];
            const fromHist = src < len;
            const row = fromHist ? rh * cap + src : rh * lc + src - len;
            wantK.set((fromHist ? histCodes : curCodes).subarray(row * d, (row + 1) * d), (rh * nKeep + j) * d);
            wantKs[rh * nKeep + j] = (fromHist ? histScales : curScales)[row];
          }
        // The first nKeep history rows of every (row, head), in order, `width` values each.
        const view = (x: Uint8Array | Float32Array, width: number) => {
          const out: number[] = [];
          for (let r = 0; r < rows; r++)
            for (let h = 0; h < heads; h++)
              for (let j = 0; j < nKeep; j++) {
                const row = layout ? pagedRow(layout, heads, r, h, j) : (r * heads + h) * cap + j;
                out.push(...x.subarray(row * width, (row + 1) * width));
              }
          return out;
        };
        t.deepEqual(view(gk, d), Array.from(wantK), `${label}: K codes`);
        t.deepEqual(view(gks, 1), Array.from(wantKs), `${label}: K scales`);
        t.deepEqual(view(gv, d), Array.from(wantK, (x) => x ^ 0x3c), `${label}: V codes`);
        t.deepEqual(view(gvs, 1), Array.from(wantKs, (x) => -x), `${label}: V scales`);
        for (const x of [hk, hv, ks, vs, ck, cv, cks, cvs, table]) x?.dispose();
      }
    });
  });

  test(`8-bit K/V ${backend}: a format without its dtype or scales is a coded error naming the operand`, async (t) => {
    await withEngine(backend, async (e) => {
      const q = e.tensor(new Float32Array(2 * 64).fill(0.5), [1, 1, 2, 64], 'f32');
      const k8 = e.tensor(new Uint8Array(3 * 64).fill(3), [1, 1, 3, 64], 'u8');
      const kf = e.tensor(new Float32Array(3 * 64).fill(0.25), [1, 1, 3, 64], 'f32');
      const s = e.tensor(new Float32Array(3).fill(0.1), [1, 1, 3], 'f32');
      const out = e.empty([1, 1, 2, 64], 'f32');
      t.throws(() => e.ops.attention({ q, current: { k: k8, v: k8 }, out, scale: 1 }), { code: 'ERR_DTYPE', message: /curK.*kvFormat/ });
      t.throws(() => e.ops.attention({ q, current: { k: k8, v: k8 }, kvFormat: 'int8', out, scale: 1 }), { code: 'ERR_INVALID_ARG', message: /curKScale/ });
      t.throws(() => e.ops.attention({ q, current: { k: kf, v: kf, kScale: s, vScale: s }, kvFormat: 'fp8', out, scale: 1 }), { code: 'ERR_DTYPE', message: /curK must be u8/ });
      t.throws(() => e.ops.attention({ q, current: { k: kf, v: kf, kScale: s, vScale: s }, out, scale: 1 }), { code: 'ERR_INVALID_ARG', message: /8-bit kvFormat/ });
      t.throws(() => e.ops.attention({ q, current: { k: k8, v: k8, kScale: s }, kvFormat: 'int8', out, scale: 1 }), { code: 'ERR_INVALID_ARG', message: /go together/ });
      e.ops.attention({ q, current: { k: k8, v: k8, kScale: s, vScale: s }, kvFormat: 'int8', out, scale: 1 });
      const o = (await out.read()) as Float32Array;
      t.true(o.every((x) => Math.abs(x - 0.3) < 1e-6), 'every value row decodes to 3 x 0.1');
      for (const x of [q, k8, kf, s, out]) x.dispose();
    });
  });
}

// Whole generations: the same bits forced at every scale (the official gt_leak), so each scale's logits differ only
// by what the 8-bit cache changes; every backend, the model in bf16 (the cache it would otherwise hold).
for (const backend of testBackends()) {
  test(`generate ${backend}: with an 8-bit cache every scale's logits stay within a few % of the bf16 cache's, the arena at (d + 4) / 2d of its bytes`, async (t) => {
    await withEngine(backend, async (e) => {
      const tiny = createTinyModel(5);
      const model = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'bf16' });
      try {
        const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' }).scales;
        const base = { text: syntheticText('a lighthouse at dawn'), schedule, cfg: 3, seed: 11, kvPolicy: new FullKvPolicy(), capture: { logits: true } };
        const ref = await generate(model, base);
        ref.summedCodes.dispose();
        const { headDim } = tiny.config;
        for (const kvDtype of FORMATS) {
          const r = await generate(model, { ...base, kvDtype, teacherBits: ref.bits });
          r.summedCodes.dispose();
          t.is(r.kvBytes, (ref.kvBytes * (headDim + 4)) / (2 * headDim), `${kvDtype}: KV arena bytes`);
          const errors: string[] = [];
          for (let si = 1; si < schedule.length; si++) {
            const name = `s${String(si).padStart(2, '0')}/logits`;
            const want = ref.captured.get(name) as Float32Array;
            const got = r.captured.get(name) as Float32Array;
            let num = 0;
            let den = 0;
            for (let i = 0; i < want.length; i++) {
              num += (got[i] - want[i]) ** 2;
              den += want[i] ** 2;
            }
            const rel = Math.sqrt(num / den);
            errors.push(`s${si} ${rel.toExponential(2)}`);
            // int8 moves each key and value by under half a step of 1/127 of its row's largest element, fp8 by 2^-4 of
            // each element: measured here 0.2-0.4 % (int8) and 0.2-1 % (fp8) relative L2 (a cache that ignored the
            // scales, or read the wrong rows, is off by more than 30 %).
            t.true(rel < (kvDtype === 'int8' ? 0.01 : 0.03), `${kvDtype} ${name}: relative logit error ${rel}`);
          }
          t.log(`${backend} ${kvDtype}: relative L2 logit error per scale: ${errors.join(', ')}`);
        }
      } finally {
        model.dispose();
      }
    });
  });
}
