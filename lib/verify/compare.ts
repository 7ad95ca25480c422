/** Agreement metrics used by conformance checks. */

export interface Check {
  /** What was compared, e.g. "u05/kept". */
  name: string;
  /** 'maxRelErr' (max |a−b| / max |b|), 'differences' (count of unequal entries), or 'match' (0/1). */
  metric: 'maxRelErr' | 'differences' | 'match';
  value: number;
  tolerance: number;
  pass: boolean;
  note?: string;
}

/**
 * Max abs difference relative to the largest reference magnitude. Infinities must match exactly (same
 * sign, same place); a NaN anywhere in `actual` fails.
 */
export function maxRelErr(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) return Infinity;
  let scale = 0;
  for (let i = 0; i < expected.length; i++) if (Number.isFinite(expected[i])) scale = Math.max(scale, Math.abs(expected[i]));
  if (scale === 0) scale = 1;
  let worst = 0;
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i];
    const b = expected[i];
    if (Number.isNaN(a)) return Infinity;
    if (!Number.isFinite(b) || !Number.isFinite(a)) {
      if (a !== b) return Infinity;
      continue;
    }
    worst = Math.max(worst, Math.abs(a - b) / scale);
  }
  return worst;
}

export function differences(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) return Math.max(actual.length, expected.length);
  let n = 0;
  for (let i = 0; i < expected.length; i++) if (actual[i] !== expected[i]) n++;
  return n;
}

export function relCheck(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number, note?: string): Check {
  const value = maxRelErr(actual, expected);
  return { name, metric: 'maxRelErr', value, tolerance, pass: value <= tolerance, note };
}

export function diffCheck(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, note?: string): Check {
  const value = differences(actual, expected);
  return { name, metric: 'differences', value, tolerance: 0, pass: value === 0, note };
}

export function matchCheck(name: string, ok: boolean, note?: string): Check {
  return { name, metric: 'match', value: ok ? 1 : 0, tolerance: 1, pass: ok, note };
}
