// Interleaved A/B benchmark of two checkouts: this tree and a baseline (another checkout of the package with its
// own native addon built). `npm run bench:interleaved -- --baseline DIR [--cases tiny,golden1m,golden1m-scalekv]
// [--rounds N] [--images N] [--backend cpu] [--current DIR] [--no-profile]`.
//
// Each measurement is a child process (tsx) that imports the library from the checkout it is given
// (`<checkout>/lib/...`, so both trees run the same case code), builds one case, renders a warm-up image, times a
// few images and prints one JSON line. Children run alternately, current then baseline (baseline first in odd rounds: ABBA), for every case in every
// round, so slow drift on a shared machine hits both trees alike. The parent prints, per case, the median ms per
// image of each tree (and every run) and the speed-up baseline / current; then, from the current tree only, the op
// families of one profiled image per case (bench/e2e.ts's FAMILIES, the engine's profiler).
//
// Cases (per image = the sampling loop + the VAE decode to pixels; text features are prepared before timing):
//   tiny              what bench/e2e.ts times: createTinyModel(0), 0.06M 1:1 schedule (7 scales, 256x256), cfg 3,
//                     tau 1, the prompt encoded by the tiny T5 beforehand.
//   golden1m          the shared golden model (forward_fullcache/weights.safetensors + vae.safetensors, depth 4,
//                     C 128, d32 VAE) on forward_scalekv's 13-scale 1M 1:1 schedule (10521 tokens, 1024x1024),
//                     its cfg/tau lists, B = 1 with its text inputs (text/kv_compact, text/lens), full KV cache.
//   golden1m-scalekv  the same with the ScaleKV policy ('reference' mode) and forward_scalekv's settings.
// Bits are sampled (seeded, top-k 900 / top-p 0.97 defaults), not teacher-forced. Weights in the library's default
// dtype for the backend (f32 on the CPU). Golden cases are skipped, with a notice, when the fixtures are absent
// ($SCALEKV_GOLDEN, else ../shared/golden beside the current tree).
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, statSync } from 'node:fs';
import { availableParallelism, cpus } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import type * as EngineModule from '../lib/engine.js';
import type * as GenerateModule from '../lib/model/generate.js';
import type * as InfinityModule from '../lib/model/infinity.js';
import type * as VaeModule from '../lib/model/vae.js';
import type * as ScheduleModule from '../lib/model/schedule.js';
import type * as TinyModule from '../lib/model/tiny.js';
import type * as T5Module from '../lib/text/t5-encoder.js';
import type * as ConfigModule from '../lib/model/config.js';
import type * as CheckpointModule from '../lib/checkpoint/index.js';
import type * as SafetensorsModule from '../lib/safetensors.js';
import type * as ScaleKvModule from '../lib/scalekv/policy.js';
import type * as NativeModule from '../lib/native.js';
import type { KvPolicy } from '../lib/kv/policy.js';
import { loadTinyCase, TINY_CFG, TINY_TAU } from './tiny-case.js';

const CASES = ['tiny', 'golden1m', 'golden1m-scalekv'] as const;
type CaseName = (typeof CASES)[number];
/** Timed images per child (after one warm-up image). */
const DEFAULT_IMAGES: Record<CaseName, number> = { tiny: 5, golden1m: 1, 'golden1m-scalekv': 1 };

const here = dirname(fileURLToPath(import.meta.url));
const thisTree = resolve(here, '..');

interface FamilyRow {
  family: string;
  ms: number;
  ops: string[];
}

/** What a child prints: one JSON line. */
interface ChildResult {
  case: CaseName;
  checkout: string;
  backend: string;
  device: string;
  cpuLibrary?: string | null;
  /** The addon this child loaded, and its modification time (a rebuild during the run shows as a change). */
  addon: { path: string; mtime: string };
  setup: string;
  loadMs: number;
  warmupMs: number;
  /** Wall ms of each timed image. */
  imagesMs: number[];
  msPerImage: number;
  profile?: { wallMs: number; families: FamilyRow[] };
}

function goldenRoot(): string | undefined {
  const candidates = [process.env.SCALEKV_GOLDEN, join(thisTree, '..', 'shared', 'golden')].filter(Boolean) as string[];
  return candidates.find((c) => existsSync(join(c, 'forward_scalekv', 'manifest.json')));
}

/** Why the golden cases cannot run here, or undefined when they can. */
function goldenMissing(): string | undefined {
  const root = goldenRoot();
  if (!root) return 'no golden fixtures ($SCALEKV_GOLDEN unset and no ../shared/golden/forward_scalekv/manifest.json)';
  for (const f of ['forward_fullcache/weights.safetensors', 'forward_fullcache/vae.safetensors', 'forward_scalekv/io.safetensors'])
    if (!existsSync(join(root, f))) return `golden fixture file ${join(root, f)} is absent`;
  return undefined;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

// --- child: one case on one checkout -------------------------------------------------------------------------------

interface CaseRun {
  setup: string;
  image(seed: number): Promise<void>;
  dispose(): void;
}

async function child(checkout: string, name: CaseName, images: number, profile: boolean, backend: string): Promise<ChildResult> {
  const lib = async <T>(path: string): Promise<T> => (await import(pathToFileURL(join(checkout, 'lib', path)).href)) as T;
  const { createEngine, backendInfo } = await lib<typeof EngineModule>('engine.js');
  const { generate, decodeImage } = await lib<typeof GenerateModule>('model/generate.js');
  const { InfinityModel } = await lib<typeof InfinityModule>('model/infinity.js');
  const { VaeDecoder, vaeDecoderConfigFromManifest } = await lib<typeof VaeModule>('model/vae.js');
  const { loadNative } = await lib<typeof NativeModule>('native.js');
  const engine = await createEngine({ backend: backend as EngineModule.BackendChoice });
  const addonPath = loadNative().path;
  const addon = { path: addonPath, mtime: statSync(addonPath).mtime.toISOString() };
  let cpuLibrary: string | null | undefined;
  try {
    cpuLibrary = (backendInfo() as Partial<EngineModule.BackendInfo>).cpu?.library; // absent in older trees
  } catch {
    cpuLibrary = undefined;
  }
  // One image: the sampling loop, then the VAE decode to pixels.
  type GenerateOptions = Omit<Parameters<typeof generate>[1], 'seed'>;
  const render = (model: InfinityModule.InfinityModel, vae: VaeModule.VaeDecoder, options: () => GenerateOptions) => async (seed: number) => {
    const r = await generate(model, { ...options(), seed });
    try {
      await decodeImage(vae, r.summedCodes);
    } finally {
      r.summedCodes.dispose();
    }
  };
  let run: CaseRun | undefined;
  try {
    const t0 = performance.now();
    if (name === 'tiny') {
      const { scaleSchedule } = await lib<typeof ScheduleModule>('model/schedule.js');
      const { createTinyModel } = await lib<typeof TinyModule>('model/tiny.js');
      const { T5TextEncoder } = await lib<typeof T5Module>('text/t5-encoder.js');
      // bench/e2e.ts's case, on this checkout's lib.
      const { config, model, vae, schedule, text } = await loadTinyCase({ InfinityModel, VaeDecoder, scaleSchedule, createTinyModel, T5TextEncoder }, engine);
      run = {
        setup: `tiny model (depth ${config.depth}, C ${config.embedDim}), 0.06M 1:1 (${schedule.length} scales), cfg ${TINY_CFG}, tau ${TINY_TAU}, B 1, ${model.dtype}`,
        image: render(model, vae, () => ({ text, schedule, cfg: TINY_CFG, tau: TINY_TAU })),
        dispose() {
          model.dispose();
          vae.dispose();
        },
      };
    } else {
      const { configFromManifest } = await lib<typeof ConfigModule>('model/config.js');
      const { openCheckpoint } = await lib<typeof CheckpointModule>('checkpoint/index.js');
      const { SafetensorsFile } = await lib<typeof SafetensorsModule>('safetensors.js');
      const { ScaleKvPolicy } = await lib<typeof ScaleKvModule>('scalekv/policy.js');
      const root = goldenRoot() as string;
      const manifest = JSON.parse(readFileSync(join(root, 'forward_scalekv', 'manifest.json'), 'utf8')) as {
        model: Record<string, unknown>;
        vae: Record<string, unknown>;
        scale_schedule: number[][];
        cfg_list: number[];
        tau_list: number[];
        scalekv: { window_size: number; base_capacity: number; kernel_size: number; pooling: 'maxpool' | 'avgpool'; cache_sizes: (number[] | null)[] };
      };
      const config = configFromManifest(manifest.model);
      const ckpt = openCheckpoint(join(root, 'forward_fullcache', 'weights.safetensors'));
      const model = await InfinityModel.load(engine, ckpt, config).finally(() => ckpt.close());
      const vaeFile = new SafetensorsFile(join(root, 'forward_fullcache', 'vae.safetensors'));
      const vae = await VaeDecoder.load(engine, vaeFile, vaeDecoderConfigFromManifest(manifest.vae)).finally(() => vaeFile.close());
      const io = new SafetensorsFile(join(root, 'forward_scalekv', 'io.safetensors'));
      const text = { kv: io.f32('text/kv_compact'), lens: [...io.i32('text/lens')] };
      io.close();
      const schedule = manifest.scale_schedule.map((s) => [s[s.length - 2], s[s.length - 1]] as [number, number]);
      const sk = manifest.scalekv;
      const policy = (): KvPolicy | undefined =>
        name === 'golden1m-scalekv'
          ? new ScaleKvPolicy({ mode: 'reference', cacheSizes: sk.cache_sizes, baseCapacity: sk.base_capacity, windowSize: sk.window_size, kernelSize: sk.kernel_size, pooling: sk.pooling })
          : undefined;
      const [h, w] = schedule[schedule.length - 1];
      const tokens = schedule.reduce((a, [sh, sw]) => a + sh * sw, 0);
      const uniq = (xs: number[]) => [...new Set(xs)].join('/');
      run = {
        setup:
          `golden model (depth ${config.depth}, C ${config.embedDim}), 1M 1:1 (${schedule.length} scales, ${tokens} tokens, latent ${h}x${w}), ` +
          `cfg ${uniq(manifest.cfg_list)}, tau ${uniq(manifest.tau_list)}, B ${text.lens.length} (fixture text, ${text.lens[0]} tokens), ${model.dtype}, ` +
          (name === 'golden1m-scalekv' ? `ScaleKV reference window ${sk.window_size} base ${sk.base_capacity} kernel ${sk.kernel_size} ${sk.pooling}` : 'full KV cache'),
        image: render(model, vae, () => ({ text, schedule, cfg: manifest.cfg_list, tau: manifest.tau_list, kvPolicy: policy() })),
        dispose() {
          model.dispose();
          vae.dispose();
        },
      };
    }
    const loadMs = performance.now() - t0;
    const w0 = performance.now();
    await run.image(0);
    const warmupMs = performance.now() - w0;
    const imagesMs: number[] = [];
    for (let i = 0; i < images; i++) {
      const s = performance.now();
      await run.image(1 + i);
      imagesMs.push(performance.now() - s);
    }
    const result: ChildResult = {
      case: name, checkout, backend: engine.backend, device: engine.device, cpuLibrary, addon, setup: run.setup, loadMs, warmupMs, imagesMs,
      msPerImage: imagesMs.reduce((a, b) => a + b, 0) / imagesMs.length,
    };
    if (profile) {
      // bench/e2e.ts's approach: every op's device time between the profiler's marks, grouped by FAMILIES.
      // The checkout's own bench/e2e.ts (this file's sibling when the checkout is this tree), so one lib is loaded.
      const { opFamilies } = (await import(pathToFileURL(join(checkout, 'bench', 'e2e.js')).href)) as typeof import('./e2e.js');
      engine.startProfiling();
      const s = performance.now();
      await run.image(12345);
      const entries = await engine.stopProfiling();
      result.profile = { wallMs: performance.now() - s, families: opFamilies(entries) };
    }
    return result;
  } finally {
    run?.dispose();
    engine.dispose();
  }
}

// --- parent: spawn the children alternately and print the tables ----------------------------------------------------

function spawnChild(checkout: string, name: CaseName, images: number, profile: boolean, backend: string): Promise<ChildResult> {
  const tsx = import.meta.resolve('tsx');
  const args = ['--import', tsx, fileURLToPath(import.meta.url), '--child', '--checkout', checkout, '--case', name, '--images', String(images), '--backend', backend];
  if (profile) args.push('--profile');
  // Each tree loads its own addon: an override would make both children load the same one.
  const env = { ...process.env };
  delete env.SCALEKV_ADDON;
  return new Promise((resolvePromise, reject) => {
    const p = spawn(process.execPath, args, { cwd: checkout, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('error', reject);
    p.on('close', (code) => {
      const line = out.trim().split('\n').reverse().find((l) => l.startsWith('{'));
      if (code !== 0 || !line) {
        reject(new Error(`${name} on ${checkout}: child exited with ${code}\n${(err + out).split('\n').slice(-30).join('\n')}`));
        return;
      }
      resolvePromise(JSON.parse(line) as ChildResult);
    });
  });
}

async function parent(o: { baseline: string; current: string; cases: CaseName[]; rounds: number; images?: number; profile: boolean; backend: string }) {
  const log = (s: string) => process.stderr.write(s + '\n');
  if (process.env.SCALEKV_ADDON) log('note: SCALEKV_ADDON is ignored here; each checkout loads its own addon');
  const notices: string[] = [];
  const missing = goldenMissing();
  const cases = o.cases.filter((c) => {
    if (c !== 'tiny' && missing) {
      notices.push(`NOTICE: case ${c} skipped: ${missing}`);
      return false;
    }
    return true;
  });
  for (const n of notices) log(n);
  const trees = [
    { label: 'current', dir: o.current },
    { label: 'baseline', dir: o.baseline },
  ];
  const results = new Map<CaseName, { current: ChildResult[]; baseline: ChildResult[] }>();
  for (const c of cases) results.set(c, { current: [], baseline: [] });
  const t0 = performance.now();
  for (let r = 0; r < o.rounds; r++)
    for (const c of cases)
      // ABBA: odd rounds start with the baseline, so whatever favours the first child of a pair hits both trees.
      for (const t of r % 2 === 0 ? trees : [...trees].reverse()) {
        const images = o.images ?? DEFAULT_IMAGES[c];
        const profile = o.profile && t.label === 'current' && r === 0;
        const res = await spawnChild(t.dir, c, images, profile, o.backend);
        (results.get(c) as { current: ChildResult[]; baseline: ChildResult[] })[t.label as 'current' | 'baseline'].push(res);
        log(`[${((performance.now() - t0) / 1000).toFixed(0)} s] round ${r + 1}/${o.rounds} ${c} ${t.label}: ${res.msPerImage.toFixed(1)} ms/image (${res.imagesMs.map((x) => x.toFixed(0)).join(', ')}; warm-up ${res.warmupMs.toFixed(0)}; load ${res.loadMs.toFixed(0)})`);
      }

  const fmt = (x: number) => (x >= 100 ? x.toFixed(0) : x.toFixed(1));
  const lines: string[] = [];
  const first = [...results.values()][0];
  lines.push(`interleaved A/B, ${o.rounds} round(s), ${cpus()[0]?.model ?? 'cpu'} x ${availableParallelism()} threads`);
  if (first) {
    const b = first.baseline[0];
    const cu = first.current[0];
    lines.push(`current  ${o.current}: ${cu.backend} (${cu.device})${cu.cpuLibrary !== undefined ? `, cpu library ${cu.cpuLibrary ?? 'builtin kernels'}` : ''}`);
    lines.push(`baseline ${o.baseline}: ${b.backend} (${b.device})${b.cpuLibrary !== undefined ? `, cpu library ${b.cpuLibrary ?? 'builtin kernels'}` : ''}`);
  }
  for (const n of notices) lines.push(n);
  for (const label of ['current', 'baseline'] as const) {
    const all = [...results.values()].flatMap((r) => r[label]);
    const builds = new Set(all.map((x) => `${x.addon.path} @ ${x.addon.mtime}`));
    if (builds.size > 1) lines.push(`WARNING: the ${label} addon changed during the run: ${[...builds].join('; ')}`);
    else if (builds.size === 1) lines.push(`${label} addon: ${[...builds][0]}`);
  }
  lines.push('');
  lines.push('| case | baseline ms/image: median (runs) | current ms/image: median (runs) | speed-up (median ratio; per round) |');
  lines.push('| --- | --- | --- | --- |');
  for (const [c, r] of results) {
    const bs = r.baseline.map((x) => x.msPerImage);
    const cs = r.current.map((x) => x.msPerImage);
    const paired = bs.map((b, i) => b / cs[i]);
    lines.push(`| ${c} | ${fmt(median(bs))} (${bs.map(fmt).join(', ')}) | ${fmt(median(cs))} (${cs.map(fmt).join(', ')}) | ` +
      `${(median(bs) / median(cs)).toFixed(2)}x (${paired.map((x) => x.toFixed(2)).join(', ')}) |`);
  }
  lines.push('');
  for (const [c, r] of results) lines.push(`${c}: ${r.current[0].setup}; ${r.current[0].imagesMs.length} timed image(s) per child after a warm-up`);
  for (const [c, r] of results) {
    const p = r.current.find((x) => x.profile)?.profile;
    if (!p) continue;
    const opsMs = p.families.reduce((a, f) => a + f.ms, 0);
    lines.push('');
    lines.push(`${c}, current tree, one profiled image: ${fmt(p.wallMs)} ms wall, ${fmt(opsMs)} ms in ops`);
    lines.push('| op family | ms (profiled) | share of wall | ops |');
    lines.push('| --- | --- | --- | --- |');
    for (const f of p.families) lines.push(`| ${f.family} | ${f.ms.toFixed(2)} | ${((100 * f.ms) / p.wallMs).toFixed(1)}% | ${f.ops.join(', ')} |`);
    const rest = p.wallMs - opsMs;
    lines.push(`| outside ops (host, JS, syncs) | ${rest.toFixed(2)} | ${((100 * rest) / p.wallMs).toFixed(1)}% | |`);
  }
  process.stdout.write(lines.join('\n') + '\n');
}

const { values } = parseArgs({
  args: process.argv.slice(2),
  options: {
    baseline: { type: 'string' },
    current: { type: 'string' },
    cases: { type: 'string', default: CASES.join(',') },
    rounds: { type: 'string', default: '3' },
    images: { type: 'string' },
    backend: { type: 'string', default: 'auto' },
    'no-profile': { type: 'boolean', default: false },
    // child mode (internal)
    child: { type: 'boolean', default: false },
    checkout: { type: 'string' },
    case: { type: 'string' },
    profile: { type: 'boolean', default: false },
  },
});

const positiveInt = (s: string | undefined, what: string): number | undefined => {
  if (s === undefined) return undefined;
  const n = Number(s);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${what} must be a positive integer, got ${s}`);
  return n;
};

if (values.child) {
  const name = values.case as CaseName;
  if (!CASES.includes(name)) throw new Error(`unknown case ${values.case}`);
  const r = await child(resolve(values.checkout as string), name, positiveInt(values.images, 'images') ?? DEFAULT_IMAGES[name], values.profile, values.backend);
  process.stdout.write(JSON.stringify(r) + '\n');
} else {
  if (!values.baseline) throw new Error('usage: npm run bench:interleaved -- --baseline DIR [--cases tiny,golden1m,golden1m-scalekv] [--rounds N] [--images N]');
  const cases = values.cases.split(',').map((s) => s.trim()).filter(Boolean);
  for (const c of cases) if (!(CASES as readonly string[]).includes(c)) throw new Error(`unknown case ${c} (cases: ${CASES.join(', ')})`);
  const baseline = resolve(values.baseline);
  const current = resolve(values.current ?? thisTree);
  for (const dir of [baseline, current]) if (!existsSync(join(dir, 'lib', 'engine.ts'))) throw new Error(`${dir} is not a scalekv checkout (no lib/engine.ts)`);
  await parent({
    baseline, current, cases: cases as CaseName[], rounds: positiveInt(values.rounds, 'rounds') as number,
    images: positiveInt(values.images, 'images'), profile: !values['no-profile'], backend: values.backend,
  });
}
