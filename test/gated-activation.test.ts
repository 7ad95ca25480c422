// gatedActivation (GEGLU / SwiGLU) on every backend against a float64 reference across shapes and dtypes,
// outputs poisoned: out = fn(x[..., :F]) * x[..., F:].
import test from 'ava';
import { bf16Round, maxAbs, maxAbsDiff, Rng, seedFor, testBackends, withEngine } from './helpers.js';

type FloatType = 'f32' | 'bf16';

const gelu = (x: number) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));
const silu = (x: number) => x / (1 + Math.exp(-x));

function gatedRef(x: Float32Array, F: number, fn: 'gelu_tanh' | 'silu'): Float64Array {
  const rows = x.length / (2 * F);
  const f = fn === 'silu' ? silu : gelu;
  const y = new Float64Array(rows * F);
  for (let r = 0; r < rows; r++) for (let i = 0; i < F; i++) y[r * F + i] = f(x[r * 2 * F + i]) * x[r * 2 * F + F + i];
  return y;
}

interface Case { lead: number[]; F: number; x: FloatType; y: FloatType; fn: 'gelu_tanh' | 'silu' }
const CASES: Case[] = [
  { lead: [1], F: 1, x: 'f32', y: 'f32', fn: 'gelu_tanh' },
  { lead: [3, 5], F: 320, x: 'f32', y: 'f32', fn: 'gelu_tanh' },
  { lead: [7], F: 1000, x: 'f32', y: 'f32', fn: 'silu' },
  { lead: [2, 3], F: 130, x: 'bf16', y: 'bf16', fn: 'gelu_tanh' },
  { lead: [4], F: 64, x: 'f32', y: 'bf16', fn: 'silu' },
  { lead: [5], F: 33, x: 'bf16', y: 'f32', fn: 'gelu_tanh' },
];

for (const backend of testBackends()) {
  test(`gatedActivation ${backend}: matches a float64 reference over shapes, dtypes and both functions`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const c of CASES) {
        const rows = c.lead.reduce((a, b) => a * b, 1);
        const label = JSON.stringify(c);
        const raw = rng.normals(rows * 2 * c.F, 2);
        const x = c.x === 'bf16' ? bf16Round(raw) : raw;
        const tx = e.tensor(x, [...c.lead, 2 * c.F], c.x);
        const ty = e.empty([...c.lead, c.F], c.y, { fillByte: 0xff });
        e.ops.gatedActivation({ x: tx, out: ty, fn: c.fn });
        const got = (await ty.read()) as Float32Array;
        const ref = gatedRef(x, c.F, c.fn);
        const err = maxAbsDiff(got, ref);
        const scale = Math.max(1, maxAbs(ref));
        const bound = c.y === 'f32' ? 1e-5 * scale : 2 * maxAbsDiff(bf16Round(Float32Array.from(ref)), ref) + 1e-5 * scale;
        t.true(err <= bound, `${label}: error ${err}, bound ${bound}`);
        tx.dispose();
        ty.dispose();
      }
    });
  });
}
