// End-to-end benchmark of the built-in tiny model: time and peak memory per image (text features -> sampling
// loop -> VAE decode -> pixels), and each op family's share of the time from one profiled run (device time of
// every op between timing marks: CUDA events on the GPU).
import { Bench } from 'tinybench';
import type { Engine, OpProfileEntry } from '../lib/engine.js';
import { decodeImage, generate } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { VaeDecoder } from '../lib/model/vae.js';
import { T5TextEncoder } from '../lib/text/t5-encoder.js';
import { loadTinyCase, TINY_CFG, TINY_TAU } from './tiny-case.js';

export const FAMILIES: Record<string, string> = {
  attention: 'self-attention',
  segment_attention: 'self-attention',
  cross_attention: 'cross-attention',
  gemm: 'linear (GEMM)',
  layer_norm: 'norms',
  rms_norm: 'norms',
  group_norm: 'norms',
  qk_norm_rope: 'q/k norm + RoPE',
  activation: 'elementwise',
  gated_residual: 'elementwise',
  gated_activation: 'elementwise',
  add: 'elementwise',
  cfg_tau: 'elementwise',
  transpose12: 'layout copies',
  upload: 'host uploads',
  fill: 'host uploads',
  sample_bits: 'sampling',
  topk_topp_mask: 'sampling',
  bits_to_codes: 'codes + resize',
  resize_bilinear: 'codes + resize',
  pixel_shuffle2x: 'codes + resize',
  pixel_unshuffle2x: 'codes + resize',
  conv2d: 'VAE conv',
  upsample_nearest2x: 'VAE upsample',
  image_to_u8: 'VAE upsample',
  evict_compact: 'KV eviction',
  selection: 'KV selection',
};

/** Profile entries summed per op family (FAMILIES), largest first; `ops` names each op with its library path. */
export function opFamilies(entries: OpProfileEntry[]): { family: string; ms: number; ops: string[] }[] {
  const byFamily = new Map<string, { ms: number; ops: Set<string> }>();
  for (const p of entries) {
    const family = FAMILIES[p.op] ?? p.op;
    const f = byFamily.get(family) ?? { ms: 0, ops: new Set<string>() };
    f.ms += p.ms;
    f.ops.add(p.path ? `${p.op}:${p.path}` : p.op);
    byFamily.set(family, f);
  }
  return [...byFamily.entries()].map(([family, f]) => ({ family, ms: f.ms, ops: [...f.ops] })).sort((a, b) => b.ms - a.ms);
}

export interface E2eResult {
  msPerImage: number;
  samplingMsPerImage: number;
  peakBytes: number;
  /** What the backend held at most: live tensors plus the cache of released blocks. */
  reservedPeakBytes: number;
  peakByCategory: Record<string, number>;
  families: { family: string; ms: number; share: number; ops: string[] }[];
}

export async function runE2e(engine: Engine, opts: { iterations: number }): Promise<E2eResult> {
  const { model, vae, schedule, text } = await loadTinyCase({ InfinityModel, VaeDecoder, scaleSchedule, createTinyModel, T5TextEncoder }, engine);
  let sampling = 0;
  let runs = 0;
  const oneImage = async (seed: number) => {
    const t0 = performance.now();
    const r = await generate(model, { text, schedule, cfg: TINY_CFG, tau: TINY_TAU, seed });
    sampling += performance.now() - t0;
    runs++;
    try {
      await decodeImage(vae, r.summedCodes);
    } finally {
      r.summedCodes.dispose();
    }
  };
  try {
    await oneImage(0); // warm-up, and the memory peak of a whole image
    const bench = new Bench({ name: 'e2e', iterations: opts.iterations, time: 0, warmup: false });
    let seed = 1;
    bench.add('tiny model image', () => oneImage(seed++));
    sampling = 0;
    runs = 0;
    await bench.run();
    const r = bench.tasks[0].result;
    if (r.state !== 'completed') throw new Error(`e2e: ${r.state}`);
    const memory = engine.memory();
    engine.startProfiling();
    await oneImage(12345);
    const families = opFamilies(await engine.stopProfiling());
    const total = families.reduce((a, f) => a + f.ms, 0);
    return {
      msPerImage: r.latency.mean,
      samplingMsPerImage: sampling / Math.max(1, runs),
      peakBytes: memory.totalPeak,
      reservedPeakBytes: memory.reservedPeak,
      peakByCategory: memory.peak,
      families: families.map((f) => ({ ...f, share: f.ms / total })),
    };
  } finally {
    model.dispose();
    vae.dispose();
  }
}

export function formatE2e(backend: string, r: E2eResult): string {
  const MiB = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
  const lines = [
    `end to end, tiny model (depth 4, C 128), 256x256, 7 scales, CFG, B = 1, on ${backend}:`,
    `  ${r.msPerImage.toFixed(1)} ms per image (sampling loop ${r.samplingMsPerImage.toFixed(1)} ms, VAE decode the rest); ` +
      `peak ${MiB(r.peakBytes)} live (${Object.entries(r.peakByCategory).map(([k, v]) => `${k} ${MiB(v)}`).join(', ')}), ` +
      `${MiB(r.reservedPeakBytes)} reserved`,
    '| op family | ms (profiled) | share | ops |',
    '| --- | --- | --- | --- |',
    ...r.families.map((f) => `| ${f.family} | ${f.ms.toFixed(2)} | ${(100 * f.share).toFixed(1)}% | ${f.ops.join(', ')} |`),
  ];
  return lines.join('\n') + '\n';
}
