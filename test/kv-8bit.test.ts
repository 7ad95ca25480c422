// 8-bit K/V (kvFormat 'int8' / 'fp8', kernels/kv_quant.h, lib/kv/quant.ts): the TypeScript quantiser against the
// formats' definitions; qkNormRope's stored codes and scale bytes equal that quantiser applied to the op's own f32
// K/V, bit for bit, on every backend; attention over 8-bit history and current rows (contiguous and paged, gathered,
// with the window output) against a float64 reference over the dequantised rows; evictCompact moving codes and
// scale bytes exactly; and the coded errors of a mismatched call.
import test from 'ava';
import type { Engine, Tensor } from '../lib/engine.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../lib/dtype.js';
import { decodeKvCode, dequantiseKvRows, fp8E4m3ToNumber, KV_SCALE_NON_FINITE, kvCodeMax, kvRowScale, kvScaleByte, numberToFp8E4m3, quantiseKvToken, type QuantisedKvFormat } from '../lib/kv/quant.js';
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

test('quantiseKvToken: power-of-two scales in one byte, within half a step (int8) or 2^-4 relative (fp8), zero, huge and NaN rows', (t) => {
  const rng = new Rng(seedFor(t));
  for (const format of FORMATS) {
    const max = kvCodeMax(format);
    for (let i = 0; i < 200; i++) {
      const d = rng.int(1, 256);
      const k = unitRows(rng.normals(d), d);
      const v = rng.normals(d).map((x) => x * 10 ** rng.int(-3, 3));
      const q = quantiseKvToken(format, k, v);
      for (const [row, codes, values, name] of [[k, q.k, false, 'k'], [v, q.v, true, 'v']] as const) {
        const amax = maxAbs(row);
        const scale = kvRowScale(format, q.scale, values);
        const e = Math.round(Math.log2(scale * max));
        const smallest = e === (values ? -16 : -6);  // a row below the range takes its smallest exponent
        t.true(amax <= 2 ** e && (amax > 2 ** (e - 1) || smallest), `${format} ${name} row ${i}: amax ${amax} against 2^${e}`);
        const back = dequantiseKvRows(format, codes, Uint8Array.of(q.scale), d, values);
        for (let j = 0; j < d; j++) {
          const bound = format === 'int8' ? scale * 0.5 * (1 + 1e-6) : Math.max(Math.abs(row[j]) * 2 ** -4, scale * 2 ** -10) * (1 + 1e-6);
          if (!(Math.abs(back[j] - row[j]) <= bound)) {
            t.fail(`${format} ${name} row ${i} element ${j}: ${row[j]} -> ${back[j]}, bound ${bound}`);
            return;
          }
        }
        const largest = Math.max(...Array.from(codes, (c) => Math.abs(decodeKvCode(format, c))));
        if (!smallest) t.true(largest >= max / 2 && largest <= max, `${format} ${name} row ${i}: the largest element takes code ${largest}, in the upper half`);
      }
    }
  }
  // Exact powers of two take their own exponent; a zero row takes the smallest; the byte's two fields are the exponents.
  t.is(kvScaleByte(0.5, 1), (1 << 5) | 16);
  t.is(kvScaleByte(0, 0), (6 << 5) | 0);
  t.is(kvScaleByte(0.3, 5), (1 << 5) | (16 + 3));
  t.deepEqual(quantiseKvToken('int8', new Float32Array(4), new Float32Array(4)), { k: new Uint8Array(4), v: new Uint8Array(4), scale: 0xc0 });
  // Outside the exponents' ranges: a key a rounding above 1 and a value above 2^15 saturate, a value below 2^-16 keeps its sign.
  const big = quantiseKvToken('int8', Float32Array.of(1.0000001, -0.5), Float32Array.of(2 ** 17, 2 ** -20));
  t.deepEqual(Array.from(big.k, (c) => decodeKvCode('int8', c)), [127, -64]);
  t.deepEqual(Array.from(big.v, (c) => decodeKvCode('int8', c)), [127, 0]);
  // A NaN or infinity in either row: zero codes in both, 0xFF, both read back as NaN.
  for (const [k, v] of [[Float32Array.of(0.5, NaN), Float32Array.of(1, 2)], [Float32Array.of(0.5, 0.5), Float32Array.of(Infinity, 2)]]) {
    const bad = quantiseKvToken('fp8', k, v);
    t.deepEqual([bad.k, bad.v, bad.scale], [new Uint8Array(2), new Uint8Array(2), KV_SCALE_NON_FINITE]);
    t.true(dequantiseKvRows('fp8', bad.k, Uint8Array.of(bad.scale), 2, false).every(Number.isNaN));
    t.true(dequantiseKvRows('fp8', bad.v, Uint8Array.of(bad.scale), 2, true).every(Number.isNaN));
  }
});

/** Each row of [rows, d] divided by its L2 norm: keys are unit vectors (qkNormRope normalises them). */
function unitRows(data: Float32Array, d: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let i = 0; i < data.length; i += d) {
    let sq = 0;
    for (let j = 0; j < d; j++) sq += data[i + j] ** 2;
    for (let j = 0; j < d; j++) out[i + j] = data[i + j] / Math.sqrt(sq);
  }
  return out;
}

type Quantised = { codes: Uint8Array; values: Float32Array };

/** Per-token codes and scale bytes of [tokens, d] f32 K and V, and what they read back as. */
function quantiseTokens(format: QuantisedKvFormat, k: Float32Array, v: Float32Array, d: number): { k: Quantised; v: Quantised; scales: Uint8Array } {
  const n = k.length / d;
  const kc = new Uint8Array(k.length);
  const vc = new Uint8Array(v.length);
  const scales = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    const q = quantiseKvToken(format, k.subarray(i * d, (i + 1) * d), v.subarray(i * d, (i + 1) * d));
    kc.set(q.k, i * d);
    vc.set(q.v, i * d);
    scales[i] = q.scale;
  }
  return {
    k: { codes: kc, values: dequantiseKvRows(format, kc, scales, d, false) },
    v: { codes: vc, values: dequantiseKvRows(format, vc, scales, d, true) },
    scales,
  };
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
        const sc = e.empty(poolShape, 'u8', { fillByte: 0xa5 });
        e.ops.qkNormRope({ qkv, positions, vBias, q, k: k8, v: v8, scales: sc, kvFormat: format, kvOffset: offset, pageTable: table });
        const [kc, vc, scb] = (await Promise.all([k8.read(), v8.read(), sc.read()])) as Uint8Array[];
        const label = `${format} B=${B} L=${L} H=${H} c=${c} offset=${offset}${layout ? ` ${layout.pageTokens}-token pages` : ''}`;
        let checked = 0;
        for (let r = 0; r < B; r++)
          for (let h = 0; h < H; h++)
            for (let tok = 0; tok < cap; tok++) {
              const row = layout ? pagedRow(layout, H, r, h, tok) : (r * H + h) * cap + tok;
              const gotK = kc.subarray(row * c, (row + 1) * c);
              const gotV = vc.subarray(row * c, (row + 1) * c);
              if (tok < offset || tok >= offset + L) {
                if (gotK.some((x) => x !== 0xa5) || gotV.some((x) => x !== 0xa5) || scb[row] !== 0xa5) t.fail(`${label}: token ${tok} of (${r}, ${h}) was written`);
                continue;
              }
              const want = quantiseKvToken(format, kf.subarray(row * c, (row + 1) * c), vf.subarray(row * c, (row + 1) * c));
              if (Buffer.compare(Buffer.from(gotK), Buffer.from(want.k)) !== 0 || Buffer.compare(Buffer.from(gotV), Buffer.from(want.v)) !== 0 || scb[row] !== want.scale)
                t.fail(`${label}: token ${tok} of (${r}, ${h}): codes or scale byte differ from the quantiser's`);
              checked++;
            }
        t.is(checked, B * H * L, label);
        for (const x of [qkv, vBias, q, k, v, k8, v8, sc]) x.dispose();
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
  const hist = quantiseTokens(format, unitRows(rng.normals(pairs * c.len * c.d), c.d), rng.normals(pairs * c.len * c.d), c.d);
  const cur = quantiseTokens(format, unitRows(rng.normals(pairs * c.lc * c.d), c.d), rng.normals(pairs * c.lc * c.d), c.d);
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
  // Pool slots no page holds get codes 0xff and the non-finite scale byte: a read of one would poison the output.
  const pool = (codes: Uint8Array, width: number) => {
    if (!layout) return put(codes, width === 1 ? [c.rows, c.heads, c.len] : [c.rows, c.heads, c.len, c.d], 'u8');
    const paged = Uint8Array.from(scatter(layout, new Uint32Array(codes), { ...dims, d: width }, 0xff));
    return put(paged, width === 1 ? [layout.pages, c.heads, layout.pageTokens] : [layout.pages, c.heads, layout.pageTokens, c.d], 'u8');
  };
  const hk = c.len > 0 ? pool(hist.k.codes, c.d) : undefined;
  const hv = c.len > 0 ? pool(hist.v.codes, c.d) : undefined;
  const hs = c.len > 0 ? pool(hist.scales, 1) : undefined;
  const ck = c.lc > 0 ? put(cur.k.codes, [c.rows, c.heads, c.lc, c.d], 'u8') : undefined;
  const cv = c.lc > 0 ? put(cur.v.codes, [c.rows, c.heads, c.lc, c.d], 'u8') : undefined;
  const cs = c.lc > 0 ? put(cur.scales, [c.rows, c.heads, c.lc], 'u8') : undefined;
  const qt = put(q, [c.rows, c.heads, c.lq, c.d], dtype);
  const out = e.empty([c.rows, c.heads, c.lq, c.d], dtype, { fillByte: 0xff });
  const nKeys = (gatherList ? gatherList.length / pairs : c.len) + c.lc;
  const logits = c.window ? e.empty([c.rows, c.heads, c.window, nKeys], 'f32', { fillByte: 0xff }) : undefined;
  const lse = c.window ? e.empty([c.rows, c.heads, c.window], 'f32', { fillByte: 0xff }) : undefined;
  made.push(out, ...(logits && lse ? [logits, lse] : []));
  e.ops.attention({
    q: qt,
    history: hk && hv ? { k: hk, v: hv, scales: hs, len: c.len, gather: gatherList, pageTable: layout?.table } : undefined,
    current: ck && cv ? { k: ck, v: cv, scales: cs } : undefined,
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
        const histScales = Uint8Array.from({ length: pairs * cap }, () => rng.int(0, 255));
        const curCodes = Uint8Array.from({ length: pairs * lc * d }, () => rng.int(0, 255));
        const curScales = Uint8Array.from({ length: pairs * lc }, () => rng.int(0, 255));
        const poolShape = layout ? [layout.pages, heads, layout.pageTokens] : [rows, heads, cap];
        const paged = (x: Uint8Array, width: number) => (layout ? Uint8Array.from(scatter(layout, new Uint32Array(x), { ...dims, d: width }, 0x77)) : x);
        const hk = e.tensor(paged(histCodes, d), [...poolShape, d], 'u8');
        const hv = e.tensor(paged(histCodes.map((x) => x ^ 0x3c), d), [...poolShape, d], 'u8');
        const hs = e.tensor(paged(histScales, 1), poolShape, 'u8');
        const ck = lc ? e.tensor(curCodes, [rows, heads, lc, d], 'u8') : undefined;
        const cv = lc ? e.tensor(curCodes.map((x) => x ^ 0x3c), [rows, heads, lc, d], 'u8') : undefined;
        const cs = lc ? e.tensor(curScales, [rows, heads, lc], 'u8') : undefined;
        // The table on the device: with no current rows, nothing else says how many rows a host table has.
        const table = layout && e.tensor(layout.table, [rows, layout.tablePages], 'i32');
        e.ops.evictCompact({
          history: { k: hk, v: hv, scales: hs, len, pageTable: table },
          current: ck && cv ? { k: ck, v: cv, scales: cs } : undefined,
          keep, repeats, kvFormat: 'int8',
        });
        const [gk, gv, gs] = (await Promise.all([hk.read(), hv.read(), hs.read()])) as Uint8Array[];
        const label = `rows=${rows} heads=${heads} d=${d} len=${len} lc=${lc} keep=${nKeep}${repeats ? ' repeats' : ''}${layout ? ` ${layout.pageTokens}-token pages` : ''}`;
        const wantK = new Uint8Array(pairs * nKeep * d);
        const wantS = new Uint8Array(pairs * nKeep);
        for (let rh = 0; rh < pairs; rh++)
          for (let j = 0; j < nKeep; j++) {
            const src = keep[rh * nKeep + j];
            const fromHist = src < len;
            const row = fromHist ? rh * cap + src : rh * lc + src - len;
            wantK.set((fromHist ? histCodes : curCodes).subarray(row * d, (row + 1) * d), (rh * nKeep + j) * d);
            wantS[rh * nKeep + j] = (fromHist ? histScales : curScales)[row];
          }
        // The first nKeep history rows of every (row, head), in order, `width` values each.
        const view = (x: Uint8Array, width: number) => {
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
        t.deepEqual(view(gv, d), Array.from(wantK, (x) => x ^ 0x3c), `${label}: V codes`);
        t.deepEqual(view(gs, 1), Array.from(wantS), `${label}: scale bytes`);
        for (const x of [hk, hv, hs, ck, cv, cs, table]) x?.dispose();
      }
    });
  });

  test(`8-bit K/V ${backend}: a format without its dtype or scales is a coded error naming the operand`, async (t) => {
    await withEngine(backend, async (e) => {
      const q = e.tensor(new Float32Array(2 * 64).fill(0.5), [1, 1, 2, 64], 'f32');
      const k8 = e.tensor(new Uint8Array(3 * 64).fill(3), [1, 1, 3, 64], 'u8');
      const kf = e.tensor(new Float32Array(3 * 64).fill(0.25), [1, 1, 3, 64], 'f32');
      const s = e.tensor(new Uint8Array(3).fill((2 << 5) | (16 + 1)), [1, 1, 3], 'u8');  // keys x 2^-2, values x 2^1, over 127
      const out = e.empty([1, 1, 2, 64], 'f32');
      t.throws(() => e.ops.attention({ q, current: { k: k8, v: k8 }, out, scale: 1 }), { code: 'ERR_DTYPE', message: /curK.*kvFormat/ });
      t.throws(() => e.ops.attention({ q, current: { k: k8, v: k8 }, kvFormat: 'int8', out, scale: 1 }), { code: 'ERR_INVALID_ARG', message: /curScales/ });
      t.throws(() => e.ops.attention({ q, current: { k: kf, v: kf, scales: s }, kvFormat: 'fp8', out, scale: 1 }), { code: 'ERR_DTYPE', message: /curK must be u8/ });
      t.throws(() => e.ops.attention({ q, current: { k: kf, v: kf, scales: s }, out, scale: 1 }), { code: 'ERR_INVALID_ARG', message: /curScales needs an 8-bit kvFormat/ });
      const sf = e.tensor(new Float32Array(3).fill(0.1), [1, 1, 3], 'f32');
      t.throws(() => e.ops.attention({ q, current: { k: k8, v: k8, scales: sf }, kvFormat: 'int8', out, scale: 1 }), { code: 'ERR_DTYPE', message: /curScales/ });
      e.ops.attention({ q, current: { k: k8, v: k8, scales: s }, kvFormat: 'int8', out, scale: 1 });
      const o = (await out.read()) as Float32Array;
      t.true(o.every((x) => Math.abs(x - 6 / 127) < 1e-6), 'every value row decodes to 3 x 2 / 127');
      // 8-bit K/V rely on unit keys: qkNormRope without normalize cannot write them.
      const qkv = e.tensor(new Float32Array(3 * 64).fill(0.5), [1, 1, 3 * 64], 'f32');
      const qo = e.empty([1, 1, 1, 64], 'f32');
      const k1 = e.empty([1, 1, 3, 64], 'u8');
      const v1 = e.empty([1, 1, 3, 64], 'u8');
      t.throws(() => e.ops.qkNormRope({ qkv, q: qo, k: k1, v: v1, scales: s, kvFormat: 'int8', normalize: false }), { code: 'ERR_INVALID_ARG', message: /normalize/ });
      for (const x of [sf, qkv, qo, k1, v1]) x.dispose();
      for (const x of [q, k8, kf, s, out]) x.dispose();
    });
  });
}

// Whole generations: the same bits forced at every scale (the official gt_leak), so each scale's logits differ only
// by what the 8-bit cache changes; every backend, the model in bf16 (the cache it would otherwise hold).
for (const backend of testBackends()) {
  test(`generate ${backend}: with an 8-bit cache every scale's logits stay within a few % of the bf16 cache's, the arena at (2d + 1) / 4d of its bytes`, async (t) => {
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
          t.is(r.kvBytes, (ref.kvBytes * (2 * headDim + 1)) / (4 * headDim), `${kvDtype}: KV arena bytes (a byte per element and one per token)`);
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
            // each element: measured here 0.2-0.6 % (int8) and 0.2-0.9 % (fp8) relative L2 (a cache that ignored the
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
