#!/usr/bin/env node
// Smoke test of a built addon file (the node-gyp CPU build in CI): one attention, one compaction, one selection
// and one GEMM on the CPU backend, each checked against a direct computation, and the CPU library the build reports
// (SCALEKV_EXPECT_LIBRARY=none: none; =onednn: oneDNN). Exit 1 on any mismatch.
import { createRequire } from 'node:module';
import { resolve } from 'node:path';

const path = resolve(process.argv[2] ?? 'build/Release/scalekv.node');
const addon = createRequire(import.meta.url)(path);
const engine = new addon.NativeEngine('cpu', 2);
const failures = [];
const check = (name, ok) => { if (!ok) failures.push(name); };

const [L, D] = [7, 8];
const q = Float32Array.from({ length: L * D }, (_, i) => Math.sin(i));
const k = Float32Array.from({ length: L * D }, (_, i) => Math.cos(0.7 * i));
const v = Float32Array.from({ length: L * D }, (_, i) => Math.sin(1.3 * i + 1));
const T = (a, shape, dtype = 'f32') => engine.tensor(dtype, shape, a);
const out = engine.tensor('f32', [1, 1, L, D], null, 'activations', 0xff);
engine.attention({ q: T(q, [1, 1, L, D]), curK: T(k, [1, 1, L, D]), curV: T(v, [1, 1, L, D]), out, scale: 0.5 });
const got = new Float32Array(await out.read());
let worst = 0;
for (let i = 0; i < L; i++) {
  const s = Array.from({ length: L }, (_, j) => 0.5 * q.subarray(i * D, i * D + D).reduce((acc, x, d) => acc + x * k[j * D + d], 0));
  const m = Math.max(...s);
  const e = s.map((x) => Math.exp(x - m));
  const z = e.reduce((a, b) => a + b, 0);
  for (let d = 0; d < D; d++) worst = Math.max(worst, Math.abs(got[i * D + d] - e.reduce((acc, p, j) => acc + (p / z) * v[j * D + d], 0)));
}
check(`attention (max error ${worst})`, worst < 1e-5);

const hk = T(Float32Array.from({ length: L * D }, (_, i) => i), [1, 1, L, D]);
const hv = T(Float32Array.from({ length: L * D }, (_, i) => -i), [1, 1, L, D]);
engine.evictCompact({ histK: hk, histV: hv, histLen: L, keep: T(new Int32Array([1, 4, 6]), [1, 1, 3], 'i32') });
const hkOut = new Float32Array(await hk.read());
check('evictCompact', hkOut[0] === D && hkOut[D] === 4 * D && hkOut[2 * D] === 6 * D && hkOut[3 * D] === 3 * D);

const logits = T(Float32Array.from([5, 1, 4, 4, 0, 3]), [1, 1, 1, 6]);
const kept = engine.tensor('i32', [1, 1, 3], null);
engine.selection({ logits, windowKeys: T(new Int32Array([5]), [1], 'i32'), out: kept, budget: 3, mode: 'logits', pooling: 'none', kernel: 1 });
check('selection', Array.from(new Int32Array(await kept.read())).join() === '0,2,5');

const [M, N, K] = [5, 6, 7];
const gx = Float32Array.from({ length: M * K }, (_, i) => Math.sin(0.3 * i));
const gw = Float32Array.from({ length: N * K }, (_, i) => Math.cos(0.2 * i));
const gy = engine.tensor('f32', [M, N], null, 'activations', 0xff);
engine.gemm({ x: T(gx, [M, K]), w: T(gw, [N, K]), y: gy, epilogue: 'none' });
const gemmOut = new Float32Array(await gy.read());
let gemmErr = 0;
for (let i = 0; i < M; i++)
  for (let j = 0; j < N; j++) gemmErr = Math.max(gemmErr, Math.abs(gemmOut[i * N + j] - gx.subarray(i * K, i * K + K).reduce((acc, x, p) => acc + x * gw[j * K + p], 0)));
check(`gemm (max error ${gemmErr})`, gemmErr < 1e-5);

const library = addon.cpuLibrary();
const expected = process.env.SCALEKV_EXPECT_LIBRARY;
if (expected === 'none') check(`built without a CPU library (reports '${library}')`, library === '');
if (expected === 'onednn') check(`built with oneDNN (reports '${library}')`, library.startsWith('oneDNN'));

engine.dispose();
if (failures.length) {
  console.error(`smoke ${path}: FAILED ${failures.join(', ')}`);
  process.exit(1);
}
console.log(`smoke ${path}: attention, evictCompact, selection and gemm ok; cpu library: ${library || 'none (builtin kernels)'}`);
