// Benchmarks (tinybench). Kernels: each row is the engine's kernel (device time per call from the engine
// profiler: CUDA events on a GPU) or a naive reference run in the same process, with work rates (GFLOP/s,
// GB/s, Melem/s) and the ratio kernel / naive. Then the end-to-end tiny model (bench/e2e.ts). `npm run bench [-- --backend cuda] [--quick] [--only kernels|e2e|paged] [--page-tokens 1,2,4,16] [--json]`; `--quick`
// skips the Infinity-2B last-scale attention shapes (tens of seconds each on a CPU).
// `--backend emu --project h100 [--sample N] [--resources BUILD_DIR] [--kv SPEC]`: instead, the CUDA kernels at Infinity-2B's shapes on the emulator
// with its cost counters, projected onto the named GPU (bench/project.ts), then one whole 2B image's op stream
// projected the same way (bench/project-e2e.ts); every figure labelled projected.
import { parseArgs } from 'node:util';
import { Bench } from 'tinybench';
import { availableParallelism } from 'node:os';
import { backendInfo, createEngine, Engine } from '../lib/engine.js';
import { loadNative } from '../lib/native.js';
import type { BackendChoice } from '../lib/engine.js';
import { rand } from './random.js';
import { formatE2e, runE2e, E2eResult } from './e2e.js';
import { defaultBuildDir, formatProjection, projectKernels } from './project.js';
import { formatImageProjection, projectImage } from './project-e2e.js';
import { resolvePolicy } from '../lib/kv/resolve.js';

const { values } = parseArgs({
  args: process.argv.slice(2),
  options: {
    backend: { type: 'string', default: 'auto' },
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
    only: { type: 'string' },
    project: { type: 'string' },
    sample: { type: 'string', default: '24' },
    resources: { type: 'string' },
    kv: { type: 'string', default: 'full' },
    'page-tokens': { type: 'string', default: '1,2,4,16' },
  },
});

// --- naive references (plain loops, f32 storage, f64 math) -----------------------------------------------
function naiveAttention(q: Float32Array, k: Float32Array, v: Float32Array, pairs: number, lq: number, nk: number, d: number, out: Float32Array) {
  const s = new Float64Array(nk);
  for (let p = 0; p < pairs; p++)
    for (let i = 0; i < lq; i++) {
      let m = -Infinity;
      for (let j = 0; j < nk; j++) {
        let acc = 0;
        for (let x = 0; x < d; x++) acc += q[(p * lq + i) * d + x] * k[(p * nk + j) * d + x];
        s[j] = acc / Math.sqrt(d);
        m = Math.max(m, s[j]);
      }
      let z = 0;
      for (let j = 0; j < nk; j++) z += s[j] = Math.exp(s[j] - m);
      for (let x = 0; x < d; x++) {
        let acc = 0;
        for (let j = 0; j < nk; j++) acc += s[j] * v[(p * nk + j) * d + x];
        out[(p * lq + i) * d + x] = acc / z;
      }
    }
}

function naiveCompact(buf: Float32Array, keep: Int32Array, pairs: number, cap: number, n: number, d: number) {
  for (let p = 0; p < pairs; p++)
    for (let i = 0; i < n; i++) buf.copyWithin((p * cap + i) * d, (p * cap + keep[p * n + i]) * d, (p * cap + keep[p * n + i] + 1) * d);
}

function naiveSelection(logits: Float32Array, pairs: number, nw: number, nk: number, budget: number, kernel: number, out: Int32Array) {
  const s = new Float64Array(nk);
  const pooled = new Float64Array(nk);
  const idx = Array.from({ length: nk }, (_, j) => j);
  for (let p = 0; p < pairs; p++) {
    s.fill(0);
    for (let w = 0; w < nw; w++) for (let j = 0; j < nk; j++) s[j] += logits[(p * nw + w) * nk + j];
    for (let j = 0; j < nk; j++) {
      let m = -Infinity;
      for (let t = Math.max(0, j - (kernel >> 1)); t <= Math.min(nk - 1, j + (kernel >> 1)); t++) m = Math.max(m, s[t]);
      pooled[j] = m;
    }
    idx.sort((a, b) => pooled[b] - pooled[a] || a - b);
    out.set(idx.slice(0, budget).sort((a, b) => a - b), p * budget);
  }
}

// --- cases ------------------------------------------------------------------------------------------------
interface Row {
  kernel: string;
  shape: string;
  impl: string;
  ms: number;
  rate: string;
  ratio?: string;
  note?: string;
}

// Device time of one engine op per call: the engine profiler brackets every op with timing marks (CUDA
// events on the GPU, the host clock on CPU and emu), so this is kernel time, not the sync round trip.
/** Device ms per call of `op` (or of its library path, e.g. 'gemm:onednn'), from the engine profiler. */
async function timeKernel(engine: Engine, op: string, fn: () => Promise<void>, iterations: number): Promise<number> {
  return (await timeKernelPath(engine, op, fn, iterations)).ms;
}

async function timeKernelPath(engine: Engine, op: string, fn: () => Promise<void>, iterations: number): Promise<{ ms: number; path: string }> {
  // One untimed call first: it creates the library's primitive for the shape (JIT) and its workspaces.
  await fn();
  engine.startProfiling();
  await timeIt(op, fn, iterations);
  const entry = (await engine.stopProfiling()).find((p) => p.op === op);
  if (!entry || entry.count === 0) throw new Error(`bench: no profile entry for ${op}`);
  return { ms: entry.ms / entry.count, path: entry.path ?? 'kernel' };
}

/** GFLOP/s with, on the CPU, its share of the FMA peak measured at the start of this run. */
function gflopsRate(gflops: number): string {
  return `${gflops.toFixed(2)} GFLOP/s` + (fmaPeak ? ` (${((100 * gflops) / fmaPeak.gflops).toFixed(0)} % of f32 peak)` : '');
}

async function timeIt(name: string, fn: () => Promise<void> | void, iterations: number): Promise<number> {
  const bench = new Bench({ name, iterations, time: 0, warmup: iterations > 2, warmupIterations: 1 });
  bench.add(name, fn);
  await bench.run();
  const r = bench.tasks[0].result;
  if (r.state !== 'completed') throw new Error(`${name}: ${r.state} ${'error' in r ? String(r.error) : ''}`);
  return r.latency.mean;
}

async function attentionCase(e: Engine, rows: Row[], o: { pairs: number; heads: number; lq: number; hist: number; lc: number; d: number; dtype: 'f32' | 'bf16'; naive: boolean; iterations: number }) {
  const { pairs, lq, hist, lc, d } = o;
  const shape = `rows ${pairs / o.heads} × heads ${o.heads}, Lq ${lq}, keys ${hist}+${lc}, D ${d}, ${o.dtype}`;
  const flops = 4 * pairs * lq * (hist + lc) * d;
  const sh = (l: number) => [pairs / o.heads, o.heads, l, d];
  const q = e.tensor(rand(pairs * lq * d, 1), sh(lq), o.dtype);
  const hk = e.tensor(rand(pairs * hist * d, 2), sh(hist), o.dtype);
  const hv = e.tensor(rand(pairs * hist * d, 3), sh(hist), o.dtype);
  const ck = e.tensor(rand(pairs * lc * d, 4), sh(lc), o.dtype);
  const cv = e.tensor(rand(pairs * lc * d, 5), sh(lc), o.dtype);
  const out = e.empty(sh(lq), o.dtype);
  const ms = await timeKernel(e, 'attention', async () => {
    e.ops.attention({ q, history: { k: hk, v: hv, len: hist }, current: { k: ck, v: cv }, out, scale: 1 / Math.sqrt(d) });
    await e.sync();
  }, o.iterations);
  const gflops = flops / ms / 1e6;
  const row: Row = { kernel: 'attention', shape, impl: `${e.backend} kernel`, ms, rate: gflopsRate(gflops) };
  rows.push(row);
  if (o.naive) {
    const nk = hist + lc;
    const [qa, ka, va] = [rand(pairs * lq * d, 1), rand(pairs * nk * d, 2), rand(pairs * nk * d, 3)];
    const outA = new Float32Array(pairs * lq * d);
    const nms = await timeIt('naive', () => naiveAttention(qa, ka, va, pairs, lq, nk, d, outA), 2);
    const ngflops = flops / nms / 1e6;
    rows.push({ kernel: 'attention', shape, impl: 'naive JS', ms: nms, rate: `${ngflops.toFixed(2)} GFLOP/s` });
    row.ratio = `${(gflops / ngflops).toFixed(1)}×`;
    naiveGflops = ngflops;
  } else if (naiveGflops) {
    row.ratio = `${(gflops / naiveGflops).toFixed(1)}×`;
    row.note = 'ratio vs the naive GFLOP/s measured above at the small shape';
  }
  for (const t of [q, hk, hv, ck, cv, out]) t.dispose();
}
let naiveGflops = 0;

/**
 * Attention over a paged history (the KV arena: pages of `pageTokens` tokens x all heads, shuffled as after many
 * compactions) against the same keys stored contiguously, interleaved call by call (ABAB) so drift hits both. The
 * ratio is the paged rate over the contiguous one.
 */
async function pagedAttentionCase(e: Engine, rows: Row[], o: { heads: number; lq: number; hist: number; lc: number; d: number; pageTokens: number; rounds: number }) {
  const { heads, lq, hist, lc, d, pageTokens: P } = o;
  const shape = `heads ${heads}, Lq ${lq}, keys ${hist}+${lc}, D ${d}, bf16, ${P}-token pages`;
  const flops = 4 * heads * lq * (hist + lc) * d;
  const sh = (l: number) => [1, heads, l, d];
  const pages = Math.ceil(hist / P);
  // Page i of the history is pool page order[i]: a fixed shuffle of twice as many pages as it needs.
  const order = Array.from({ length: 2 * pages }, (_, i) => i);
  for (let i = order.length - 1; i > 0; i--) {
    const j = (i * 7919 + 13) % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const table = e.tensor(Int32Array.from(order.slice(0, pages)), [1, pages], 'i32');
  const kData = rand(heads * hist * d, 2);
  const vData = rand(heads * hist * d, 3);
  const paged = (data: Float32Array) => {
    const pool = new Float32Array(2 * pages * heads * P * d);
    for (let h = 0; h < heads; h++)
      for (let t = 0; t < hist; t++)
        pool.set(data.subarray((h * hist + t) * d, (h * hist + t + 1) * d), ((order[Math.floor(t / P)] * heads + h) * P + (t % P)) * d);
    return e.tensor(pool, [2 * pages, heads, P, d], 'bf16');
  };
  const q = e.tensor(rand(heads * lq * d, 1), sh(lq), 'bf16');
  const hk = e.tensor(kData, sh(hist), 'bf16');
  const hv = e.tensor(vData, sh(hist), 'bf16');
  const pk = paged(kData);
  const pv = paged(vData);
  const ck = e.tensor(rand(heads * lc * d, 4), sh(lc), 'bf16');
  const cv = e.tensor(rand(heads * lc * d, 5), sh(lc), 'bf16');
  const out = e.empty(sh(lq), 'bf16');
  const current = lc > 0 ? { k: ck, v: cv } : undefined;
  // Call by call, alternating which layout goes first; the ratio is the median of the rounds' ratios, so a burst of
  // load from elsewhere on a shared machine moves one round, not the figure.
  const contiguousMs: number[] = [];
  const pagedMs: number[] = [];
  const runContiguous = async () => contiguousMs.push(await timeKernel(e, 'attention', async () => {
    e.ops.attention({ q, history: { k: hk, v: hv, len: hist }, current, out, scale: 1 / Math.sqrt(d) });
    await e.sync();
  }, 1));
  const runPaged = async () => pagedMs.push(await timeKernel(e, 'attention', async () => {
    e.ops.attention({ q, history: { k: pk, v: pv, len: hist, pageTable: table }, current, out, scale: 1 / Math.sqrt(d) });
    await e.sync();
  }, 1));
  for (let r = 0; r < o.rounds; r++) {
    if (r % 2) await runPaged();
    await runContiguous();
    if (!(r % 2)) await runPaged();
  }
  const median = (x: number[]) => [...x].sort((a, b) => a - b)[x.length >> 1];
  const [c, p] = [median(contiguousMs), median(pagedMs)];
  const ratio = median(contiguousMs.map((cm, r) => cm / pagedMs[r]));
  rows.push({ kernel: 'attention', shape, impl: `${e.backend} contiguous history`, ms: c, rate: gflopsRate(flops / c / 1e6) });
  rows.push({ kernel: 'attention', shape, impl: `${e.backend} paged history`, ms: p, rate: gflopsRate(flops / p / 1e6), ratio: `${ratio.toFixed(3)}×`, note: `paged / contiguous rate: the median of ${o.rounds} interleaved rounds' ratios in this run` });
  for (const t of [q, hk, hv, pk, pv, ck, cv, out, table]) t.dispose();
}

async function compactCase(e: Engine, rows: Row[], o: { b: number; heads: number; cap: number; keep: number; d: number }) {
  const pairs = o.b * o.heads;
  const shape = `rows ${o.b} × heads ${o.heads}, ${o.keep} of ${o.cap} kept, D ${o.d}, bf16 K+V`;
  const keep = new Int32Array(pairs * o.keep);
  for (let p = 0; p < pairs; p++) for (let i = 0; i < o.keep; i++) keep[p * o.keep + i] = Math.floor((i * o.cap) / o.keep);
  const keepT = e.tensor(keep, [o.b, o.heads, o.keep], 'i32');
  const data = rand(pairs * o.cap * o.d, 7);
  const k = e.tensor(data, [o.b, o.heads, o.cap, o.d], 'bf16');
  const v = e.tensor(data, [o.b, o.heads, o.cap, o.d], 'bf16');
  const bytes = 2 * 2 * pairs * o.keep * o.d * 2; // K and V, read + write, 2 bytes each
  const ms = await timeKernel(e, 'evict_compact', async () => {
    e.ops.evictCompact({ history: { k, v, len: o.cap }, keep: keepT });
    await e.sync();
  }, 20);
  const gbs = bytes / ms / 1e6;
  const naiveBuf = rand(pairs * o.cap * o.d, 7);
  const nms = await timeIt('naive', () => {
    naiveCompact(naiveBuf, keep, pairs, o.cap, o.keep, o.d);
    naiveCompact(naiveBuf, keep, pairs, o.cap, o.keep, o.d);
  }, 20);
  const ngbs = (bytes * 2) / nms / 1e6; // naive moves f32: twice the bytes per element
  rows.push({ kernel: 'evictCompact', shape, impl: `${e.backend} kernel`, ms, rate: `${gbs.toFixed(2)} GB/s`, ratio: `${(gbs / ngbs).toFixed(1)}×` });
  rows.push({ kernel: 'evictCompact', shape, impl: 'naive JS', ms: nms, rate: `${ngbs.toFixed(2)} GB/s` });
  for (const t of [keepT, k, v]) t.dispose();
}

async function selectionCase(e: Engine, rows: Row[], o: { b: number; heads: number; nw: number; nk: number; budget: number }) {
  const pairs = o.b * o.heads;
  const shape = `rows ${o.b} × heads ${o.heads}, window ${o.nw}, keys ${o.nk}, budget ${o.budget}, maxpool 5`;
  const logitsA = rand(pairs * o.nw * o.nk, 9);
  const logits = e.tensor(logitsA, [o.b, o.heads, o.nw, o.nk], 'f32');
  const windowKeys = Int32Array.from({ length: o.nw }, (_, i) => o.nk - o.nw + i);
  const out = e.empty([o.b, o.heads, o.budget], 'i32');
  const elems = pairs * o.nw * o.nk;
  const ms = await timeKernel(e, 'selection', async () => {
    e.ops.selection({ logits, windowKeys, budget: o.budget, mode: 'logits', pooling: 'max', kernel: 5, out });
    await e.sync();
  }, 20);
  const outA = new Int32Array(pairs * o.budget);
  const nms = await timeIt('naive', () => naiveSelection(logitsA, pairs, o.nw, o.nk, o.budget, 5, outA), 3);
  const rate = elems / ms / 1e3;
  const nrate = elems / nms / 1e3;
  rows.push({ kernel: 'selection', shape, impl: `${e.backend} kernel`, ms, rate: `${rate.toFixed(1)} Melem/s`, ratio: `${(rate / nrate).toFixed(1)}×` });
  rows.push({ kernel: 'selection', shape, impl: 'naive JS', ms: nms, rate: `${nrate.toFixed(1)} Melem/s` });
  for (const t of [logits, out]) t.dispose();
}

function naiveRmsNorm(x: Float32Array, w: Float32Array, rows: number, C: number, y: Float32Array) {
  for (let r = 0; r < rows; r++) {
    let sq = 0;
    for (let c = 0; c < C; c++) sq += x[r * C + c] * x[r * C + c];
    const inv = 1 / Math.sqrt(sq / C + 1e-6);
    for (let c = 0; c < C; c++) y[r * C + c] = w[c] * x[r * C + c] * inv;
  }
}

async function rmsNormCase(e: Engine, rows: Row[], o: { tokens: number; C: number }) {
  const shape = `tokens ${o.tokens}, C ${o.C} (T5-XL), f32`;
  const xa = rand(o.tokens * o.C, 11);
  const wa = rand(o.C, 12);
  const x = e.tensor(xa, [o.tokens, o.C], 'f32');
  const weight = e.tensor(wa, [o.C], 'f32');
  const y = e.empty([o.tokens, o.C], 'f32');
  const bytes = 2 * o.tokens * o.C * 4; // read x, write y
  const ms = await timeKernel(e, 'rms_norm', async () => {
    e.ops.rmsNorm({ x, weight, y });
    await e.sync();
  }, 20);
  const ya = new Float32Array(o.tokens * o.C);
  const nms = await timeIt('naive', () => naiveRmsNorm(xa, wa, o.tokens, o.C, ya), 20);
  const gbs = bytes / ms / 1e6;
  const ngbs = bytes / nms / 1e6;
  rows.push({ kernel: 'rmsNorm', shape, impl: `${e.backend} kernel`, ms, rate: `${gbs.toFixed(2)} GB/s`, ratio: `${(gbs / ngbs).toFixed(1)}×` });
  rows.push({ kernel: 'rmsNorm', shape, impl: 'naive JS', ms: nms, rate: `${ngbs.toFixed(2)} GB/s` });
  for (const t of [x, weight, y]) t.dispose();
}

// T5's encoder attention on packed prompts: qkv [T, 3, H, c], scores q·k (scale 1, as T5) + bias[h][clamp(j − i)].
function naiveSegmentAttention(qkv: Float32Array, cu: Int32Array, bias: Float32Array, H: number, c: number, out: Float32Array) {
  const R = (bias.length / H - 1) / 2;
  const stride = 3 * H * c;
  for (let seg = 0; seg + 1 < cu.length; seg++) {
    const first = cu[seg];
    const n = cu[seg + 1] - first;
    const s = new Float64Array(n);
    for (let h = 0; h < H; h++)
      for (let i = 0; i < n; i++) {
        const q = (first + i) * stride + h * c;
        let m = -Infinity;
        for (let j = 0; j < n; j++) {
          const k = (first + j) * stride + H * c + h * c;
          let acc = 0;
          for (let x = 0; x < c; x++) acc += qkv[q + x] * qkv[k + x];
          s[j] = acc + bias[h * (2 * R + 1) + Math.min(R, Math.max(-R, j - i)) + R];
          m = Math.max(m, s[j]);
        }
        let z = 0;
        for (let j = 0; j < n; j++) z += s[j] = Math.exp(s[j] - m);
        for (let x = 0; x < c; x++) {
          let acc = 0;
          for (let j = 0; j < n; j++) acc += s[j] * qkv[(first + j) * stride + 2 * H * c + h * c + x];
          out[((first + i) * H + h) * c + x] = acc / z;
        }
      }
  }
}

// The naive reference runs only at the first (small) shape: at 1 × 512 tokens it would take seconds per call,
// so larger shapes are compared against the naive GFLOP/s measured just before.
let naiveSegmentGflops = 0;
async function segmentAttentionCase(e: Engine, rows: Row[], o: { prompts: number; tokens: number; heads: number; c: number; naive: boolean; iterations: number }) {
  const { heads: H, c } = o;
  const T = o.prompts * o.tokens;
  const shape = `${o.prompts} prompt${o.prompts === 1 ? '' : 's'} × ${o.tokens} tokens, heads ${H}, c ${c}, rel. bias (T5-XL), f32`;
  const flops = 4 * H * c * o.prompts * o.tokens * o.tokens;
  const cu = Int32Array.from({ length: o.prompts + 1 }, (_, s) => s * o.tokens);
  const qkvA = rand(T * 3 * H * c, 13);
  const biasA = rand(H * 257, 14);
  const qkv = e.tensor(qkvA, [T, 3, H, c], 'f32');
  const cuSeqlens = e.tensor(cu, [o.prompts + 1], 'i32');
  const relativeBias = e.tensor(biasA, [H, 257], 'f32');
  const out = e.empty([T, H, c], 'f32');
  const ms = await timeKernel(e, 'segment_attention', async () => {
    e.ops.segmentAttention({ qkv, cuSeqlens, relativeBias, out, scale: 1, maxSeqlen: o.tokens });
    await e.sync();
  }, o.iterations);
  const gflops = flops / ms / 1e6;
  const row: Row = { kernel: 'segmentAttention', shape, impl: `${e.backend} kernel`, ms, rate: gflopsRate(gflops) };
  rows.push(row);
  if (o.naive) {
    const outA = new Float32Array(T * H * c);
    const nms = await timeIt('naive', () => naiveSegmentAttention(qkvA, cu, biasA, H, c, outA), 2);
    naiveSegmentGflops = flops / nms / 1e6;
    rows.push({ kernel: 'segmentAttention', shape, impl: 'naive JS', ms: nms, rate: `${naiveSegmentGflops.toFixed(2)} GFLOP/s` });
  } else {
    row.note = 'ratio vs the naive GFLOP/s measured above at the smaller shape';
  }
  if (naiveSegmentGflops) row.ratio = `${(gflops / naiveSegmentGflops).toFixed(1)}×`;
  for (const t of [qkv, cuSeqlens, relativeBias, out]) t.dispose();
}

function naiveGegluTanh(x: Float32Array, rows: number, F: number, out: Float32Array) {
  for (let r = 0; r < rows; r++)
    for (let i = 0; i < F; i++) {
      const g = x[r * 2 * F + i];
      const gelu = 0.5 * g * (1 + Math.tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)));
      out[r * F + i] = gelu * x[r * 2 * F + F + i];
    }
}

async function gatedActivationCase(e: Engine, rows: Row[], o: { tokens: number; F: number }) {
  const shape = `tokens ${o.tokens}, F ${o.F} (T5-XL GEGLU, gelu_tanh), f32`;
  const xa = rand(o.tokens * 2 * o.F, 15);
  const x = e.tensor(xa, [o.tokens, 2 * o.F], 'f32');
  const out = e.empty([o.tokens, o.F], 'f32');
  const bytes = 3 * o.tokens * o.F * 4; // read both halves, write one
  const ms = await timeKernel(e, 'gated_activation', async () => {
    e.ops.gatedActivation({ x, out, fn: 'gelu_tanh' });
    await e.sync();
  }, 20);
  const outA = new Float32Array(o.tokens * o.F);
  const nms = await timeIt('naive', () => naiveGegluTanh(xa, o.tokens, o.F, outA), 5);
  const gbs = bytes / ms / 1e6;
  const ngbs = bytes / nms / 1e6;
  rows.push({ kernel: 'gatedActivation', shape, impl: `${e.backend} kernel`, ms, rate: `${gbs.toFixed(2)} GB/s`, ratio: `${(gbs / ngbs).toFixed(1)}×` });
  rows.push({ kernel: 'gatedActivation', shape, impl: 'naive JS', ms: nms, rate: `${ngbs.toFixed(2)} GB/s` });
  for (const t of [x, out]) t.dispose();
}

if (values.only && !['kernels', 'e2e', 'paged'].includes(values.only)) throw new Error(`--only takes kernels, e2e or paged`);
if (values.project) {
  if (values.backend !== 'emu') throw new Error('--project needs --backend emu (the cost counters are the emulator\'s)');
  const sampleBlocks = Number(values.sample);
  const e = await createEngine({ backend: 'emu' });
  try {
    process.stderr.write(`scalekv bench --project ${values.project} on ${e.device}\n`);
    // ptxas's register counts: this checkout's build, or `--resources DIR` (another build, e.g. a baseline's).
    const buildDir = values.resources ?? defaultBuildDir(new URL('..', import.meta.url).pathname);
    if (values.only !== 'e2e') {
      const projected = await projectKernels(e, values.project, { sampleBlocks, buildDir });
      process.stdout.write(values.json ? JSON.stringify(projected, null, 2) + '\n' : formatProjection(projected, values.project, sampleBlocks) + '\n');
    }
    if (values.only !== 'kernels') {
      const kv = values.kv;
      const kvPolicy = kv === 'full' ? undefined : (depth: number) => resolvePolicy(kv, { depth, preset: 'infinity-2b' });
      const image = await projectImage(values.project, { sampleBlocks, buildDir, kvPolicy, onOp: (i, n) => process.stderr.write(`\rreplaying op ${i + 1}/${n}`) });
      process.stderr.write('\n');
      process.stdout.write(values.json ? JSON.stringify(image, null, 2) + '\n' : '\n' + formatImageProjection(image, values.project, kv) + '\n');
    }
  } finally {
    e.dispose();
  }
  process.exit(0);
}
const engine = await createEngine({ backend: values.backend as BackendChoice });
let fmaPeak: { gflops: number; isa: string } | undefined;
const rows: Row[] = [];
let e2e: E2eResult | undefined;
try {
  process.stderr.write(`scalekv bench on ${engine.backend}: ${engine.device}\n`);
  if (engine.backend === 'cpu') {
    fmaPeak = loadNative().measureFmaPeak(availableParallelism(), 1.0);
    process.stderr.write(`f32 FMA peak of this machine, measured now: ${fmaPeak.gflops.toFixed(1)} GFLOP/s (${fmaPeak.isa}, ${availableParallelism()} threads); cpu library: ${backendInfo().cpu.library ?? 'builtin kernels'}\n`);
  }
  if (values.only === 'paged') await pagedCases();
  else if (values.only !== 'e2e') await kernelCases();
  if (values.only !== 'kernels' && values.only !== 'paged') e2e = await runE2e(engine, { iterations: engine.backend === 'emu' ? 1 : 5 });
} finally {
  engine.dispose();
}

function naiveGemm(x: Float32Array, w: Float32Array, m: number, n: number, k: number, y: Float32Array) {
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let acc = 0;
      for (let p = 0; p < k; p++) acc += x[i * k + p] * w[j * k + p];
      y[i * n + j] = acc;
    }
}

// dtype 'f32 x bf16': f32 activations against bf16 weights (the CPU's bf16 mode; x is rounded to bf16 by the op).
async function gemmCase(e: Engine, rows: Row[], o: { m: number; n: number; k: number; dtype: 'f32' | 'bf16' | 'f32 x bf16'; what: string; naive: boolean; iterations: number }) {
  const shape = `${o.m} x ${o.n} x ${o.k} (${o.what}), ${o.dtype}`;
  const xa = rand(o.m * o.k, 21);
  const wa = rand(o.n * o.k, 22);
  const x = e.tensor(xa, [o.m, o.k], o.dtype === 'bf16' ? 'bf16' : 'f32');
  const w = e.tensor(wa, [o.n, o.k], o.dtype === 'f32' ? 'f32' : 'bf16');
  const y = e.empty([o.m, o.n], 'f32');
  const flop = 2 * o.m * o.n * o.k;
  const { ms, path } = await timeKernelPath(e, 'gemm', async () => {
    e.ops.gemm({ x, w, y });
    await e.sync();
  }, o.iterations);
  const row: Row = { kernel: 'gemm', shape, impl: `${e.backend} ${path}`, ms, rate: gflopsRate(flop / ms / 1e6) };
  rows.push(row);
  if (o.naive) {
    const ya = new Float32Array(o.m * o.n);
    const nms = await timeIt('naive', () => naiveGemm(xa, wa, o.m, o.n, o.k, ya), 2);
    row.ratio = `${(nms / ms).toFixed(1)}×`;
    rows.push({ kernel: 'gemm', shape, impl: 'naive JS', ms: nms, rate: `${(flop / nms / 1e6).toFixed(2)} GFLOP/s` });
  }
  for (const t of [x, w, y]) t.dispose();
}

async function conv2dCase(e: Engine, rows: Row[], o: { channels: number; out: number; size: number; k: number; what: string; iterations: number }) {
  const shape = `[1, ${o.channels}, ${o.size}, ${o.size}] ${o.k}x${o.k} -> ${o.out} (${o.what}), f32`;
  const input = e.tensor(rand(o.channels * o.size * o.size, 31), [1, o.channels, o.size, o.size], 'f32');
  const weight = e.tensor(rand(o.out * o.channels * o.k * o.k, 32), [o.out, o.channels, o.k, o.k], 'f32');
  const bias = e.tensor(rand(o.out, 33), [o.out], 'f32');
  const out = e.empty([1, o.out, o.size, o.size], 'f32');
  const flop = 2 * o.out * o.channels * o.k * o.k * o.size * o.size;
  const { ms, path } = await timeKernelPath(e, 'conv2d', async () => {
    e.ops.conv2d({ input, weight, bias, out });
    await e.sync();
  }, o.iterations);
  rows.push({ kernel: 'conv2d', shape, impl: `${e.backend} ${path}`, ms, rate: gflopsRate(flop / ms / 1e6) });
  for (const t of [input, weight, bias, out]) t.dispose();
}

/**
 * `--only paged [--page-tokens 1,2,4,16]`: paged against contiguous attention for each page size, at Infinity-2B's
 * last scale (ScaleKV 10 %: a refiner's 650 history keys and a drafter's 6385, each with the scale's 4096) and with
 * every key from the history.
 */
async function pagedCases() {
  const sizes = values['page-tokens']!.split(',').map(Number);
  if (!sizes.every((p) => Number.isSafeInteger(p) && p > 0)) throw new Error('--page-tokens takes positive integers, comma-separated');
  // 1024 of the 4096 queries on a CPU: each query block reads every key, so the ratio is the same and the rounds
  // are four times as many.
  const [rounds, lq] = engine.backend === 'cuda' ? [20, 4096] : [9, 1024];
  for (const pageTokens of sizes) {
    await pagedAttentionCase(engine, rows, { heads: 16, lq, hist: 650, lc: 4096, d: 128, pageTokens, rounds });
    await pagedAttentionCase(engine, rows, { heads: 16, lq, hist: 6385, lc: 4096, d: 128, pageTokens, rounds });
    await pagedAttentionCase(engine, rows, { heads: 16, lq: 256, hist: 6425, lc: 0, d: 128, pageTokens, rounds });
  }
}

async function kernelCases() {
  await attentionCase(engine, rows, { pairs: 2 * 4, heads: 4, lq: 64, hist: 650, lc: 64, d: 128, dtype: 'f32', naive: true, iterations: 5 });
  await attentionCase(engine, rows, { pairs: 2 * 4, heads: 4, lq: 64, hist: 650, lc: 64, d: 128, dtype: 'bf16', naive: false, iterations: 5 });
  if (!values.quick) {
    const iterations = engine.backend === 'cuda' ? 20 : 1;
    for (const hist of [650, 6425])
      await attentionCase(engine, rows, { pairs: 16, heads: 16, lq: 4096, hist, lc: 4096, d: 128, dtype: 'bf16', naive: false, iterations });
    // Infinity-2B's last scale with ScaleKV 10 % (650 history tokens a layer), paged as the arena holds it.
    await pagedAttentionCase(engine, rows, { heads: 16, lq: 4096, hist: 650, lc: 4096, d: 128, pageTokens: 16, rounds: engine.backend === 'cuda' ? 20 : 2 });
  }
  // All keys from the history: where the page indirection costs the most.
  for (const pageTokens of [16, 64])
    await pagedAttentionCase(engine, rows, { heads: 16, lq: 256, hist: 6425, lc: 0, d: 128, pageTokens, rounds: engine.backend === 'cuda' ? 20 : 3 });
  await compactCase(engine, rows, { b: 2, heads: 16, cap: 6425 + 4096, keep: 650, d: 128 });
  await selectionCase(engine, rows, { b: 2, heads: 16, nw: 16, nk: 10521, budget: 650 });
  await rmsNormCase(engine, rows, { tokens: 512, C: 2048 });
  const t5Iterations = engine.backend === 'cuda' ? 20 : 3;
  await segmentAttentionCase(engine, rows, { prompts: 8, tokens: 64, heads: 32, c: 64, naive: true, iterations: t5Iterations });
  await segmentAttentionCase(engine, rows, { prompts: 1, tokens: 512, heads: 32, c: 64, naive: false, iterations: t5Iterations });
  await gatedActivationCase(engine, rows, { tokens: 512, F: 5120 });
  // Infinity-2B's block Linears at the last scale (4096 tokens a row, C 2048, FFN 8192), and the d32 VAE's convolutions.
  const heavy = engine.backend === 'cuda' ? 20 : 2;
  await gemmCase(engine, rows, { m: 64, n: 512, k: 512, dtype: 'f32', what: 'small', naive: true, iterations: 5 });
  if (!values.quick) {
    for (const dtype of ['f32', 'bf16', 'f32 x bf16'] as const) {
      await gemmCase(engine, rows, { m: 4096, n: 6144, k: 2048, dtype, what: '2B mat_qkv', naive: false, iterations: heavy });
      await gemmCase(engine, rows, { m: 4096, n: 8192, k: 2048, dtype, what: '2B ffn.fc1', naive: false, iterations: heavy });
      await gemmCase(engine, rows, { m: 4096, n: 2048, k: 8192, dtype, what: '2B ffn.fc2', naive: false, iterations: heavy });
    }
    await conv2dCase(engine, rows, { channels: 512, out: 512, size: 64, k: 3, what: 'VAE d32 mid', iterations: heavy });
    await conv2dCase(engine, rows, { channels: 512, out: 512, size: 128, k: 3, what: 'VAE d32 up, 128²', iterations: heavy });
    await conv2dCase(engine, rows, { channels: 256, out: 256, size: 256, k: 3, what: 'VAE d32 up, 256²', iterations: heavy });
    await conv2dCase(engine, rows, { channels: 128, out: 128, size: 1024, k: 3, what: 'VAE d32 full resolution', iterations: heavy });
    await conv2dCase(engine, rows, { channels: 32, out: 32, size: 1024, k: 3, what: 'golden model VAE full resolution', iterations: heavy });
  }
  await conv2dCase(engine, rows, { channels: 64, out: 64, size: 64, k: 3, what: 'tiny VAE', iterations: 5 });
}

if (values.json) {
  process.stdout.write(JSON.stringify({ backend: engine.backend, device: engine.device, fmaPeak, cpuLibrary: backendInfo().cpu.library, rows, e2e }, null, 2) + '\n');
} else if (rows.length) {
  if (fmaPeak) process.stdout.write(`f32 FMA peak (measured in this run): ${fmaPeak.gflops.toFixed(1)} GFLOP/s (${fmaPeak.isa}); cpu library: ${backendInfo().cpu.library ?? 'builtin kernels'}\n`);
  const header = ['kernel', 'shape', 'impl', 'ms per call', 'rate', 'vs naive'];
  const table = rows.map((r) => [r.kernel, r.shape, r.impl, r.ms.toFixed(3), r.rate, r.ratio ?? '']);
  const widths = header.map((h, i) => Math.max(h.length, ...table.map((row) => row[i].length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(' | ')} |`;
  process.stdout.write([line(header), line(widths.map((w) => '-'.repeat(w))), ...table.map(line)].join('\n') + '\n');
  for (const r of rows) if (r.note) process.stdout.write(`note: ${r.kernel} ${r.shape}: ${r.note}\n`);
}
if (!values.json && e2e) process.stdout.write((rows.length ? '\n' : '') + formatE2e(engine.backend, e2e));
