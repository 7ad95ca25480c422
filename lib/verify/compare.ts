/**
 * Agreement metrics of the conformance checks.
 *
 * Float tensors pass or fail on one number, max |ours − official| / max |official| (the bar, a tolerance per
 * fixture kind), and report alongside it the errors per element class, because the tensor-wide figure divides every
 * error by the largest magnitude and so hides a wrong small element (a logit near zero, a quiet hidden channel):
 * - **large** elements, |official| ≥ floor = ELEMENT_FLOOR × max |official|: max |ours − official| / |official|,
 *   each error against the element's own magnitude;
 * - **small** elements, below the floor: max |ours − official| in absolute terms. Their own magnitude is no yardstick:
 *   they come out of sums of terms of the tensor's scale, whose f32 rounding (about 2^-24 · max · √terms) is a
 *   large fraction of them however correct the arithmetic;
 * - **non-finite** elements (±inf scores): must be equal, same sign and place; a NaN anywhere in ours fails.
 * Integer tensors (kept positions, bits, masks) are compared exactly: the number of differing elements, and for
 * lists (per (row, head) kept positions) how many lists differ.
 */

/** Elements at least this fraction of the tensor's largest magnitude are judged against their own magnitude. */
export const ELEMENT_FLOOR = 1e-3;

export interface ElementErrors {
  /** ELEMENT_FLOOR × max |official| (finite elements). */
  floor: number;
  large: { count: number; maxRelErr: number };
  small: { count: number; maxAbsErr: number };
  /** Non-finite official elements (all matched, or the check fails). */
  nonFinite: number;
}

export interface Check {
  /** What was compared, e.g. "u05/kept". */
  name: string;
  /** 'maxRelErr' (max |a−b| / max |b|), 'differences' (count of unequal entries), or 'match' (0/1). */
  metric: 'maxRelErr' | 'differences' | 'match';
  value: number;
  tolerance: number;
  pass: boolean;
  note?: string;
  /** Float checks: the errors per element class. */
  elements?: ElementErrors;
  /** Recorded tensors this check compares, when its name is not simply the tensor's (aggregate checks). */
  covers?: string[];
}

/** The tensor-wide error and the per-class errors of `actual` against `expected` (Infinity on a mismatch that has no finite error). */
export function compareFloats(actual: ArrayLike<number>, expected: ArrayLike<number>): { maxRelErr: number; elements: ElementErrors } {
  let scale = 0;
  for (let i = 0; i < expected.length; i++) if (Number.isFinite(expected[i])) scale = Math.max(scale, Math.abs(expected[i]));
  const floor = ELEMENT_FLOOR * scale;
  if (scale === 0) scale = 1;
  const elements: ElementErrors = { floor, large: { count: 0, maxRelErr: 0 }, small: { count: 0, maxAbsErr: 0 }, nonFinite: 0 };
  if (actual.length !== expected.length) return { maxRelErr: Infinity, elements };
  let worst = 0;
  for (let i = 0; i < expected.length; i++) {
    const a = actual[i];
    const b = expected[i];
    if (!Number.isFinite(b)) {
      elements.nonFinite++;
      if (a !== b) worst = Infinity;
      continue;
    }
    const d = Number.isNaN(a) ? Infinity : Math.abs(a - b);
    worst = Math.max(worst, d / scale);
    if (Math.abs(b) >= floor && floor > 0) {
      elements.large.count++;
      elements.large.maxRelErr = Math.max(elements.large.maxRelErr, d / Math.abs(b));
    } else {
      elements.small.count++;
      elements.small.maxAbsErr = Math.max(elements.small.maxAbsErr, d);
    }
  }
  return { maxRelErr: worst, elements };
}

/** Max abs difference relative to the largest finite reference magnitude (see compareFloats). */
export function maxRelErr(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  return compareFloats(actual, expected).maxRelErr;
}

export function differences(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) return Math.max(actual.length, expected.length);
  let n = 0;
  for (let i = 0; i < expected.length; i++) if (actual[i] !== expected[i]) n++;
  return n;
}

export function relCheck(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, tolerance: number, note?: string): Check {
  const { maxRelErr: value, elements } = compareFloats(actual, expected);
  const sizes = actual.length === expected.length ? '' : `${actual.length} values, expected ${expected.length}`;
  return { name, metric: 'maxRelErr', value, tolerance, pass: value <= tolerance, note: [note, sizes].filter(Boolean).join('; ') || undefined, elements };
}

/**
 * Exact comparison. With `listLength` the arrays are lists of that length (e.g. kept positions per (row, head)) and
 * the note says how many lists differ.
 */
export function diffCheck(name: string, actual: ArrayLike<number>, expected: ArrayLike<number>, o: { note?: string; listLength?: number } = {}): Check {
  const value = differences(actual, expected);
  let note = o.note;
  if (o.listLength && actual.length === expected.length && expected.length % o.listLength === 0) {
    let lists = 0;
    for (let p = 0; p < expected.length; p += o.listLength)
      for (let i = p; i < p + o.listLength; i++)
        if (actual[i] !== expected[i]) {
          lists++;
          break;
        }
    note = [note, `${value} of ${expected.length} entries differ in ${lists} of ${expected.length / o.listLength} lists`].filter(Boolean).join('; ');
  } else if (actual.length !== expected.length) note = [note, `${actual.length} values, expected ${expected.length}`].filter(Boolean).join('; ');
  return { name, metric: 'differences', value, tolerance: 0, pass: value === 0, note };
}

export function matchCheck(name: string, ok: boolean, note?: string): Check {
  return { name, metric: 'match', value: ok ? 1 : 0, tolerance: 1, pass: ok, note };
}

/** One-line rendering of a float check's element classes. */
export function formatElements(e: ElementErrors): string {
  const parts = [`${e.large.maxRelErr.toExponential(2)} rel on ${e.large.count} ≥ ${e.floor.toExponential(1)}`];
  if (e.small.count) parts.push(`${e.small.maxAbsErr.toExponential(2)} abs on ${e.small.count} below`);
  if (e.nonFinite) parts.push(`${e.nonFinite} non-finite equal`);
  return parts.join(', ');
}
