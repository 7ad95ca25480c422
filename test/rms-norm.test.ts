// rmsNorm (T5LayerNorm) on every backend against a float64 reference, across shapes and dtypes, outputs
// poisoned, in place too. The reference follows HF: mean of squares of x, x * rsqrt(. + eps), rounded to the
// weight's dtype when that is bf16, times the weight.
import test from 'ava';
import type { Tensor } from '../lib/engine.js';
import { bf16Round, maxAbs, maxAbsDiff, Rng, seedFor, testBackends, withEngine } from './helpers.js';

type FloatType = 'f32' | 'bf16';

function rmsNormRef(x: Float32Array, w: Float32Array, C: number, eps: number, weightBf16: boolean): Float64Array {
  const y = new Float64Array(x.length);
  const n = new Float32Array(C);
  for (let r = 0; r < x.length / C; r++) {
    let sq = 0;
    for (let c = 0; c < C; c++) sq += x[r * C + c] * x[r * C + c];
    const inv = 1 / Math.sqrt(sq / C + eps);
    for (let c = 0; c < C; c++) n[c] = x[r * C + c] * inv;
    const rounded = weightBf16 ? bf16Round(n) : n;
    for (let c = 0; c < C; c++) y[r * C + c] = w[c] * (weightBf16 ? rounded[c] : x[r * C + c] * inv);
  }
  return y;
}

interface Case { lead: number[]; C: number; x: FloatType; w: FloatType; y: FloatType; inPlace: boolean }
const CASES: Case[] = [
  { lead: [1], C: 1, x: 'f32', w: 'f32', y: 'f32', inPlace: false },
  { lead: [3, 5], C: 128, x: 'f32', w: 'f32', y: 'f32', inPlace: false },
  { lead: [7], C: 2048, x: 'f32', w: 'f32', y: 'f32', inPlace: true },
  { lead: [2, 2, 3], C: 300, x: 'bf16', w: 'bf16', y: 'bf16', inPlace: false },
  { lead: [4], C: 64, x: 'f32', w: 'bf16', y: 'f32', inPlace: false },
  { lead: [9], C: 257, x: 'bf16', w: 'f32', y: 'bf16', inPlace: true },
];

for (const backend of testBackends()) {
  test(`rmsNorm ${backend}: matches a float64 reference over shapes, dtypes and in place`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const c of CASES) {
        const rows = c.lead.reduce((a, b) => a * b, 1);
        const label = JSON.stringify(c);
        // Rows of different magnitudes, so the normalisation is not a no-op.
        const raw = new Float32Array(rows * c.C);
        for (let r = 0; r < rows; r++) raw.set(rng.normals(c.C, Math.exp(rng.normal())), r * c.C);
        const x = c.x === 'bf16' ? bf16Round(raw) : raw;
        const w = c.w === 'bf16' ? bf16Round(rng.normals(c.C, 0.5)) : rng.normals(c.C, 0.5);
        const eps = rng.pick([1e-6, 1e-3]);
        const tx = e.tensor(x, [...c.lead, c.C], c.x);
        const tw = e.tensor(w, [c.C], c.w);
        const ty: Tensor = c.inPlace ? tx : e.empty([...c.lead, c.C], c.y, { fillByte: 0xff });
        e.ops.rmsNorm({ x: tx, weight: tw, y: ty, eps });
        const got = (await ty.read()) as Float32Array;
        const ref = rmsNormRef(x, w, c.C, eps, c.w === 'bf16');
        const err = maxAbsDiff(got, ref);
        const scale = Math.max(1, maxAbs(ref));
        // A bf16 weight rounds x·rsqrt to bf16 first: one rounding may land on the other side of the reference's.
        if ((c.inPlace ? c.x : c.y) === 'f32' && c.w === 'f32') {
          t.true(err <= 1e-5 * scale, `${label}: error ${err}`);
        } else {
          const refErr = maxAbsDiff(bf16Round(Float32Array.from(ref)), ref);
          t.true(err <= 2 * refErr + 1e-5 * scale, `${label}: error ${err} vs bf16 rounding ${refErr}`);
        }
        for (const tt of new Set([tx, tw, ty])) tt.dispose();
      }
    });
  });
}
