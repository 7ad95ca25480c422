// The T5 text-encoder benchmark (flan-t5-xl's encoder: 24 layers, d 2048, 32 heads of 64, d_ff 5120) with random
// weights made in place, no download: ms per encode of 1, 8 and 64 prompts of 30 and 512 tokens, tokens/s,
// achieved GFLOP/s and each op family's share of one profiled run (device time of every op between timing marks:
// CUDA events on the GPU); then the encoder's share of one image's end-to-end time for the built-in tiny model.
//
// `npm run bench:t5 [-- --backend cuda] [--quick] [--json] [--layers N] [--prompts 1,8,64] [--tokens 30,512]
//   [--budget S] [--dtype f32|bf16] [--max-batch-tokens N] [--only encode|share]`
//
// On a CPU the full 24-layer encoder at 64 × 512 tokens is ~79 TFLOP (about half an hour on 2 cores), so `--layers N` builds and
// times an encoder of N identical layers and extrapolates to 24 from the profiled split between the per-layer ops and
// the fixed part (embedding gather, upload, final norm, readback). Extrapolated figures are labelled so.
import { parseArgs } from 'node:util';
import { Bench } from 'tinybench';
import { createEngine, type BackendChoice, type Engine, type OpProfileEntry } from '../lib/engine.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { FLAN_T5_XL, t5EncoderShapes, type T5Config } from '../lib/text/t5-checkpoint.js';
import { T5TextEncoder, type T5WeightSource } from '../lib/text/t5-encoder.js';
import { FAMILIES, runE2e } from './e2e.js';

const { values } = parseArgs({
  args: process.argv.slice(2),
  options: {
    backend: { type: 'string', default: 'auto' },
    quick: { type: 'boolean', default: false },
    json: { type: 'boolean', default: false },
    layers: { type: 'string' },
    prompts: { type: 'string' },
    tokens: { type: 'string' },
    budget: { type: 'string' },
    dtype: { type: 'string' },
    'max-batch-tokens': { type: 'string' },
    only: { type: 'string' },
  },
});

const T5_XL = FLAN_T5_XL;
// The built-in tiny model's own T5 (lib/model/tiny.ts), with random weights of this bench.
const T5_TINY: T5Config = createTinyModel(0).t5.config;

function positiveInt(text: string, what: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1) throw new Error(`${what} must be a positive integer, got '${text}'`);
  return n;
}
const intList = (text: string, what: string) => text.split(',').map((s) => positiveInt(s.trim(), what));

const quick = values.quick;
const layers = values.layers ? positiveInt(values.layers, '--layers') : quick ? 2 : T5_XL.layers;
const promptCounts = values.prompts ? intList(values.prompts, '--prompts') : quick ? [1, 8] : [1, 8, 64];
const tokenCounts = values.tokens ? intList(values.tokens, '--tokens') : quick ? [30] : [30, 512];
// Seconds of timed encodes per case after the profiled one; a case estimated to cost more than this runs once (the
// profiled run is the measurement) and without a warm-up.
const budgetMs = 1000 * (values.budget ? Number(values.budget) : quick ? 2 : 10);
if (!(budgetMs >= 0)) throw new Error(`--budget must be a number of seconds, got '${values.budget}'`);
const maxBatchTokens = values['max-batch-tokens'] ? positiveInt(values['max-batch-tokens'], '--max-batch-tokens') : undefined;
if (values.dtype !== undefined && values.dtype !== 'f32' && values.dtype !== 'bf16') throw new Error(`--dtype takes f32 or bf16`);
const dtype = values.dtype as 'f32' | 'bf16' | undefined;
if (values.only && values.only !== 'encode' && values.only !== 'share') throw new Error(`--only takes encode or share`);
if (tokenCounts.some((n) => n > 512)) throw new Error('--tokens: the tokenizer cuts prompts at 512 tokens');
const MAX_TIMED_RUNS = 10;

const log = (line: string) => process.stderr.write(line + '\n');

// --- weights --------------------------------------------------------------------------------------------------
// Random, not zero: with zeros every activation is 0, so tanh/exp take their trivial fast paths (the CPU's
// gatedActivation at 512 × 5120 ran in 15.7 ms on zeros against 30.6 ms on random values) and a GPU's tensor
// cores draw less power on zero operands, both of which would flatter the timing. Each tensor repeats a pool of
// 65521 (prime) values, so rows of any width start at different phases and a fill costs a memset, not a
// random-number generator per element.
const POOL = 65521;
function uniformPool(seed: number, lo: number, hi: number): Buffer {
  const a = new Float32Array(POOL);
  let s = seed >>> 0;
  for (let i = 0; i < POOL; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    a[i] = lo + ((hi - lo) * s) / 2 ** 32;
  }
  return Buffer.from(a.buffer);
}

/**
 * Projections uniform in ±0.02 (so the unit-RMS normed inputs give q, k, v and the FFN's halves an RMS near 0.5:
 * softmax logits of a few units and GELU away from 0), embeddings ±1, norm gains 0.5..1.5, the bias table ±1.
 */
function randomWeights(config: T5Config): T5WeightSource {
  const shapes = t5EncoderShapes(config);
  const pools = {
    projection: uniformPool(1, -0.02, 0.02),
    embedding: uniformPool(2, -1, 1),
    norm: uniformPool(3, 0.5, 1.5),
    bias: uniformPool(4, -1, 1),
  };
  // Every layer reads the same bytes (the encoder copies them into its own device tensors), so 24 layers cost one
  // layer's fills.
  const made = new Map<string, Buffer>();
  return {
    config,
    async read(name: string) {
      const shape = shapes.get(name);
      if (!shape) throw new Error(`random T5 weights: no tensor ${name}`);
      const kind =
        name === 'shared.weight' ? 'embedding'
        : name.endsWith('norm.weight') ? 'norm'
        : name.endsWith('relative_attention_bias.weight') ? 'bias'
        : 'projection';
      const key = `${kind} ${shape.join('x')}`;
      let data = made.get(key);
      if (!data) {
        data = Buffer.allocUnsafeSlow(4 * shape.reduce((a, b) => a * b, 1)).fill(pools[kind]);
        if (kind !== 'embedding') made.set(key, data);
      }
      return { dtype: 'f32' as const, shape, data };
    },
  };
}

/** Prompts of `tokens` ids each (any ids in the vocabulary, then `</s>` = 1), concatenated. */
function promptIds(prompts: number, tokens: number, vocab: number): { ids: Int32Array; lens: number[] } {
  const ids = new Int32Array(prompts * tokens);
  let s = 12345;
  for (let i = 0; i < ids.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    ids[i] = (i + 1) % tokens === 0 ? 1 : 2 + (s % (vocab - 2));
  }
  return { ids, lens: new Array(prompts).fill(tokens) };
}

// --- work -----------------------------------------------------------------------------------------------------
/** FLOP of one encode with `layerCount` layers: the four GEMMs (q‖k‖v, o, wi_0‖wi_1, wo) and attention's q·kᵀ and p·v. */
function encodeFlop(c: T5Config, layerCount: number, prompts: number, tokens: number): { gemm: number; attention: number; total: number } {
  const N = prompts * tokens;
  const inner = c.heads * c.dKv;
  const gemm = layerCount * 2 * N * (3 * inner * c.dModel + inner * c.dModel + 2 * c.dFf * c.dModel + c.dFf * c.dModel);
  const attention = layerCount * 4 * c.heads * c.dKv * prompts * tokens * tokens;
  return { gemm, attention, total: gemm + attention };
}

const SPLIT = ['linear (GEMM)', 'self-attention', 'norms', 'elementwise', 'host uploads'] as const;
const OTHER_OPS = 'other ops';
// Wall time of the profiled encode that no op accounts for: the host-side embedding gather, enqueueing, queue
// hand-offs and the readback of the result (downloads are not profiled ops).
const OUTSIDE = 'outside ops (host gather, readback, gaps)';
const PER_LAYER_OPS = new Set(['gemm', 'segment_attention', 'gated_residual', 'gated_activation', 'rms_norm']);

interface Family {
  family: string;
  ms: number;
  /** Of the profiled encode's wall time. */
  share: number;
}

interface CaseResult {
  prompts: number;
  tokens: number;
  /** Forward passes the encoder split the prompts into (maxBatchTokens). */
  passes: number;
  layersRun: number;
  /** Encodes timed for msMeasured; 'profiled': the profiled run is the measurement, as one encode costs more than --budget. */
  runs: number | 'profiled';
  /** Whether an untimed encode ran first (skipped when the previous case's rate predicts more than --budget). */
  warmedUp: boolean;
  /** Wall-clock ms per encode of the layersRun-layer encoder, result read back. */
  msMeasured: number;
  tokensPerSecMeasured: number;
  /** tokens/s over the 1 × 30 case's tokens/s, same process, same layer count. */
  vsBaseline?: number;
  gflopPerEncode: number;
  gflops: number;
  /** Profiled op time per layer (rms_norm less the final norm of each pass). */
  msPerLayer: number;
  /** Per encode at T5-XL's 24 layers: measured when layersRun is 24, else extrapolated. */
  ms24: number;
  ms24Extrapolated: boolean;
  tokensPerSec24: number;
  profiledWallMs: number;
  families: Family[];
  profile: OpProfileEntry[];
}

function split(profile: OpProfileEntry[], wallMs: number): Family[] {
  const ms = new Map<string, number>([...SPLIT, OTHER_OPS].map((f) => [f, 0]));
  for (const p of profile) {
    const family = (SPLIT as readonly string[]).includes(FAMILIES[p.op]) ? FAMILIES[p.op] : OTHER_OPS;
    ms.set(family, (ms.get(family) as number) + p.ms);
  }
  const opsMs = [...ms.values()].reduce((a, b) => a + b, 0);
  ms.set(OUTSIDE, Math.max(0, wallMs - opsMs));
  const total = Math.max(wallMs, opsMs);
  return [...ms.entries()].map(([family, v]) => ({ family, ms: v, share: v / total }));
}

async function timeEncodes(encoder: T5TextEncoder, ids: Int32Array, lens: number[], runs: number): Promise<number> {
  const bench = new Bench({ name: 't5', iterations: runs, time: 0, warmup: false });
  bench.add('encode', async () => {
    await encoder.encodeIds(ids, lens);
  });
  await bench.run();
  const r = bench.tasks[0].result;
  if (r.state !== 'completed') throw new Error(`t5 encode: ${r.state} ${'error' in r ? String(r.error) : ''}`);
  return r.latency.mean;
}

async function runCase(encoder: T5TextEncoder, prompts: number, tokens: number, estimateMs: number | undefined): Promise<CaseResult> {
  const c = encoder.config;
  const e = encoder.engine;
  const { ids, lens } = promptIds(prompts, tokens, c.vocab);
  const passes = Math.ceil(prompts / Math.max(1, Math.floor(encoder.maxBatchTokens / tokens)));
  const flop = encodeFlop(c, c.layers, prompts, tokens);
  const dear = estimateMs !== undefined && estimateMs > budgetMs;
  if (!dear) await encoder.encodeIds(ids, lens); // warm-up: the activations' first allocation
  e.startProfiling();
  const t0 = performance.now();
  await encoder.encodeIds(ids, lens);
  const profiledWallMs = performance.now() - t0;
  const profile = await e.stopProfiling();
  const runs = dear ? 0 : Math.min(MAX_TIMED_RUNS, Math.floor(budgetMs / profiledWallMs));
  const msMeasured = runs > 0 ? await timeEncodes(encoder, ids, lens, runs) : profiledWallMs;
  let perLayerOpMs = 0;
  for (const p of profile) {
    if (!PER_LAYER_OPS.has(p.op)) continue;
    // Each pass ends with the final norm, outside the layers.
    perLayerOpMs += p.op === 'rms_norm' ? (p.ms * (p.count - passes)) / p.count : p.ms;
  }
  const msPerLayer = perLayerOpMs / c.layers;
  const ms24Extrapolated = c.layers !== T5_XL.layers;
  // The profiled encode's proportions, applied to the timed mean: subtracting a per-layer time taken from another
  // run could leave a negative fixed part when that run was the slower one.
  const fixedMs = Math.max(0, profiledWallMs - perLayerOpMs);
  const ms24 = ms24Extrapolated ? (msMeasured * (fixedMs + T5_XL.layers * msPerLayer)) / (fixedMs + perLayerOpMs) : msMeasured;
  return {
    prompts,
    tokens,
    passes,
    layersRun: c.layers,
    runs: runs > 0 ? runs : 'profiled',
    warmedUp: !dear,
    msMeasured,
    tokensPerSecMeasured: (prompts * tokens) / (msMeasured / 1000),
    gflopPerEncode: flop.total / 1e9,
    gflops: flop.total / msMeasured / 1e6,
    msPerLayer,
    ms24,
    ms24Extrapolated,
    tokensPerSec24: (prompts * tokens) / (ms24 / 1000),
    profiledWallMs,
    families: split(profile, profiledWallMs),
    profile,
  };
}

function formatMs(ms: number): string {
  if (ms >= 120_000) return `${(ms / 60_000).toFixed(1)} min`;
  if (ms >= 10_000) return `${(ms / 1000).toFixed(1)} s`;
  return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`;
}

async function encodeCases(engine: Engine): Promise<{ config: T5Config; dtype: string; maxBatchTokens: number; weightBytes: number; loadMs: number; cases: CaseResult[] }> {
  const config = { ...T5_XL, layers };
  const order = promptCounts.flatMap((p) => tokenCounts.map((t) => ({ prompts: p, tokens: t })));
  // Cheapest first, so each case's cost is estimated from the rate of the ones before it.
  const byCost = [...order].sort((a, b) => encodeFlop(config, layers, a.prompts, a.tokens).total - encodeFlop(config, layers, b.prompts, b.tokens).total);
  const planned = order.reduce((n, k) => n + encodeFlop(config, layers, k.prompts, k.tokens).total, 0);
  log(`T5-XL encoder, ${layers} of 24 layers, on ${engine.backend} (${engine.device}): ${order.length} cases, ${(planned / 1e12).toFixed(2)} TFLOP per encode of all of them`);
  const t0 = performance.now();
  const encoder = await T5TextEncoder.load(engine, randomWeights(config), undefined, { dtype, maxBatchTokens });
  const loadMs = performance.now() - t0;
  log(`  random weights: ${(encoder.weightBytes / 2 ** 30).toFixed(2)} GiB ${encoder.dtype} on the device, made and uploaded in ${formatMs(loadMs)}`);
  const loaded = { dtype: encoder.dtype, maxBatchTokens: encoder.maxBatchTokens, weightBytes: encoder.weightBytes };
  const cases = new Map<string, CaseResult>();
  try {
    let gflops: number | undefined;
    for (const k of byCost) {
      const flop = encodeFlop(config, layers, k.prompts, k.tokens).total;
      const estimateMs = gflops ? flop / gflops / 1e6 : undefined;
      log(`  ${k.prompts} × ${k.tokens} tokens: ${(flop / 1e9).toFixed(1)} GFLOP per encode` +
        (estimateMs !== undefined ? `, ~${formatMs(estimateMs)} each at ${gflops?.toFixed(1)} GFLOP/s (the previous case's rate)` : ''));
      const r = await runCase(encoder, k.prompts, k.tokens, estimateMs);
      gflops = r.gflops;
      cases.set(`${k.prompts}x${k.tokens}`, r);
    }
  } finally {
    encoder.dispose();
  }
  const base = cases.get('1x30');
  const results = order.map((k) => cases.get(`${k.prompts}x${k.tokens}`) as CaseResult);
  if (base) for (const r of results) r.vsBaseline = r.tokensPerSecMeasured / base.tokensPerSecMeasured;
  return { config, ...loaded, loadMs, cases: results };
}

interface ShareResult {
  encodeMs: number;
  encodeRuns: number;
  imageMs: number;
  share: number;
}

/**
 * bench/e2e.ts encodes its prompt once, before the timed images, so its image time has no text encoding in it: the
 * encoder's share is encode / (encode + image), with an encoder of the tiny model's shapes.
 */
async function tinyShare(engine: Engine): Promise<ShareResult> {
  log(`tiny model: T5 (d 128, 2 layers) 1 × 30 tokens, and one image end to end (bench/e2e.ts)`);
  const encoder = await T5TextEncoder.load(engine, randomWeights(T5_TINY), undefined, { dtype });
  let encodeMs: number;
  const encodeRuns = quick ? 10 : 50;
  try {
    const { ids, lens } = promptIds(1, 30, T5_TINY.vocab);
    await encoder.encodeIds(ids, lens);
    encodeMs = await timeEncodes(encoder, ids, lens, encodeRuns);
  } finally {
    encoder.dispose();
  }
  const e2e = await runE2e(engine, { iterations: quick || engine.backend === 'emu' ? 2 : 5 });
  return { encodeMs, encodeRuns, imageMs: e2e.msPerImage, share: encodeMs / (encodeMs + e2e.msPerImage) };
}

const engine = await createEngine({ backend: values.backend as BackendChoice });
let encode: Awaited<ReturnType<typeof encodeCases>> | undefined;
let share: ShareResult | undefined;
try {
  if (values.only !== 'share') encode = await encodeCases(engine);
  if (values.only !== 'encode') share = await tinyShare(engine);
} finally {
  engine.dispose();
}

if (values.json) {
  process.stdout.write(JSON.stringify({ backend: engine.backend, device: engine.device, quick, budgetMs, encode, tinyShare: share }, null, 2) + '\n');
} else {
  const out: string[] = [];
  if (encode) {
    const L = encode.config.layers;
    const extrapolated = L !== T5_XL.layers;
    out.push(
      `T5-XL encoder (flan-t5-xl shapes: d 2048, 32 heads × 64, d_ff 5120; random weights, ${encode.dtype}), ${L} of 24 layers, on ${engine.backend} (${engine.device}), ` +
        `passes of at most ${encode.maxBatchTokens} tokens:`,
      extrapolated
        ? `  "24 layers" columns are EXTRAPOLATED from ${L} measured layers (layers are identical): the measured time × (fixed + 24 × per-layer) / ` +
            `(fixed + ${L} × per-layer), per-layer = the profiled layer ops' time / ${L}, fixed = the rest of the profiled encode (gather, upload, final norm, ` +
            `readback). Every other column is measured on ${L} layers.`
        : '  every figure measured on the full 24-layer encoder.',
      `  GFLOP/s counts the GEMMs (2·N·(4·inner·d + 3·d_ff·d) per layer) and attention (4·H·c·Σn² per layer); split = share of one profiled encode's wall time.`,
    );
    const columns: [string, (r: CaseResult) => string][] = [
      ['prompts × tokens', (r) => `${r.prompts} × ${r.tokens}`],
      ['passes', (r) => String(r.passes)],
      ['runs', (r) => (r.runs === 'profiled' ? `1 (the profiled one${r.warmedUp ? '' : ', no warm-up'})` : String(r.runs))],
      [`ms per encode (${L} layers)`, (r) => formatMs(r.msMeasured)],
      ...(extrapolated ? [['ms per encode (24 layers, EXTRAPOLATED)', (r: CaseResult) => formatMs(r.ms24)] as [string, (r: CaseResult) => string]] : []),
      [extrapolated ? 'tokens/s (24 layers, EXTRAPOLATED)' : 'tokens/s', (r) => r.tokensPerSec24.toFixed(0)],
      [`tokens/s vs 1 × 30 (${L} layers)`, (r) => (r.vsBaseline !== undefined ? `${r.vsBaseline.toFixed(2)}×` : '')],
      ['GFLOP/s', (r) => r.gflops.toFixed(1)],
      ['ms per layer (profiled)', (r) => formatMs(r.msPerLayer)],
      ...[...SPLIT, OTHER_OPS, OUTSIDE].map((f): [string, (r: CaseResult) => string] => [
        f,
        (r) => `${(100 * (r.families.find((x) => x.family === f) as Family).share).toFixed(1)}%`,
      ]),
    ];
    out.push(`| ${columns.map(([h]) => h).join(' | ')} |`, `| ${columns.map(() => '---').join(' | ')} |`);
    for (const r of encode.cases) out.push(`| ${columns.map(([, cell]) => cell(r)).join(' | ')} |`);
  }
  if (share) {
    out.push(
      '',
      `encoder's share of one image, tiny model on ${engine.backend} (measured): T5 of the tiny model's width (d 128, 4 heads × 32, d_ff 256, 2 layers, random weights), ` +
        `1 prompt × 30 tokens: ${formatMs(share.encodeMs)} (mean of ${share.encodeRuns}); one 256×256 image end to end without text encoding ` +
        `(bench/e2e.ts, prompt encoded beforehand): ${formatMs(share.imageMs)}; share = encode / (encode + image) = ${(100 * share.share).toFixed(2)}%.`,
    );
    const xl = encode?.cases.find((r) => r.prompts === 1 && r.tokens === 30);
    out.push(
      `Infinity-2B (T5-XL + the 2B transformer, 1M pixels): NOT measured — this bench times no 2B image (none can be timed on a CPU); ` +
        `its share must come from a 2B end-to-end run on a GPU device` +
        (xl ? ` (T5-XL 1 × 30 tokens on ${engine.backend}: ${formatMs(xl.ms24)}${xl.ms24Extrapolated ? `, extrapolated from ${xl.layersRun} layers` : ', measured'}, to divide by that run's image time).` : '.'),
    );
  }
  process.stdout.write(out.join('\n') + '\n');
}
