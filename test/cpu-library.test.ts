// The CPU backend's library path (oneDNN for GEMM and convolution, when the build found it): what it reports, that
// the profiler names the path each op took, and that the builtin kernels (SCALEKV_ONEDNN=0, or a build without the
// library) and the library agree with a float64 reference on the same inputs.
import test from 'ava';
import { spawnSync } from 'node:child_process';
import { backendInfo } from '../lib/engine.js';
import { seedFor } from './helpers.js';

const library = backendInfo().cpu.library;

test('backendInfo names the CPU library (oneDNN with its version and ISA) or none', (t) => {
  t.true(library === null || /^oneDNN \d+\.\d+\.\d+ \(.+\)$/.test(library), String(library));
  t.log(`cpu library: ${library ?? 'builtin kernels'}`);
});

// Runs a GEMM (f32, bf16, and f32 x with bf16 w) and a 3x3 convolution on seeded inputs, in this process or a child
// with the given environment; returns each op's profile label and max error against float64, relative to max |ref|.
const PROBE = `
import { createEngine } from './lib/engine.ts';
import { bf16BitsToF32, f32ToBf16Bits } from './lib/dtype.ts';
const seed = Number(process.argv[1]);
let s = seed >>> 0 || 1;
const rand = (n) => Float32Array.from({ length: n }, () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 31 - 1));
const round = (a, dt) => (dt === 'bf16' ? a.map((x) => bf16BitsToF32(f32ToBf16Bits(x))) : a);
const e = await createEngine({ backend: 'cpu', threads: 2 });
const result = {};
const rel = (got, ref) => { let err = 0, mx = 0; for (let i = 0; i < ref.length; i++) { err = Math.max(err, Math.abs(got[i] - ref[i])); mx = Math.max(mx, Math.abs(ref[i])); } return err / mx; };
const label = async (op, run) => { e.startProfiling(); run(); await e.sync(); const p = (await e.stopProfiling()).find((p) => p.op === op); return p.path ? op + ':' + p.path : op; };
const [M, N, K] = [37, 70, 129];
for (const [xd, wd] of [['f32', 'f32'], ['bf16', 'bf16'], ['f32', 'bf16']]) {
  const x = round(rand(M * K), xd), w = round(rand(N * K), wd), b = rand(N);
  const tx = e.tensor(x, [M, K], xd), tw = e.tensor(w, [N, K], wd), tb = e.tensor(b, [N], 'f32'), y = e.empty([M, N], 'f32', { fillByte: 0xff });
  const path = await label('gemm', () => e.ops.gemm({ x: tx, w: tw, bias: tb, y, epilogue: 'silu' }));
  const got = await y.read();
  const ref = new Float64Array(M * N);
  const xr = round(x, wd); // f32 x against bf16 w is rounded to bf16 first (autocast's Linear)
  for (let i = 0; i < M; i++) for (let j = 0; j < N; j++) { let a = b[j]; for (let p = 0; p < K; p++) a += xr[i * K + p] * w[j * K + p]; ref[i * N + j] = a / (1 + Math.exp(-a)); }
  result['gemm ' + xd + '/' + wd] = { path, err: rel(got, ref) };
}
const [B, I, O, H, W] = [2, 11, 13, 9, 7];
const x = rand(B * I * H * W), w = rand(O * I * 9), b = rand(O);
const out = e.empty([B, O, H, W], 'f32', { fillByte: 0xff });
const path = await label('conv2d', () => e.ops.conv2d({ input: e.tensor(x, [B, I, H, W], 'f32'), weight: e.tensor(w, [O, I, 3, 3], 'f32'), bias: e.tensor(b, [O], 'f32'), out }));
const got = await out.read();
const ref = new Float64Array(B * O * H * W);
for (let n = 0; n < B; n++) for (let o = 0; o < O; o++) for (let yy = 0; yy < H; yy++) for (let xx = 0; xx < W; xx++) {
  let a = b[o];
  for (let i = 0; i < I; i++) for (let ky = 0; ky < 3; ky++) for (let kx = 0; kx < 3; kx++) {
    const iy = yy + ky - 1, ix = xx + kx - 1;
    if (iy >= 0 && iy < H && ix >= 0 && ix < W) a += w[((o * I + i) * 3 + ky) * 3 + kx] * x[((n * I + i) * H + iy) * W + ix];
  }
  ref[((n * O + o) * H + yy) * W + xx] = a;
}
result.conv2d = { path, err: rel(got, ref) };
e.dispose();
console.log(JSON.stringify(result));
`;

function probe(seed: number, env: Record<string, string>): Record<string, { path: string; err: number }> {
  const r = spawnSync(process.execPath, ['--import=tsx', '--input-type=module', '-e', PROBE, String(seed)], {
    encoding: 'utf8', env: { ...process.env, ...env }, timeout: 120_000,
  });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout);
}

test('the library path and the builtin kernels both match float64; the profiler names the path each op took', (t) => {
  const seed = seedFor(t);
  const withLibrary = probe(seed, {});
  const builtin = probe(seed, { SCALEKV_ONEDNN: '0' });
  for (const r of [withLibrary, builtin])
    for (const [op, { err }] of Object.entries(r)) t.true(err <= (op.includes('bf16') ? 1e-5 : 2e-6), `${op}: error ${err}`);
  t.deepEqual(Object.values(builtin).map((r) => r.path), ['gemm', 'gemm', 'gemm', 'conv2d'], 'SCALEKV_ONEDNN=0: the builtin kernels');
  if (library) {
    // f32 x against bf16 w runs as bf16 x bf16 after rounding x (oneDNN 2.x has no mixed matmul). bf16 matmuls
    // take oneDNN's path where its ISA has bf16 kernels; elsewhere it offers only a reference implementation,
    // which the backend declines for its builtin kernel (an ISA without bf16 may have either).
    const paths = Object.values(withLibrary).map((r) => r.path);
    const bf16Paths = /bf16|amx/.test(library) ? ['gemm:onednn'] : ['gemm:onednn', 'gemm'];
    t.deepEqual([paths[0], paths[3]], ['gemm:onednn', 'conv2d:onednn']);
    for (const p of [paths[1], paths[2]]) t.true(bf16Paths.includes(p), `bf16 GEMM path ${p} on ${library}`);
  } else {
    t.log('NOTICE: this build has no oneDNN: only the builtin kernels were checked');
  }
});

// attention with a gathered history, the current scale and observation-window logits, on seeded inputs; returns
// the output's and the window logits' max error against float64, and the window logits' bits.
const ATTENTION_PROBE = `
import { createEngine, backendInfo } from './lib/engine.ts';
let s = Number(process.argv[1]) >>> 0 || 1;
const rand = (n) => Float32Array.from({ length: n }, () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 31 - 1));
const e = await createEngine({ backend: 'cpu', threads: 2 });
const [R, H, Lq, cap, histLen, nG, Lc, D] = [2, 3, 70, 90, 80, 45, 37, 72];
const scale = 1 / Math.sqrt(D);
const q = rand(R * H * Lq * D), hk = rand(R * H * cap * D), hv = rand(R * H * cap * D), ck = rand(R * H * Lc * D), cv = rand(R * H * Lc * D);
const gather = Int32Array.from({ length: R * H * nG }, (_, i) => (i * 7919) % histLen);
const rowsW = Int32Array.from([0, 33, 69]);
const T = (a, shape) => e.tensor(a, shape, 'f32');
const out = e.empty([R, H, Lq, D], 'f32', { fillByte: 0xff });
const nK = nG + Lc;
const logits = e.empty([R, H, 3, nK], 'f32', { fillByte: 0xff });
e.ops.attention({ q: T(q, [R, H, Lq, D]), history: { k: T(hk, [R, H, cap, D]), v: T(hv, [R, H, cap, D]), len: histLen, gather },
  current: { k: T(ck, [R, H, Lc, D]), v: T(cv, [R, H, Lc, D]) }, out, scale, window: { rows: rowsW, logits } });
const got = await out.read(), gotW = await logits.read();
let err = 0, mx = 0, werr = 0;
for (let r = 0; r < R; r++) for (let h = 0; h < H; h++) {
  const rh = r * H + h;
  const key = (j, arr, carr) => (j < nG ? arr.subarray((rh * cap + gather[rh * nG + j]) * D, (rh * cap + gather[rh * nG + j] + 1) * D) : carr.subarray((rh * Lc + j - nG) * D, (rh * Lc + j - nG + 1) * D));
  for (let i = 0; i < Lq; i++) {
    const qi = q.subarray((rh * Lq + i) * D, (rh * Lq + i + 1) * D);
    const sc = Array.from({ length: nK }, (_, j) => { const k = key(j, hk, ck); let a = 0; for (let d = 0; d < D; d++) a += qi[d] * k[d]; return a * scale; });
    const m = Math.max(...sc), p = sc.map((x) => Math.exp(x - m)), z = p.reduce((a, b) => a + b, 0);
    for (let d = 0; d < D; d++) {
      let o = 0;
      for (let j = 0; j < nK; j++) o += (p[j] / z) * key(j, hv, cv)[d];
      err = Math.max(err, Math.abs(o - got[(rh * Lq + i) * D + d])); mx = Math.max(mx, Math.abs(o));
    }
    const w = Array.from(rowsW).indexOf(i);
    if (w >= 0) for (let j = 0; j < nK; j++) werr = Math.max(werr, Math.abs(sc[j] - gotW[(rh * 3 + w) * nK + j]));
  }
}
e.dispose();
console.log(JSON.stringify({ isa: backendInfo().cpu.isa, err: err / mx, werr, windowBits: Array.from(new Uint32Array(gotW.buffer)).reduce((h, x) => (Math.imul(h, 31) + x) >>> 0, 7) }));
`;

test('attention at every instruction-set level this machine has: each within f32 error of float64, window logits bit-identical', (t) => {
  const seed = seedFor(t);
  const run = (isa: string) => {
    const r = spawnSync(process.execPath, ['--import=tsx', '--input-type=module', '-e', ATTENTION_PROBE, String(seed)], {
      encoding: 'utf8', env: { ...process.env, SCALEKV_CPU_ISA: isa }, timeout: 120_000,
    });
    if (r.status !== 0) throw new Error(r.stderr);
    return JSON.parse(r.stdout) as { isa: string; err: number; werr: number; windowBits: number };
  };
  const levels = ['generic', 'avx2', 'avx512'].map(run);
  const seen = new Set(levels.map((l) => l.isa));
  t.log(`levels run: ${[...seen].join(', ')} (this machine's highest: ${backendInfo().cpu.isa})`);
  t.true(seen.has('generic') && seen.has(backendInfo().cpu.isa));
  for (const l of levels) {
    t.true(l.err <= 1e-5, `${l.isa}: output error ${l.err}`);
    t.true(l.werr <= 1e-5, `${l.isa}: window logits error ${l.werr}`);
    t.is(l.windowBits, levels[0].windowBits, `${l.isa}: the window logits (what ScaleKV ranks) are the same bits at every level`);
  }
});
