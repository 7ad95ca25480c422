// `scalekv demo` and `scalekv generate`: a Pipeline from text features to PNG files. Results (paths, timings,
// memory) go to stdout; progress goes to stderr.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { fail } from '../errors.js';
import type { MemoryStats } from '../engine.js';
import type { TextFeatures } from '../model/infinity.js';
import type { PixelBudget } from '../model/schedule.js';
import type { Pipeline } from '../pipeline.js';
import { loadFromFlags, ModelFlags, parseNumber, progressLine } from './common.js';

export const GENERATION_USAGE = `  demo [--prompt P]... [--batch N] [--seed N] [--pn 0.06M|0.25M] [--aspect H/W] [--cfg X] [--tau X]
       [--policy SPEC] [--out DIR] [--backend B] [--json]
      The whole pipeline (text features -> sampling loop -> VAE -> PNG) on a built-in tiny random-weight model
      that the package creates deterministically: no download. N images per --prompt (default 1).
  generate --weights CKPT --vae CKPT --text FEATURES.safetensors [--preset infinity-2b|infinity-8b|...|tiny]
       [--batch N] [--seed N] [--cfg X] [--tau X] [--top-k K] [--top-p P] [--aspect H/W] [--pn 1M]
       [--policy SPEC] [--dtype bf16|f32] [--out DIR] [--backend B] [--json]
      Generates N images (default 1) per prompt of FEATURES (precomputed T5 encoder output: 'kv' [tokens, 2048] f32, the
      prompts' tokens concatenated, and 'lens' [prompts] int: tokens per prompt). CKPT: .pth, .safetensors or
      a sharded directory; the VAE under 'vae.' in a .pth is found by itself. --policy: the KV cache policy
      ('full' by default, 'scalekv:10%', 'window:650', ...: see plan).
`;

interface RunReport {
  backend: string;
  device: string;
  policy: string;
  images: string[];
  scales: number;
  tokens: number;
  timings: { loadMs: number; samplingMs: number; decodeMs: number; perScaleMs: number[] };
  memory: MemoryStats;
  kvBytes: number;
}

const MiB = (n: number) => `${(n / 2 ** 20).toFixed(2)} MiB`;

function printReport(r: RunReport, json: boolean): void {
  if (json) {
    process.stdout.write(JSON.stringify(r, null, 2) + '\n');
    return;
  }
  const lines = [
    `backend: ${r.backend} (${r.device})`,
    ...r.images.map((p) => `wrote ${p}`),
    `scales: ${r.scales}, tokens per image: ${r.tokens}, KV policy: ${r.policy}`,
    `time: load ${r.timings.loadMs.toFixed(0)} ms, sampling ${r.timings.samplingMs.toFixed(0)} ms, VAE decode ${r.timings.decodeMs.toFixed(0)} ms`,
    `per scale (ms): ${r.timings.perScaleMs.map((x) => x.toFixed(1)).join(' ')}`,
    `memory peak: ${MiB(r.memory.totalPeak)} (weights ${MiB(r.memory.peak.weights)}, kv ${MiB(r.memory.peak.kv)}, activations ${MiB(r.memory.peak.activations)}, scratch ${MiB(r.memory.peak.scratch)}); KV cache ${MiB(r.kvBytes)}`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

interface RunFlags extends ModelFlags {
  batch?: string;
  seed?: string;
  cfg?: string;
  tau?: string;
  'top-k'?: string;
  'top-p'?: string;
  aspect?: string;
  pn?: string;
  policy?: string;
  out: string;
  json: boolean;
}

// Loads the model once, runs one batch, writes `<prefix>-<seed>-<image>.png` files and prints the report.
async function run(values: RunFlags, prefix: string, defaultPrompts: readonly string[]): Promise<void> {
  const loadStart = performance.now();
  let loaded: { pipeline: Pipeline; text: TextFeatures } | undefined;
  try {
    loaded = await loadFromFlags(values, { decode: true, defaultPrompts });
    const { pipeline, text } = loaded;
    const loadMs = performance.now() - loadStart;
    const seed = parseNumber(values.seed, '--seed', 0);
    const policy = values.policy ?? 'full';
    const r = await pipeline.generate({
      textFeatures: text,
      batch: parseNumber(values.batch, '--batch', 1),
      seed,
      cfg: parseNumber(values.cfg, '--cfg', 3),
      tau: parseNumber(values.tau, '--tau', 1),
      topK: values['top-k'] === undefined ? undefined : parseNumber(values['top-k'], '--top-k', 900),
      topP: values['top-p'] === undefined ? undefined : parseNumber(values['top-p'], '--top-p', 0.97),
      aspect: values.aspect,
      pn: values.pn as PixelBudget,
      kv: policy,
      png: true,
      onProgress: progressLine(),
    });
    const outDir = resolve(values.out);
    mkdirSync(outDir, { recursive: true });
    const images = r.images.map((img, b) => {
      const path = join(outDir, `${prefix}-${seed}-${b}.png`);
      writeFileSync(path, img.png as Buffer);
      return path;
    });
    printReport(
      {
        backend: pipeline.engine.backend,
        device: pipeline.engine.device,
        policy,
        images,
        scales: r.schedule.length,
        tokens: r.schedule.reduce((n, [h, w]) => n + h * w, 0),
        timings: { loadMs, samplingMs: r.timings.samplingMs, decodeMs: r.timings.decodeMs, perScaleMs: r.timings.perScaleMs },
        memory: r.memory,
        kvBytes: r.kvBytes,
      },
      values.json,
    );
  } finally {
    await loaded?.pipeline.dispose();
  }
}

const runOptions = {
  batch: { type: 'string' },
  seed: { type: 'string' },
  cfg: { type: 'string' },
  tau: { type: 'string' },
  aspect: { type: 'string' },
  policy: { type: 'string' },
  backend: { type: 'string', default: 'auto' },
  json: { type: 'boolean', default: false },
} as const;

export async function demoCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: { ...runOptions, prompt: { type: 'string', multiple: true }, pn: { type: 'string', default: '0.06M' }, out: { type: 'string', default: 'scalekv-demo' } },
  });
  await run(values, 'demo', ['a lighthouse on a cliff at dawn']);
  return 0;
}

export async function generateCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      ...runOptions,
      weights: { type: 'string' },
      vae: { type: 'string' },
      text: { type: 'string' },
      preset: { type: 'string', default: 'infinity-2b' },
      'top-k': { type: 'string' },
      'top-p': { type: 'string' },
      pn: { type: 'string', default: '1M' },
      dtype: { type: 'string' },
      out: { type: 'string', default: 'scalekv-out' },
    },
  });
  if (!values.weights || !values.vae || !values.text) fail('ERR_INVALID_ARG', 'generate needs --weights, --vae and --text');
  await run(values, 'image', []);
  return 0;
}
