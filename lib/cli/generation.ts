// `scalekv demo` and `scalekv generate`: the whole pipeline from text features to PNG files. Results (paths,
// timings, memory) go to stdout; progress goes to stderr.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { openCheckpoint } from '../checkpoint/index.js';
import { BackendChoice, createEngine, Engine, MemoryStats } from '../engine.js';
import { fail } from '../errors.js';
import { encodePng } from '../image/png.js';
import { generate, decodeImage } from '../model/generate.js';
import { InfinityModel, TextFeatures } from '../model/infinity.js';
import { preset, PRESET_NAMES, PresetName } from '../model/presets.js';
import { PixelBudget, scaleSchedule } from '../model/schedule.js';
import { createTinyModel, TINY_VAE, tinyConfig } from '../model/tiny.js';
import { VaeDecoder, VaeDecoderConfig } from '../model/vae.js';
import { concatText, loadTextFeatures, parseAspect, readVaeDecoder } from './common.js';

export const GENERATION_USAGE = `  demo [--prompt P]... [--batch N] [--seed N] [--pn 0.06M|0.25M] [--aspect H/W] [--cfg X] [--tau X]
       [--out DIR] [--backend B] [--json]
      The whole pipeline (text features -> sampling loop -> VAE -> PNG) on a built-in tiny random-weight model
      that the package creates deterministically: no download. N images per --prompt (default 1).
  generate --weights CKPT --vae CKPT --text FEATURES.safetensors [--preset infinity-2b|infinity-8b|...|tiny]
       [--batch N] [--seed N] [--cfg X] [--tau X] [--top-k K] [--top-p P] [--aspect H/W] [--pn 1M]
       [--dtype bf16|f32] [--out DIR] [--backend B] [--json]
      Generates N images (default 1) per prompt of FEATURES (precomputed T5 encoder output: 'kv' [tokens, 2048] f32, the
      prompts' tokens concatenated, and 'lens' [prompts] int: tokens per prompt). CKPT: .pth, .safetensors or
      a sharded directory; the VAE under 'vae.' in a .pth is found by itself.
`;

interface RunReport {
  backend: string;
  device: string;
  images: string[];
  scales: number;
  tokens: number;
  timings: { loadMs: number; samplingMs: number; decodeMs: number; perScaleMs: number[] };
  memory: MemoryStats;
  kvBytes: number;
}

function parseNumber(s: string | undefined, what: string, dflt: number): number {
  if (s === undefined) return dflt;
  const v = Number(s);
  if (!Number.isFinite(v)) fail('ERR_INVALID_ARG', `${what} must be a number, got '${s}'`);
  return v;
}

function progressBar(label: string): (scale: number, total: number) => void {
  const tty = process.stderr.isTTY;
  return (scale, total) => {
    const done = scale + 1;
    if (tty) {
      const width = 24;
      const filled = Math.round((done / total) * width);
      process.stderr.write(`\r${label} [${'#'.repeat(filled)}${' '.repeat(width - filled)}] scale ${done}/${total}`);
      if (done === total) process.stderr.write('\n');
    } else {
      process.stderr.write(`${label}: scale ${done}/${total}\n`);
    }
  };
}

/** Each prompt `batch` times in a row: images b·batch .. b·batch+batch−1 share prompt b; every image samples its own bits. */
function repeatPrompts(text: TextFeatures, batch: number): TextFeatures {
  if (!Number.isInteger(batch) || batch < 1) fail('ERR_INVALID_ARG', `--batch must be a positive integer, got ${batch}`);
  if (batch === 1) return text;
  const channels = text.kv.length / text.lens.reduce((a, b) => a + b, 0);
  const parts: TextFeatures[] = [];
  let row = 0;
  for (const len of text.lens) {
    const kv = text.kv.subarray(row * channels, (row + len) * channels);
    for (let i = 0; i < batch; i++) parts.push({ kv, lens: [len] });
    row += len;
  }
  return concatText(parts);
}

async function runPipeline(
  engine: Engine,
  model: InfinityModel,
  vae: VaeDecoder,
  o: { text: TextFeatures; schedule: [number, number][]; cfg: number; tau: number; topK?: number; topP?: number; seed: number; outDir: string; prefix: string; loadMs: number },
): Promise<RunReport> {
  const started = performance.now();
  const result = await generate(model, {
    text: o.text,
    schedule: o.schedule,
    cfg: o.cfg,
    tau: o.tau,
    topK: o.topK,
    topP: o.topP,
    seed: o.seed,
    onProgress: progressBar('sampling'),
  });
  const samplingMs = performance.now() - started;
  const decodeStart = performance.now();
  let decoded;
  try {
    decoded = await decodeImage(vae, result.summedCodes);
  } finally {
    result.summedCodes.dispose();
  }
  const decodeMs = performance.now() - decodeStart;
  const [B, H, W] = decoded.shape;
  mkdirSync(o.outDir, { recursive: true });
  const images: string[] = [];
  for (let b = 0; b < B; b++) {
    const path = join(o.outDir, `${o.prefix}-${o.seed}-${b}.png`);
    writeFileSync(path, encodePng({ width: W, height: H, channels: 3, data: decoded.pixels.subarray(b * H * W * 3, (b + 1) * H * W * 3) }));
    images.push(path);
  }
  return {
    backend: engine.backend,
    device: engine.device,
    images,
    scales: o.schedule.length,
    tokens: o.schedule.reduce((n, [h, w]) => n + h * w, 0),
    timings: { loadMs: o.loadMs, samplingMs, decodeMs, perScaleMs: result.timings.map((t) => t.ms) },
    memory: engine.memory(),
    kvBytes: result.kvBytes,
  };
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
    `scales: ${r.scales}, tokens per image: ${r.tokens}`,
    `time: load ${r.timings.loadMs.toFixed(0)} ms, sampling ${r.timings.samplingMs.toFixed(0)} ms, VAE decode ${r.timings.decodeMs.toFixed(0)} ms`,
    `per scale (ms): ${r.timings.perScaleMs.map((x) => x.toFixed(1)).join(' ')}`,
    `memory peak: ${MiB(r.memory.totalPeak)} (weights ${MiB(r.memory.peak.weights)}, kv ${MiB(r.memory.peak.kv)}, activations ${MiB(r.memory.peak.activations)}, scratch ${MiB(r.memory.peak.scratch)}); KV cache ${MiB(r.kvBytes)}`,
  ];
  process.stdout.write(lines.join('\n') + '\n');
}

type PipelineOptions = Omit<Parameters<typeof runPipeline>[3], 'loadMs'>;

// One engine, the model and the VAE loaded onto it, one run, the report; everything freed whatever happens.
async function withPipeline(
  backend: BackendChoice,
  loadModel: (engine: Engine) => Promise<InfinityModel>,
  readVae: () => Promise<Map<string, Float32Array>>,
  vaeConfig: VaeDecoderConfig,
  o: PipelineOptions,
  json: boolean,
): Promise<void> {
  const engine = await createEngine({ backend });
  try {
    const loadStart = performance.now();
    const model = await loadModel(engine);
    let vae: VaeDecoder | undefined;
    try {
      vae = await VaeDecoder.load(engine, await readVae(), vaeConfig);
      printReport(await runPipeline(engine, model, vae, { ...o, loadMs: performance.now() - loadStart }), json);
    } finally {
      model.dispose();
      vae?.dispose();
    }
  } finally {
    engine.dispose();
  }
}

export async function demoCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      prompt: { type: 'string', multiple: true },
      batch: { type: 'string' },
      seed: { type: 'string' },
      pn: { type: 'string', default: '0.06M' },
      aspect: { type: 'string' },
      cfg: { type: 'string' },
      tau: { type: 'string' },
      out: { type: 'string', default: 'scalekv-demo' },
      backend: { type: 'string', default: 'auto' },
      json: { type: 'boolean', default: false },
    },
  });
  const seed = parseNumber(values.seed, '--seed', 0);
  const tiny = createTinyModel(seed);
  const prompts = values.prompt?.length ? values.prompt : ['a lighthouse on a cliff at dawn'];
  const schedule = scaleSchedule({ aspect: parseAspect(values.aspect), pn: values.pn as PixelBudget });
  await withPipeline(
    values.backend as BackendChoice,
    (engine) => InfinityModel.load(engine, tiny.weights, tiny.config),
    async () => readVaeDecoder(tiny.vae),
    tiny.vaeConfig,
    {
      text: repeatPrompts(concatText(prompts.map((p) => tiny.encodeText(p))), parseNumber(values.batch, '--batch', 1)),
      schedule: schedule.scales,
      cfg: parseNumber(values.cfg, '--cfg', 3),
      tau: parseNumber(values.tau, '--tau', 1),
      seed,
      outDir: resolve(values.out),
      prefix: 'demo',
    },
    values.json,
  );
  return 0;
}

export async function generateCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      weights: { type: 'string' },
      vae: { type: 'string' },
      text: { type: 'string' },
      preset: { type: 'string', default: 'infinity-2b' },
      batch: { type: 'string' },
      seed: { type: 'string' },
      cfg: { type: 'string' },
      tau: { type: 'string' },
      'top-k': { type: 'string' },
      'top-p': { type: 'string' },
      aspect: { type: 'string' },
      pn: { type: 'string', default: '1M' },
      dtype: { type: 'string' },
      out: { type: 'string', default: 'scalekv-out' },
      backend: { type: 'string', default: 'auto' },
      json: { type: 'boolean', default: false },
    },
  });
  if (!values.weights || !values.vae || !values.text) fail('ERR_INVALID_ARG', 'generate needs --weights, --vae and --text');
  // 'tiny' is the demo model's configuration, for checkpoints written from it.
  if (values.preset !== 'tiny' && !PRESET_NAMES.includes(values.preset as PresetName))
    fail('ERR_INVALID_ARG', `unknown preset '${values.preset}' (${[...PRESET_NAMES, 'tiny'].join(', ')})`);
  if (values.dtype !== undefined && values.dtype !== 'bf16' && values.dtype !== 'f32') fail('ERR_INVALID_ARG', `--dtype must be bf16 or f32`);
  const config = values.preset === 'tiny' ? { ...tinyConfig(), vae: { ...TINY_VAE, chMult: [...TINY_VAE.chMult] } } : preset(values.preset as PresetName);
  const schedule = scaleSchedule({ aspect: parseAspect(values.aspect), pn: values.pn as PixelBudget, patchify: config.patchify });
  const text = repeatPrompts(loadTextFeatures(values.text, config.textChannels), parseNumber(values.batch, '--batch', 1));
  const weights = openCheckpoint(values.weights);
  const vaeFile = openCheckpoint(values.vae);
  const vaeSource = vaeFile.names.some((n) => n.startsWith('vae.')) ? openCheckpoint(values.vae, { prefix: 'vae.' }) : vaeFile;
  try {
    await withPipeline(
      values.backend as BackendChoice,
      (engine) => InfinityModel.load(engine, weights, config, { dtype: values.dtype as 'bf16' | 'f32' | undefined }),
      () => readVaeDecoder(vaeSource),
      config.vae,
      {
        text,
        schedule: schedule.scales,
        cfg: parseNumber(values.cfg, '--cfg', 3),
        tau: parseNumber(values.tau, '--tau', 1),
        topK: values['top-k'] === undefined ? undefined : parseNumber(values['top-k'], '--top-k', 900),
        topP: values['top-p'] === undefined ? undefined : parseNumber(values['top-p'], '--top-p', 0.97),
        seed: parseNumber(values.seed, '--seed', 0),
        outDir: resolve(values.out),
        prefix: 'image',
      },
      values.json,
    );
  } finally {
    weights.close();
    vaeFile.close();
    if (vaeSource !== vaeFile) vaeSource.close();
  }
  return 0;
}
