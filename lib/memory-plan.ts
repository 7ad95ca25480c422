/**
 * Static memory plans: the allocations of a generation are known before it runs (the 'count' backend's dry run
 * makes them in the same order with the same sizes), so their offsets in one arena can be fixed in advance and the
 * engine reserves the arena instead of growing a cache of released blocks.
 *
 * `packAllocations` is greedy by size (as TensorFlow Lite's and XLA's planners): the largest allocation first,
 * each at the lowest offset of the smallest gap that fits among the allocations already placed whose lifetimes
 * overlap its own. The arena is then within a few percent of the lower bound, the most bytes live at once.
 */
import { CountingDevice, type AllocationTrace } from './counting-device.js';
import type { Engine } from './engine.js';
import { fail } from './errors.js';

export type { AllocationTrace } from './counting-device.js';

export interface StaticMemoryPlan {
  /** Per allocation, in order: its size (512-byte blocks) and offset in the arena. */
  sizes: number[];
  offsets: number[];
  /** Arena bytes. */
  total: number;
  /** The most bytes live at once in the trace: no arena can be smaller. */
  livePeak: number;
}

/**
 * Prompt lengths a plan is made for: rounded up to 64 tokens (at most `maxTokens`), so one plan serves prompts of
 * similar lengths (an allocation smaller than planned still takes its planned place).
 */
export function plannedTextLength(tokens: number, maxTokens: number): number {
  return Math.min(maxTokens, Math.ceil(Math.max(tokens, 1) / 64) * 64);
}

/** What the engine placed under a plan: how many allocations, and whether the work left the plan. */
export interface MemoryPlanReport {
  placed: number;
  diverged: boolean;
}

/** Offsets for every allocation of a trace (see the file comment). */
export function packAllocations(trace: AllocationTrace): StaticMemoryPlan {
  const { sizes, start, end } = trace;
  const n = sizes.length;
  if (start.length !== n || end.length !== n) fail('ERR_INVALID_ARG', 'packAllocations: sizes, start and end must have one entry per allocation');
  const order = Array.from({ length: n }, (_, i) => i).sort((a, b) => sizes[b] - sizes[a] || start[a] - start[b]);
  const offsets = new Array<number>(n).fill(0);
  // Placed allocations, kept sorted by offset so each new one scans its neighbours in address order.
  const placed: number[] = [];
  let total = 0;
  for (const i of order) {
    let best = -1;
    let bestGap = Infinity;
    let cursor = 0;
    for (const j of placed) {
      if (!(start[j] < end[i] && start[i] < end[j])) continue;
      const gap = offsets[j] - cursor;
      if (gap >= sizes[i] && gap < bestGap) {
        best = cursor;
        bestGap = gap;
      }
      cursor = Math.max(cursor, offsets[j] + sizes[j]);
    }
    offsets[i] = best >= 0 ? best : cursor;
    total = Math.max(total, offsets[i] + sizes[i]);
    let at = placed.length;
    while (at > 0 && offsets[placed[at - 1]] > offsets[i]) at--;
    placed.splice(at, 0, i);
  }
  return { sizes: [...sizes], offsets, total, livePeak: livePeak(trace) };
}

/** The most bytes live at once in a trace. */
export function livePeak(trace: AllocationTrace): number {
  const events: [number, number][] = [];
  for (let i = 0; i < trace.sizes.length; i++) {
    events.push([trace.start[i], trace.sizes[i]]);
    if (Number.isFinite(trace.end[i])) events.push([trace.end[i], -trace.sizes[i]]);
  }
  events.sort((a, b) => a[0] - b[0]);
  let live = 0;
  let most = 0;
  for (const [, delta] of events) {
    live += delta;
    most = Math.max(most, live);
  }
  return most;
}

/**
 * The plan of `work` run on a 'count' engine (a dry run: the same calls as the real run, on a twin of its model):
 * every allocation it makes, packed. Tensors it leaves alive count as live to the end.
 */
export async function planAllocations(engine: Engine, work: () => Promise<void>): Promise<StaticMemoryPlan> {
  const device = engine.native;
  if (!(device instanceof CountingDevice)) fail('ERR_INVALID_ARG', `planAllocations needs a 'count' engine (a dry run), got '${engine.backend}'`);
  device.startTrace();
  let trace: AllocationTrace;
  try {
    await work();
  } finally {
    trace = device.takeTrace();
  }
  return packAllocations(trace);
}
