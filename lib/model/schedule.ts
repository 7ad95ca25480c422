/**
 * Infinity's scale schedules (spec sec. 3): per aspect-ratio template (h / w) a list of 13 token grids, of which a
 * pixel budget `pn` takes a prefix ('0.06M' 7 scales, '0.25M' 10, '0.60M' 12, '1M' 13). Inference drops the
 * temporal size t of the official (t, h, w) triples (it is always run as t = 1).
 */
import { fail } from '../errors.js';

export type PixelBudget = '0.06M' | '0.25M' | '0.60M' | '1M';

/** Scales per pixel budget (the official `[7, 10, 12, 13]` prefix lengths). */
export const PN_SCALE_COUNTS: Readonly<Record<PixelBudget, number>> = Object.freeze({ '0.06M': 7, '0.25M': 10, '0.60M': 12, '1M': 13 });

/** Pixels per transformer token along each axis (the official `vae_stride`). */
export const VAE_STRIDE = 16;

/**
 * Data: `ratio2hws` of `infinity/utils/dynamic_resolution.py` (FoundationVision/Infinity @ 4c27bbb5, byte-identical
 * in StargazerX0/ScaleKV @ eb0615a1), the (h, w) token grids of the 8 tall-or-square templates. The 7 wide templates
 * are their transposes, keyed `int(1 / ratio * 1000) / 1000` as the official code does.
 */
const RATIO2HWS: readonly (readonly [number, readonly (readonly [number, number])[]])[] = [
  [1.0, [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8], [12, 12], [16, 16], [20, 20], [24, 24], [32, 32], [40, 40], [48, 48], [64, 64]]],
  [1.25, [[1, 1], [2, 2], [3, 3], [5, 4], [10, 8], [15, 12], [20, 16], [25, 20], [30, 24], [35, 28], [45, 36], [55, 44], [70, 56]]],
  [1.333, [[1, 1], [2, 2], [4, 3], [8, 6], [12, 9], [16, 12], [20, 15], [24, 18], [28, 21], [36, 27], [48, 36], [60, 45], [72, 54]]],
  [1.5, [[1, 1], [2, 2], [3, 2], [6, 4], [9, 6], [15, 10], [21, 14], [27, 18], [33, 22], [39, 26], [48, 32], [63, 42], [78, 52]]],
  [1.75, [[1, 1], [2, 2], [3, 3], [7, 4], [11, 6], [14, 8], [21, 12], [28, 16], [35, 20], [42, 24], [56, 32], [70, 40], [84, 48]]],
  [2.0, [[1, 1], [2, 2], [4, 2], [6, 3], [10, 5], [16, 8], [22, 11], [30, 15], [38, 19], [46, 23], [60, 30], [74, 37], [90, 45]]],
  [2.5, [[1, 1], [2, 2], [5, 2], [10, 4], [15, 6], [20, 8], [25, 10], [30, 12], [40, 16], [50, 20], [65, 26], [80, 32], [100, 40]]],
  [3.0, [[1, 1], [2, 2], [6, 2], [9, 3], [15, 5], [21, 7], [27, 9], [36, 12], [45, 15], [54, 18], [72, 24], [90, 30], [111, 37]]],
];

/** The 15 templates in the official dict order (each ratio followed by its transpose): the argmin tie order. */
const TEMPLATES: readonly (readonly [number, readonly (readonly [number, number])[]])[] = (() => {
  const out: [number, readonly (readonly [number, number])[]][] = [];
  for (const [ratio, hws] of RATIO2HWS) {
    out.push([ratio, hws]);
    if (ratio !== 1.0) out.push([Math.trunc((1 / ratio) * 1000) / 1000, hws.map(([h, w]) => [w, h] as const)]);
  }
  return out;
})();

/** The aspect-ratio templates (h / w), in the official order: 1.0, 1.25, 0.8, 1.333, 0.75, ... */
export function listAspectRatios(): number[] {
  return TEMPLATES.map(([r]) => r);
}

export interface ScheduleOptions {
  /** Requested height / width; the nearest template (absolute difference, first on ties) is used. */
  aspect: number;
  pn: PixelBudget;
  /** Spatial patchify (the 8B VAE): the VAE works on (2h, 2w) per scale. Default false. */
  patchify?: boolean;
}

export interface ScaleSchedule {
  /** The template h / w that was chosen. */
  template: number;
  pn: PixelBudget;
  patchify: boolean;
  /** Transformer token grids (h, w), scale order. */
  scales: [number, number][];
  /** VAE latent grids: `scales`, doubled with patchify. */
  vaeScales: [number, number][];
  tokensPerScale: number[];
  /** Absolute token offset of each scale (RoPE offset and KV-cache row). */
  starts: number[];
  total: number;
  /** Image size (height, width) in pixels: final grid x 16. */
  pixels: [number, number];
  /** The final grid of the same template's 1M schedule: the RoPE normalisation grid (rope2dPositions' aspect). */
  final1M: [number, number];
}

function nearestTemplate(aspect: number): (typeof TEMPLATES)[number] {
  if (typeof aspect !== 'number' || !Number.isFinite(aspect) || aspect <= 0) fail('ERR_INVALID_ARG', `aspect (h / w) must be a positive number, got ${aspect}`);
  let best = TEMPLATES[0];
  for (const t of TEMPLATES) if (Math.abs(t[0] - aspect) < Math.abs(best[0] - aspect)) best = t;
  return best;
}

/** The official schedule for an aspect ratio and pixel budget (`dynamic_resolution_h_w[template][pn]['scales']`, t dropped). */
export function scaleSchedule(opts: ScheduleOptions): ScaleSchedule {
  const count = PN_SCALE_COUNTS[opts?.pn];
  if (count === undefined) fail('ERR_INVALID_ARG', `pn must be one of ${Object.keys(PN_SCALE_COUNTS).join(', ')}, got ${opts?.pn}`);
  const [template, hws] = nearestTemplate(opts.aspect);
  const patchify = opts.patchify ?? false;
  const scales = hws.slice(0, count).map(([h, w]) => [h, w] as [number, number]);
  const tokensPerScale = scales.map(([h, w]) => h * w);
  const starts: number[] = [];
  let total = 0;
  for (const n of tokensPerScale) {
    starts.push(total);
    total += n;
  }
  const [fh, fw] = scales[scales.length - 1];
  const last1M = hws[hws.length - 1];
  return {
    template,
    pn: opts.pn,
    patchify,
    scales,
    vaeScales: scales.map(([h, w]) => (patchify ? [2 * h, 2 * w] : [h, w])),
    tokensPerScale,
    starts,
    total,
    pixels: [fh * VAE_STRIDE, fw * VAE_STRIDE],
    final1M: [last1M[0], last1M[1]],
  };
}

/** The schedule as the official (1, h, w) triples (what `str(tuple(scale_schedule))` keys the RoPE tables by). */
export function officialTriples(schedule: ScaleSchedule): [number, number, number][] {
  return schedule.scales.map(([h, w]) => [1, h, w]);
}
