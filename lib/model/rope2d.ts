/**
 * The (y, x) grid positions of Infinity's 2-D RoPE (`precompute_rope2d_freqs_grid` with
 * rope2d_normalized_by_hw = 2): token (i, j) of a scale with an h x w grid sits at
 * (round(i * fp32(UH / h)), round(j * fp32(UW / w))) of the final grid (UH, UW) of the **1M** schedule of the
 * same aspect ratio, whatever schedule is run; the product is f32 and round is half-to-even (torch.round).
 */
import { scaleSchedule } from './schedule.js';

/** One scale of a schedule: (h, w), or the official (t, h, w) with t ignored. */
export type ScaleGrid = readonly [number, number] | readonly [number, number, number];

/** The 1M final grid (UH, UW) of the template nearest to `hDivW`, chosen exactly as scaleSchedule chooses it. */
export function final1MGrid(hDivW: number): readonly [number, number] {
  return scaleSchedule({ aspect: hDivW, pn: '1M' }).final1M;
}

function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/**
 * [L, 2] int32 (y, x) positions of every token of `schedule` (scale order, row-major within a scale). Scale s
 * occupies rows start(s) .. start(s) + h*w, start(s) = tokens of the earlier scales. `aspect` is the h/w ratio
 * (mapped to its template's 1M grid) or that grid (UH, UW) itself.
 */
export function rope2dPositions(schedule: readonly ScaleGrid[], aspect: number | readonly [number, number]): Int32Array {
  const [uh, uw] = typeof aspect === 'number' ? final1MGrid(aspect) : aspect;
  const grids = schedule.map((s) => (s.length === 3 ? [s[1], s[2]] : [s[0], s[1]]));
  const total = grids.reduce((n, [h, w]) => n + h * w, 0);
  const out = new Int32Array(total * 2);
  const f = Math.fround;
  let t = 0;
  for (const [h, w] of grids) {
    const sy = f(uh / h), sx = f(uw / w);
    for (let i = 0; i < h; i++) {
      const y = roundHalfEven(f(i * sy));
      for (let j = 0; j < w; j++, t++) {
        out[2 * t] = y;
        out[2 * t + 1] = roundHalfEven(f(j * sx));
      }
    }
  }
  return out;
}
