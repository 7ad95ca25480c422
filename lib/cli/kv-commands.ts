// `scalekv plan`, `scalekv calibrate` and `scalekv eval`: the memory planner, ASI calibration of a budget plan and
// the fidelity report of KV policies against the full cache. Results go to stdout; progress to stderr.
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { fail } from '../errors.js';
import { fidelity, Fidelity } from '../eval/metrics.js';
import { calibrate } from '../scalekv/asi.js';
import { largestBatch, MemoryPlan, parseBytes, planMemory } from '../kv/planner.js';
import { kvPageTokensFor } from '../kv/cache.js';
import { paperTokensForSpec, resolvePolicy } from '../kv/resolve.js';
import { PixelBudget, scaleSchedule } from '../model/schedule.js';
import { parseAspect, presetConfig, splitTextFeatures } from '../pipeline.js';
import { budgetPlanToJson } from '../scalekv/budget.js';
import { createTinyModel } from '../model/tiny.js';
import { loadFromFlags, parseNumber, textOf } from './common.js';
import type { KvDtype } from '../model/generate.js';

export const KV_USAGE: Record<string, string> = {
  plan: `  plan [--preset infinity-2b|infinity-8b|...|tiny] [--batch N] [--policy SPEC] [--pn 1M] [--aspect H/W]
       [--dtype bf16|f32] [--kv-dtype int8|fp8] [--k-dtype f32|bf16] [--text-tokens T] [--no-cfg] [--no-decode] [--vae-batch N]
       [--no-text-encoder] [--keep-text-encoder] [--negative-prompts] [--device-memory 80GiB] [--for cuda|cpu] [--json]
      Exact peak device memory of a generation and its VAE decode, by category (weights, KV history in its paged
      arena, the shared current-scale scratch, activations), from a dry run of the loop on the 'count' backend; the
      reserved peak with the static memory plan the Pipeline runs from, and with the caching allocator alone; the
      VAE decodes --vae-batch images at once (default: the most that leave the peak where sampling put it); the
      paper's KV accounting (history read by the last scale; --k-dtype f32 is the
      reference's fp32 K) and, with --device-memory, the largest batch whose peak fits. --dtype is the model's
      (block Linears and K/V, and the T5 encoder's Linears); --kv-dtype stores K/V as 8-bit codes with a scale
      byte per (token, head) instead; --text-tokens defaults to the model's maximum prompt
      length (512). The T5 encoder (flan-t5-xl; the tiny model's own) is counted as generate runs it: loaded after
      the model, run on the prompts and freed before sampling (--keep-text-encoder: kept loaded, as a server does;
      --no-text-encoder: precomputed features; --negative-prompts: one per prompt, encoded and attended to).
      --for: the backend the plan is for (default cuda): its KV arena's page size, one token on cuda, 16 on cpu.
      examples:
        scalekv plan --preset infinity-2b --policy scalekv:10% --device-memory 80GiB
        scalekv plan --preset infinity-8b --batch 4 --policy full --json
`,
  calibrate: `  calibrate [--prompt P]... [--pn 0.06M] [--budget 10%] [--drafters N] [--top-k K'] [--no-normalize-history]
       [--scales 8,9,...] [--max-queries 256] [--seed N] [--cfg X] [--out plan.json] [--json]
       [--weights CKPT (--t5 DIR | --text FEATURES.safetensors) --preset P [--dtype bf16|f32]] [--backend B]
      Attention Selectivity Index profiling on the full-cache loop (the tiny model and --prompt texts by default):
      per (layer, scale) current-map ratio x history top-K' mass from the attention kernel's own probabilities,
      Z-normalised per scale; the N_d lowest pairs are drafters. Writes an official-format budget plan JSON
      (load it with --policy scalekv-paper:plan=FILE).
      examples:
        scalekv calibrate --prompt "a red fox" --prompt "a castle at night" --budget 10% --out plan.json
`,
  eval: `  eval [--policies full,window:N,...] [--seeds 0,1,2] [--prompt P]... [--pn 0.06M] [--cfg X] [--json]
       [--weights CKPT --vae CKPT (--t5 DIR | --text FEATURES.safetensors) --preset P [--dtype bf16|f32]] [--backend B]
      Runs the same prompts and seeds with the full cache and each policy; reports PSNR, SSIM and differing
      pixels against the full-cache images, the KV history bytes and the sampling time (markdown, or --json).
      examples:
        scalekv eval --policies full,window:64,scalekv:10% --seeds 0,1 --prompt "a red fox"
`,
};

const MiB = (n: number) => (n / 2 ** 20).toFixed(1);

function dtypeArg(s: string | undefined, what: string, dflt: 'bf16' | 'f32'): 'bf16' | 'f32' {
  const v = s ?? dflt;
  if (v !== 'bf16' && v !== 'f32') fail('ERR_INVALID_ARG', `${what} must be bf16 or f32, got '${v}'`);
  return v;
}

function fraction(s: string): number {
  const m = /^(\d+(?:\.\d+)?)(%?)$/.exec(s.trim());
  if (!m) fail('ERR_INVALID_ARG', `--budget must be a percentage such as 10% (or a fraction such as 0.1), got '${s}'`);
  return m[2] ? Number(m[1]) / 100 : Number(m[1]);
}

// ---- plan

function planTable(p: MemoryPlan, deviceBytes?: number, fit?: number): string {
  const caps = p.capacities;
  const rows: [string, number, string][] = [
    ['weights', p.bytes.weights, `transformer ${MiB(p.weightDetail.transformer)} MiB (block Linears ${p.dtype}, rest f32)${p.decode ? ` + VAE decoder ${MiB(p.weightDetail.vae)} MiB` : ''}${p.textEncoder ? ` + T5 encoder ${MiB(p.weightDetail.textEncoder)} MiB (${p.textEncoder.layers} layers, d ${p.textEncoder.dModel}, ${p.textEncoder.kept ? 'kept loaded' : 'freed before sampling'})` : ''}`],
    ['kv (history)', p.bytes.kv, `paged arena: ${p.kvArena.poolPages} pages of ${p.kvArena.pageTokens} token${p.kvArena.pageTokens === 1 ? "" : "s"} x all heads per K/V pool = the most the ${caps.length} layers hold at once (${(p.kvArena.poolPages / p.rows) * p.kvArena.pageTokens} tokens a row; a layer at most ${Math.max(...caps)}, at least ${Math.min(...caps)}), K and V ${p.kvDtype === 'int8' || p.kvDtype === 'fp8' ? `${p.kvDtype} + a scale byte per (token, head)` : p.kvDtype}, ${p.rows} rows; page tables ${p.kvArena.tableBytes} bytes`],
    ['scratch', p.bytes.scratch, `current-scale K/V (${Math.max(...p.scaleTokens)} tokens, shared by all layers), RoPE positions, selection indices`],
    ['activations', p.bytes.activations, `${p.textEncoder ? 'T5 encoder passes, ' : ''}text context, block intermediates, logits and bits${p.decode ? `, VAE decode (${p.vaeBatch} image${p.vaeBatch === 1 ? '' : 's'} at once)` : ''} (${p.textTokens} text tokens a prompt)`],
    ['total', p.bytes.total, 'peak of the sum (the categories peak at different times)'],
  ];
  const lines = [
    `${p.config}, policy ${p.policy}, batch ${p.batch} (${p.rows} rows), ${p.scaleTokens.length} scales / ${p.scaleTokens.reduce((x, y) => x + y, 0)} tokens`,
    '',
    '| category | peak bytes | MiB | what |',
    '|---|---:|---:|---|',
    ...rows.map(([k, b, w]) => `| ${k} | ${b} | ${MiB(b)} | ${w} |`),
    '',
    ...(p.staticPlan
      ? [`reserved with the static memory plan (as the Pipeline runs): ${MiB(p.staticPlan.reservedPeak)} MiB = ${(p.staticPlan.reservedPeak / p.bytes.total).toFixed(3)} x the live peak; its arena ${MiB(p.staticPlan.arenaBytes)} MiB = ${(p.staticPlan.arenaBytes / p.staticPlan.livePeak).toFixed(3)} x the generation and decode's live peak, ${p.staticPlan.allocations} allocations (prompts of up to ${p.staticPlan.textTokens} tokens)`]
      : []),
    `kv held between scales (what the policy keeps), at most: ${MiB(p.kvArena.boundaryBytes)} MiB = ${(p.kvArena.boundaryPages / p.rows) * p.kvArena.pageTokens} tokens a row in whole pages, the tables included; the peak above adds, inside a scale, the layers changing roles (one that grows holds its new length before a later one that shrinks has attended and chosen what to keep)`,
    `reserved by the caching allocator alone, at its fullest: ${MiB(p.reservedPeak)} MiB (engine.trimCache() returns the cached part)`,
    `paper accounting (sec. 5.2): ${p.rows} rows x ${p.paperAccounting.tokensPerLayer} tokens x ${caps.length} layers x C x (K ${p.paperAccounting.kDtype} + V ${p.paperAccounting.vDtype}) = ${p.paperAccounting.mib.toFixed(1)} MiB`,
  ];
  if (deviceBytes !== undefined)
    lines.push(`largest batch in ${MiB(deviceBytes)} MiB: ${fit} (tensors only: the CUDA context and the kernels' small workspaces come on top)`);
  return lines.join('\n') + '\n';
}

export async function planCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      preset: { type: 'string', default: 'infinity-2b' },
      batch: { type: 'string', default: '1' },
      policy: { type: 'string', default: 'full' },
      pn: { type: 'string', default: '1M' },
      aspect: { type: 'string' },
      dtype: { type: 'string' },
      'kv-dtype': { type: 'string' },
      'k-dtype': { type: 'string' },
      'no-cfg': { type: 'boolean', default: false },
      'no-decode': { type: 'boolean', default: false },
      'vae-batch': { type: 'string' },
      'device-memory': { type: 'string' },
      'text-tokens': { type: 'string' },
      'no-text-encoder': { type: 'boolean', default: false },
      'keep-text-encoder': { type: 'boolean', default: false },
      'negative-prompts': { type: 'boolean', default: false },
      for: { type: 'string', default: 'cuda' },
      json: { type: 'boolean', default: false },
    },
  });
  if (values.for !== 'cuda' && values.for !== 'cpu') fail('ERR_INVALID_ARG', `--for must be cuda or cpu, got '${values.for}'`);
  const { config } = presetConfig(values.preset);
  const sched = scaleSchedule({ aspect: parseAspect(values.aspect), pn: values.pn as PixelBudget, patchify: config.patchify });
  const batch = parseNumber(values.batch, '--batch', 1);
  const spec = values.policy;
  const dtype = dtypeArg(values.dtype, '--dtype', 'bf16');
  const base = {
    config,
    cfg: !values['no-cfg'],
    decode: !values['no-decode'],
    vaeBatch: values['vae-batch'] === undefined ? undefined : parseNumber(values['vae-batch'], '--vae-batch', 1),
    schedule: sched.scales,
    policy: resolvePolicy(spec, { depth: config.depth, preset: values.preset === 'tiny' ? undefined : values.preset }),
    dtype,
    kvDtype: values['kv-dtype'] as KvDtype | undefined,
    paperKDtype: dtypeArg(values['k-dtype'], '--k-dtype', dtype),
    paperTokensPerLayer: paperTokensForSpec(spec, sched.tokensPerScale),
    textTokens: values['text-tokens'] === undefined ? undefined : parseNumber(values['text-tokens'], '--text-tokens', config.textMaxlen),
    // The tiny model's own T5; flan-t5-xl for the official presets (the planner's default).
    textEncoder: values['no-text-encoder'] ? (false as const) : values.preset === 'tiny' ? createTinyModel(0).t5.config : undefined,
    keepTextEncoder: values['keep-text-encoder'],
    negativePrompts: values['negative-prompts'],
    kvPageTokens: kvPageTokensFor(values.for),
  };
  const p = await planMemory({ ...base, batch });
  const device = values['device-memory'] !== undefined ? parseBytes(values['device-memory']) : undefined;
  const fit = device !== undefined ? await largestBatch(base, device) : undefined;
  if (values.json) process.stdout.write(JSON.stringify({ ...p, policy: spec, deviceMemory: device, largestBatch: fit }, null, 2) + '\n');
  else process.stdout.write(planTable({ ...p, policy: spec }, device, fit));
  return 0;
}

const DEFAULT_PROMPTS = ['a red fox in the snow', 'a lighthouse on a cliff at dawn', 'a bowl of fruit on a wooden table', 'a city street at night in the rain'];

// ---- calibrate

export async function calibrateCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      prompt: { type: 'string', multiple: true },
      weights: { type: 'string' },
      t5: { type: 'string' },
      text: { type: 'string' },
      preset: { type: 'string' },
      dtype: { type: 'string' },
      pn: { type: 'string' },
      aspect: { type: 'string' },
      budget: { type: 'string', default: '10%' },
      drafters: { type: 'string' },
      'top-k': { type: 'string' },
      'no-normalize-history': { type: 'boolean', default: false },
      scales: { type: 'string' },
      'max-queries': { type: 'string' },
      seed: { type: 'string' },
      cfg: { type: 'string' },
      out: { type: 'string' },
      backend: { type: 'string', default: 'auto' },
      json: { type: 'boolean', default: false },
    },
  });
  const { pipeline, request } = await loadFromFlags(values, { decode: false, defaultPrompts: DEFAULT_PROMPTS });
  try {
    const text = await textOf(pipeline, request);
    const pn = (values.pn ?? (values.weights ? '1M' : '0.06M')) as PixelBudget;
    const sched = scaleSchedule({ aspect: parseAspect(values.aspect), pn, patchify: pipeline.config.patchify });
    const started = performance.now();
    const r = await calibrate(pipeline.model, {
      prompts: splitTextFeatures(text),
      schedule: sched.scales,
      budget: fraction(values.budget),
      drafters: values.drafters === undefined ? undefined : parseNumber(values.drafters, '--drafters', 1),
      topK: values['top-k'] === undefined ? undefined : parseNumber(values['top-k'], '--top-k', 64),
      normalizeHistory: !values['no-normalize-history'],
      maxQueries: values['max-queries'] === undefined ? undefined : parseNumber(values['max-queries'], '--max-queries', 256),
      scales: values.scales?.split(',').map((s) => parseNumber(s, '--scales', 0)),
      cfg: parseNumber(values.cfg, '--cfg', 3),
      seed: parseNumber(values.seed, '--seed', 0),
      onProgress: (i, n) => process.stderr.write(`calibration prompt ${i + 1}/${n}\n`),
    });
    const ms = performance.now() - started;
    const json = budgetPlanToJson(r.plan);
    if (values.out) writeFileSync(values.out, json + '\n');
    if (values.json) {
      process.stdout.write(JSON.stringify({ ...r, plan: JSON.parse(json), ms, out: values.out ?? null }, (_, x) => (typeof x === 'number' && !Number.isFinite(x) ? null : x), 2) + '\n');
    } else {
      const K = r.stats.scales;
      const lines = [
        `ASI calibration: ${r.options.prompts} prompt(s), ${K} scales, K'=${r.options.topK}, history ${r.options.normalizeHistory ? 'normalised' : 'raw'}, budget ${r.tokensPerLayer} tokens/layer, ${(ms / 1000).toFixed(1)} s`,
        '',
        `| layer | ${r.rankedScales.map((k) => `ASI s${k} (Z)`).join(' | ')} |`,
        `|---|${r.rankedScales.map(() => '---:').join('|')}|`,
        ...r.stats.asi.map((row, l) => `| ${l} | ${r.rankedScales.map((k) => `${row[k].toFixed(4)} (${r.z[l][k].toFixed(2)})${r.drafters.some((d) => d.layer === l && d.scale === k) ? ' D' : ''}`).join(' | ')} |`),
        '',
        `drafters (N_d = ${r.drafters.length}): ${r.drafters.map((d) => `layer ${d.layer} @ scale ${d.scale}`).join(', ') || 'none'}`,
        values.out ? `wrote ${values.out}` : json,
      ];
      process.stdout.write(lines.join('\n') + '\n');
    }
    return 0;
  } finally {
    await pipeline.dispose();
  }
}

// ---- eval

interface EvalRow {
  policy: string;
  seed: number;
  psnr: number;
  ssim: number;
  differingPixels: number;
  totalPixels: number;
  maxAbsDiff: number;
  kvBytes: number;
  samplingMs: number;
}

export async function evalCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      policies: { type: 'string' },
      seeds: { type: 'string', default: '0,1,2' },
      prompt: { type: 'string', multiple: true },
      weights: { type: 'string' },
      vae: { type: 'string' },
      t5: { type: 'string' },
      text: { type: 'string' },
      preset: { type: 'string' },
      dtype: { type: 'string' },
      pn: { type: 'string' },
      aspect: { type: 'string' },
      cfg: { type: 'string' },
      backend: { type: 'string', default: 'auto' },
      json: { type: 'boolean', default: false },
    },
  });
  const { pipeline, request } = await loadFromFlags(values, { decode: true, defaultPrompts: DEFAULT_PROMPTS.slice(0, 2) });
  try {
    const text = await textOf(pipeline, request);
    const pn = (values.pn ?? (values.weights ? '1M' : '0.06M')) as PixelBudget;
    const sched = scaleSchedule({ aspect: parseAspect(values.aspect), pn, patchify: pipeline.config.patchify });
    const hist = sched.tokensPerScale.slice(0, -1).reduce((a, b) => a + b, 0);
    const b10 = Math.max(8, Math.round(hist / 10));
    const specs = (values.policies ?? (pn === '1M' ? 'full,scalekv:10%,window:650,streamingllm:4+646,snapkv:650,pyramidkv:650' : `full,window:${b10},streamingllm:4+${b10 - 4},snapkv:${b10},pyramidkv:${b10}`))
      .split(',')
      .reduce<string[]>((acc, s) => {
        // Options of a spec follow commas too ('snapkv:650,window=16'): glue 'key=value' parts to the previous spec.
        if (/^[a-z]+=/.test(s) && acc.length && !/^(scalekv|scalekv-paper):plan=/.test(s)) acc[acc.length - 1] += `,${s}`;
        else acc.push(s.trim());
        return acc;
      }, []);
    if (!specs.includes('full')) specs.unshift('full');
    // Below 1M the official reference mode has no budget rows (its plans cover scales 9-13 of the 1M schedule),
    // so the default table's ScaleKV row is paper mode with a plan calibrated on this very model (ASI, 10%).
    const labels = new Map<string, string>();
    if (values.policies === undefined && pn !== '1M') {
      const calibrated = await calibrate(pipeline.model, { prompts: splitTextFeatures(text), schedule: sched.scales, budget: 0.1, cfg: parseNumber(values.cfg, '--cfg', 3) });
      const planPath = join(mkdtempSync(join(tmpdir(), 'scalekv-eval-')), 'plan.json');
      writeFileSync(planPath, budgetPlanToJson(calibrated.plan) + '\n');
      const spec = `scalekv-paper:plan=${planPath},base=${b10},window=4`;
      specs.splice(1, 0, spec);
      labels.set(spec, `scalekv-paper (ASI-calibrated 10% plan, window 4)`);
    }
    const label = (spec: string) => labels.get(spec) ?? spec;
    const seeds = values.seeds.split(',').map((s) => parseNumber(s, '--seeds', 0));
    const cfg = parseNumber(values.cfg, '--cfg', 3);
    const rows: EvalRow[] = [];
    for (const seed of seeds) {
      let ref: Uint8Array | undefined;
      for (const spec of specs) {
        const r = await pipeline.generate({ textFeatures: text, aspect: values.aspect, pn, cfg, seed, kv: spec });
        const pixels = concatBytes(r.images.map((i) => i.data));
        if (spec === 'full') ref = pixels;
        const { height, width } = r.images[0];
        const f: Fidelity = fidelity({ a: ref as Uint8Array, b: pixels, height, width, count: r.images.length });
        rows.push({
          policy: spec, seed, psnr: f.psnr, ssim: f.ssim, differingPixels: f.diff.pixels, totalPixels: f.diff.totalPixels, maxAbsDiff: f.diff.maxAbs,
          kvBytes: r.kvBytes, samplingMs: r.timings.samplingMs,
        });
        process.stderr.write(`seed ${seed} ${label(spec)}: PSNR ${f.psnr.toFixed(2)} dB, SSIM ${f.ssim.toFixed(4)}\n`);
      }
    }
    const summary = specs.map((spec) => {
      const rs = rows.filter((r) => r.policy === spec);
      const mean = (k: keyof EvalRow) => rs.reduce((a, r) => a + (r[k] as number), 0) / rs.length;
      return { policy: label(spec), psnr: mean('psnr'), ssim: mean('ssim'), differingPixels: mean('differingPixels'), totalPixels: rs[0].totalPixels, kvBytes: Math.max(...rs.map((r) => r.kvBytes)), samplingMs: mean('samplingMs') };
    });
    if (values.json) {
      const fin = (_: string, x: unknown) => (typeof x === 'number' && !Number.isFinite(x) ? String(x) : x);
      process.stdout.write(JSON.stringify({ backend: pipeline.engine.backend, model: pipeline.config.name, pn, prompts: text.lens.length, seeds, summary, runs: rows }, fin, 2) + '\n');
    } else {
      const lines = [
        `${pipeline.config.name} on ${pipeline.engine.backend}, ${pn}, ${text.lens.length} prompt(s), seeds ${seeds.join(',')}; fidelity against the full-cache images (PSNR mean over images, data range [0,1])`,
        '',
        '| policy | PSNR (dB) | SSIM | differing pixels | KV history MiB | sampling ms |',
        '|---|---:|---:|---:|---:|---:|',
        ...summary.map((s) => `| ${s.policy} | ${Number.isFinite(s.psnr) ? s.psnr.toFixed(2) : 'inf'} | ${s.ssim.toFixed(4)} | ${Math.round(s.differingPixels)} / ${s.totalPixels} | ${MiB(s.kvBytes)} | ${s.samplingMs.toFixed(0)} |`),
      ];
      process.stdout.write(lines.join('\n') + '\n');
    }
    return 0;
  } finally {
    await pipeline.dispose();
  }
}

function concatBytes(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}
