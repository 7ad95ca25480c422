// `scalekv demo`, `scalekv generate` and `scalekv encode-text`: a Pipeline from prompts (or T5 features) to PNG
// files, and the T5 encoder alone to a features file. Results (paths, timings,
// memory) go to stdout; progress goes to stderr.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { fail } from '../errors.js';
import type { MemoryStats } from '../engine.js';
import type { KvDtype } from '../model/generate.js';
import type { PixelBudget } from '../model/schedule.js';
import { Pipeline } from '../pipeline.js';
import { encodeSafetensors } from '../safetensors.js';
import { loadTextEncoder } from '../text/t5-encoder.js';
import { createEngine, BackendChoice } from '../engine.js';
import { loadFromFlags, ModelFlags, parseNumber, progressLine } from './common.js';

export const GENERATION_USAGE: Record<string, string> = {
  demo: `  demo [--prompt P]... [--negative-prompt N]... [--batch N] [--seed N] [--pn 0.06M|0.25M] [--aspect H/W]
       [--cfg X] [--tau X] [--policy SPEC] [--kv-dtype int8|fp8] [--out DIR] [--backend B] [--json]
      The whole pipeline (tokenizer -> T5 encoder -> sampling loop -> VAE -> PNG) on a built-in tiny random-weight
      model, its tiny T5 and the package's own small tokenizer, all created deterministically: no download. N images
      per --prompt (default 1).
      examples:
        scalekv demo --prompt "a red fox"
        scalekv demo --prompt "a red fox" --prompt "a blue lake" --negative-prompt "blurry" --seed 7 --out foxes
`,
  generate: `  generate --weights CKPT --vae CKPT (--t5 DIR --prompt P... [--negative-prompt N]... | --text FEATURES.safetensors
       [--negative-text FEATURES.safetensors]) [--preset infinity-2b|infinity-8b|...|tiny] [--batch N] [--seed N]
       [--cfg X] [--tau X] [--top-k K] [--top-p P] [--aspect H/W] [--pn 1M] [--policy SPEC] [--dtype bf16|f32]
       [--kv-dtype int8|fp8] [--out DIR] [--backend B] [--json]
      Generates N images (default 1) per prompt. Prompts as text need --t5, a Hugging Face T5 directory
      (google/flan-t5-xl: config.json, the weights, tokenizer.json; only its encoder is read): the tokenizer and
      encoder run on the same engine, which frees the encoder before sampling. --negative-prompt: one for every
      prompt, or one per --prompt. Or give precomputed T5 features (encode-text writes them: 'kv' [tokens, 2048]
      f32, the prompts' tokens concatenated, and 'lens' [prompts] int). CKPT: .pth, .safetensors or a sharded
      directory; the VAE under 'vae.' in a .pth is found by itself. --policy: the KV cache policy ('full' by
      default, 'scalekv:10%', 'window:650', ...: see plan); --kv-dtype: K/V stored as 8-bit codes with a scale per
      (token, head), about half the bytes of bf16 (default: the model's dtype).
      examples:
        scalekv generate --weights infinity_2b_reg.pth --vae infinity_vae_d32_reg.pth --t5 flan-t5-xl \\
          --prompt "a lighthouse on a cliff at dawn" --policy scalekv:10% --out out
        scalekv generate --weights infinity_2b_reg.pth --vae infinity_vae_d32_reg.pth --text feats.safetensors
`,
  'encode-text': `  encode-text --t5 DIR --prompt P... --out FEATURES.safetensors [--dtype bf16|f32] [--backend B] [--json]
      Runs the flan-t5 tokenizer and T5 encoder of DIR on the prompts and writes their features ('kv' [tokens,
      d_model] f32, prompts concatenated; 'lens' [prompts] int32), the file generate --text reads. Reports the
      token counts and which prompts were cut at 511 pieces.
      examples:
        scalekv encode-text --t5 flan-t5-xl --prompt "a red fox" --prompt "a blue lake" --out feats.safetensors
`,
};

interface RunReport {
  backend: string;
  device: string;
  policy: string;
  images: string[];
  scales: number;
  tokens: number;
  timings: { loadMs: number; textMs: number; samplingMs: number; decodeMs: number; perScaleMs: number[] };
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
    `time: load ${r.timings.loadMs.toFixed(0)} ms, text encoder ${r.timings.textMs.toFixed(0)} ms, sampling ${r.timings.samplingMs.toFixed(0)} ms, VAE decode ${r.timings.decodeMs.toFixed(0)} ms`,
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
  'kv-dtype'?: string;
  out: string;
  json: boolean;
}

// Loads the model once, runs one batch, writes `<prefix>-<seed>-<image>.png` files and prints the report.
async function run(values: RunFlags, prefix: string, defaultPrompts: readonly string[]): Promise<void> {
  const loadStart = performance.now();
  let pipeline: Pipeline | undefined;
  try {
    const loaded = await loadFromFlags(values, { decode: true, defaultPrompts });
    pipeline = loaded.pipeline;
    const loadMs = performance.now() - loadStart;
    const seed = parseNumber(values.seed, '--seed', 0);
    const policy = values.policy ?? 'full';
    const r = await pipeline.generate({
      ...loaded.request,
      batch: parseNumber(values.batch, '--batch', 1),
      seed,
      cfg: parseNumber(values.cfg, '--cfg', 3),
      tau: parseNumber(values.tau, '--tau', 1),
      topK: values['top-k'] === undefined ? undefined : parseNumber(values['top-k'], '--top-k', 900),
      topP: values['top-p'] === undefined ? undefined : parseNumber(values['top-p'], '--top-p', 0.97),
      aspect: values.aspect,
      pn: values.pn as PixelBudget,
      kv: policy,
      kvDtype: values['kv-dtype'] as KvDtype | undefined,
      png: true,
      onProgress: progressLine(),
    });
    for (const [which, flags] of [['prompt', r.truncated], ['negative prompt', r.negativeTruncated]] as const) {
      const cut = (flags ?? []).flatMap((t, i) => (t ? [i] : []));
      if (cut.length) process.stderr.write(`note: ${which}(s) ${cut.join(', ')} exceed 511 T5 pieces and were truncated, as Infinity does\n`);
    }
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
        timings: { loadMs, textMs: r.timings.textMs, samplingMs: r.timings.samplingMs, decodeMs: r.timings.decodeMs, perScaleMs: r.timings.perScaleMs },
        memory: r.memory,
        kvBytes: r.kvBytes,
      },
      values.json,
    );
  } finally {
    await pipeline?.dispose();
  }
}

const runOptions = {
  batch: { type: 'string' },
  seed: { type: 'string' },
  cfg: { type: 'string' },
  tau: { type: 'string' },
  aspect: { type: 'string' },
  policy: { type: 'string' },
  'kv-dtype': { type: 'string' },
  backend: { type: 'string', default: 'auto' },
  json: { type: 'boolean', default: false },
  prompt: { type: 'string', multiple: true },
  'negative-prompt': { type: 'string', multiple: true },
} as const;

export async function demoCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: { ...runOptions, pn: { type: 'string', default: '0.06M' }, out: { type: 'string', default: 'scalekv-demo' } },
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
      'negative-text': { type: 'string' },
      t5: { type: 'string' },
      preset: { type: 'string', default: 'infinity-2b' },
      'top-k': { type: 'string' },
      'top-p': { type: 'string' },
      pn: { type: 'string', default: '1M' },
      dtype: { type: 'string' },
      out: { type: 'string', default: 'scalekv-out' },
    },
  });
  if (!values.weights || !values.vae || (!values.text && !values.t5))
    fail('ERR_INVALID_ARG', 'generate needs --weights, --vae and either --t5 DIR with --prompt texts or --text FEATURES.safetensors');
  await run(values, 'image', []);
  return 0;
}

export async function encodeTextCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      t5: { type: 'string' },
      prompt: { type: 'string', multiple: true },
      out: { type: 'string' },
      dtype: { type: 'string' },
      backend: { type: 'string', default: 'auto' },
      json: { type: 'boolean', default: false },
    },
  });
  if (!values.t5 || !values.prompt?.length || !values.out) fail('ERR_INVALID_ARG', 'encode-text needs --t5 DIR, at least one --prompt and --out FILE');
  if (values.dtype !== undefined && values.dtype !== 'bf16' && values.dtype !== 'f32') fail('ERR_INVALID_ARG', `--dtype must be bf16 or f32, got '${values.dtype}'`);
  const engine = await createEngine({ backend: values.backend as BackendChoice });
  try {
    const started = performance.now();
    const encoder = await loadTextEncoder(values.t5, engine, { dtype: values.dtype as 'bf16' | 'f32' | undefined });
    let features;
    try {
      features = await encoder.encode(values.prompt);
    } finally {
      encoder.dispose();
    }
    const d = features.kv.length / features.lens.reduce((a, b) => a + b, 0);
    const out = resolve(values.out);
    writeFileSync(out, encodeSafetensors([
      { name: 'kv', shape: [features.kv.length / d, d], data: features.kv },
      { name: 'lens', shape: [features.lens.length], data: Int32Array.from(features.lens) },
    ], { format: 'pt', producer: 'scalekv encode-text' }));
    const report = { out, backend: engine.backend, prompts: features.lens.length, lens: features.lens, truncated: features.truncated, channels: d, ms: performance.now() - started };
    if (values.json) process.stdout.write(JSON.stringify(report, null, 2) + '\n');
    else {
      process.stdout.write(`wrote ${out}: ${report.prompts} prompt(s), tokens ${report.lens.join(', ')}, ${d} channels (${engine.backend}, ${report.ms.toFixed(0)} ms)\n`);
      const cut = features.truncated.flatMap((t, i) => (t ? [i] : []));
      if (cut.length) process.stdout.write(`truncated at 511 pieces: prompt(s) ${cut.join(', ')}\n`);
    }
  } finally {
    engine.dispose();
  }
  return 0;
}
