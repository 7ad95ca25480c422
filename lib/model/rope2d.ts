/**
 * The (y, x) grid positions of Infinity's 2-D RoPE (`precompute_rope2d_freqs_grid` with
 * rope2d_normalized_by_hw = 2): token (i, j) of a scale with an h x w grid sits at
 * (round(i * fp32(UH / h)), round(j * fp32(UW / w))) of the final grid (UH, UW) of the **1M** schedule of the
 * same aspect ratio, whatever schedule is run; the product is f32 and round is half-to-even (torch.round).
 */

/** Final 1M token grids (h, w) of the official aspect-ratio templates (h / w), transposes included. */
const FINAL_1M_GRIDS: readonly (readonly [number, number, number])[] = [
  [1.0, 64, 64], [1.25, 70, 56], [1.333, 72, 54], [1.5, 78, 52], [1.75, 84, 48], [2.0, 90, 45], [2.5, 100, 40],
  [3.0, 111, 37], [0.8, 56, 70], [0.75, 54, 72], [0.666, 52, 78], [0.571, 48, 84], [0.5, 45, 90], [0.4, 40, 100],
  [0.333, 37, 111],
];

/** One scale of a schedule: (h, w), or the official (t, h, w) with t ignored. */
export type ScaleGrid = readonly [number, number] | readonly [number, number, number];

/** The 1M final grid (UH, UW) of the template nearest to `hDivW` (by absolute difference, as the official code picks). */
export function final1MGrid(hDivW: number): readonly [number, number] {
  let best = FINAL_1M_GRIDS[0];
  for (const g of FINAL_1M_GRIDS) if (Math.abs(g[0] - hDivW) < Math.abs(best[0] - hDivW)) best = g;
  return [best[1], best[2]];
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
