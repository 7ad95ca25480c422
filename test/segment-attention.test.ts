// segmentAttention (varlen self-attention with T5's relative-position bias) on every backend against a float64
// reference: segment lengths across the kernels' 16-query and 32-key tiles (empty segments too), head sizes on
// every CUDA dispatch path, bias spans narrower and wider than the segments, with and without a bias, scales,
// f32 and bf16; outputs poisoned. Then the data errors of cuSeqlens.
import test from 'ava';
import { bf16Round, maxAbs, maxAbsDiff, Rng, seedFor, testBackends, withEngine } from './helpers.js';

interface Case { lens: number[]; heads: number; headDim: number; span: number; scale: number; dtype: 'f32' | 'bf16' }
const CASES: Case[] = [
  { lens: [1], heads: 1, headDim: 8, span: 0, scale: 1, dtype: 'f32' },
  { lens: [17, 33], heads: 2, headDim: 32, span: 15, scale: 1, dtype: 'f32' },
  { lens: [5, 0, 70], heads: 3, headDim: 64, span: 257, scale: 1, dtype: 'f32' },
  { lens: [40, 9], heads: 2, headDim: 72, span: 9, scale: 0.125, dtype: 'f32' },
  { lens: [12, 31], heads: 2, headDim: 130, span: 0, scale: 0.09, dtype: 'f32' },
  { lens: [20, 3], heads: 4, headDim: 16, span: 11, scale: 1, dtype: 'bf16' },
];

/** out[t, h, c] in float64; bias [H, span] at clamp(j - i, -R, R) + R. */
function segmentAttentionRef(qkv: Float32Array, lens: number[], H: number, c: number, bias: Float32Array | null, span: number, scale: number): Float64Array {
  const T = lens.reduce((a, b) => a + b, 0);
  const out = new Float64Array(T * H * c);
  const R = (span - 1) / 2;
  const at = (t: number, part: number, h: number) => ((t * 3 + part) * H + h) * c;
  let first = 0;
  for (const n of lens) {
    for (let h = 0; h < H; h++) {
      for (let i = 0; i < n; i++) {
        const s = new Float64Array(n);
        for (let j = 0; j < n; j++) {
          let dot = 0;
          for (let d = 0; d < c; d++) dot += qkv[at(first + i, 0, h) + d] * qkv[at(first + j, 1, h) + d];
          s[j] = scale * dot + (bias ? bias[h * span + Math.min(Math.max(j - i, -R), R) + R] : 0);
        }
        const mx = Math.max(...s);
        let sum = 0;
        for (let j = 0; j < n; j++) sum += (s[j] = Math.exp(s[j] - mx));
        for (let j = 0; j < n; j++)
          for (let d = 0; d < c; d++) out[((first + i) * H + h) * c + d] += (s[j] / sum) * qkv[at(first + j, 2, h) + d];
      }
    }
    first += n;
  }
  return out;
}

for (const backend of testBackends()) {
  test(`segmentAttention ${backend}: matches a float64 reference over segments, head sizes, bias spans and dtypes`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const c of CASES) {
        const label = JSON.stringify(c);
        const T = c.lens.reduce((a, b) => a + b, 0);
        // scale·q·k with a spread of about 2, so the softmax is neither flat nor one-hot; the bias moves it further.
        const raw = rng.normals(T * 3 * c.heads * c.headDim, Math.sqrt(2 / (c.scale * Math.sqrt(c.headDim))));
        const qkv = c.dtype === 'bf16' ? bf16Round(raw) : raw;
        const bias = c.span ? rng.normals(c.heads * c.span, 1.5) : null;
        const cu = new Int32Array(c.lens.length + 1);
        c.lens.forEach((n, s) => (cu[s + 1] = cu[s] + n));
        const tq = e.tensor(qkv, [T, 3, c.heads, c.headDim], c.dtype);
        const tb = bias ? e.tensor(bias, [c.heads, c.span], 'f32') : undefined;
        const out = e.empty([T, c.heads, c.headDim], c.dtype, { fillByte: 0xff });
        e.ops.segmentAttention({ qkv: tq, cuSeqlens: cu, relativeBias: tb, out, scale: c.scale, maxSeqlen: Math.max(...c.lens) });
        const got = (await out.read()) as Float32Array;
        const ref = segmentAttentionRef(qkv, c.lens, c.heads, c.headDim, bias, c.span, c.scale);
        const err = maxAbsDiff(got, ref);
        const scale = Math.max(1, maxAbs(ref));
        const bound = c.dtype === 'f32' ? 1e-5 * scale : 2 * maxAbsDiff(bf16Round(Float32Array.from(ref)), ref) + 1e-5 * scale;
        t.true(err <= bound, `${label}: error ${err}, bound ${bound}`);
        for (const x of [tq, tb, out]) x?.dispose();
      }
    });
  });

  test(`segmentAttention ${backend}: segments that do not tile the tokens are data errors, nothing written`, async (t) => {
    await withEngine(backend, async (e) => {
      const rng = new Rng(seedFor(t));
      const qkv = e.tensor(rng.normals(6 * 3 * 2 * 8), [6, 3, 2, 8], 'f32');
      const out = e.empty([6, 2, 8], 'f32', { fillByte: 0x7f });
      const poison = await out.read();
      for (const [cu, maxSeqlen] of [[[0, 4, 2, 6], 6], [[1, 3, 6], 6], [[0, 3, 5], 6], [[0, 2, 6], 3]] as [number[], number][]) {
        e.ops.segmentAttention({ qkv, cuSeqlens: Int32Array.from(cu), out, scale: 1, maxSeqlen });
        await t.throwsAsync(e.sync(), { code: 'ERR_INDEX_RANGE' }, JSON.stringify(cu));
      }
      t.deepEqual(await out.read(), poison);
      t.throws(() => e.ops.segmentAttention({ qkv, cuSeqlens: new Int32Array([0, 6]), relativeBias: e.empty([2, 8], 'f32'), out, scale: 1 }), { code: 'ERR_SHAPE' });
      t.throws(() => e.ops.segmentAttention({ qkv, cuSeqlens: new Int32Array([0, 6]), out, scale: 1, maxSeqlen: 7 }), { code: 'ERR_INVALID_ARG' });
      e.ops.segmentAttention({ qkv, cuSeqlens: new Int32Array([0, 2, 6]), out, scale: 1, maxSeqlen: 4 });
      await t.notThrowsAsync(e.sync());
    });
  });
}
