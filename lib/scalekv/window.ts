/** The token counts of the official 1M 1:1 schedule: the `SCALE` table the official ScaleKV code hard-codes. */
export const SCALE_TOKENS_1M_SQUARE: readonly number[] = [1, 4, 16, 36, 64, 144, 256, 400, 576, 1024, 1600, 2304, 4096];

export interface ObservationWindow {
  /** Absolute key positions of the window, ascending. */
  keys: Int32Array;
  /** True when the grid could not be formed and the last `windowSize` positions were taken instead. */
  fallback: boolean;
}

/**
 * The official window (`ScaleKVCluster._select_window_indices`): the centres of a √w × √w grid over the
 * current √n × √n map, or, when either is not a perfect square or the map is smaller than the grid, the
 * last min(w, keyLen) positions of the cache.
 */
export function observationWindow(currentSize: number, currentStart: number, keyLen: number, windowSize: number): ObservationWindow {
  if (currentSize <= 0) return { keys: new Int32Array(0), fallback: false };
  const side = Math.sqrt(currentSize);
  const grid = Math.sqrt(windowSize);
  const lastPositions = (): ObservationWindow => {
    const n = Math.min(windowSize, keyLen);
    return { keys: Int32Array.from({ length: n }, (_, i) => keyLen - n + i), fallback: true };
  };
  if (!Number.isInteger(side) || !Number.isInteger(grid) || side < grid) return lastPositions();
  const patch = Math.floor(side / grid);
  const centres = new Set<number>();
  for (let i = 0; i < grid; i++) {
    for (let j = 0; j < grid; j++) {
      const h = Math.max(0, Math.min(side - 1, i * patch + Math.floor((patch - 1) / 2)));
      const w = Math.max(0, Math.min(side - 1, j * patch + Math.floor((patch - 1) / 2)));
      centres.add(Math.max(0, Math.min(keyLen - 1, h * side + w + currentStart)));
    }
  }
  const sorted = Int32Array.from(centres).sort();
  return { keys: sorted.subarray(0, Math.min(windowSize, sorted.length)), fallback: false };
}
