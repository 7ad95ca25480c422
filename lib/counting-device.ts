/**
 * The 'count' backend: a device with no memory and no compute that keeps the engine's memory accounting exactly
 * as csrc/engine_core.cc does (live bytes and peaks per category, the simultaneous peak, and the caching
 * allocator's reserved bytes: 512-byte blocks, a cached block reused when it wastes at most a quarter of the
 * request plus a page). Every op is accepted and does nothing; reads return zeros.
 *
 * Running a workload on it is a dry run of its allocations: the counters after it are what a real engine's would
 * be, because the native counters depend only on the order of allocations and disposals made from JS (an op
 * never allocates, and a disposal counts at the call, not when the queue reaches it). The memory planner runs
 * the generation loop on it; `test/planner.test.ts` checks it against the CPU engine's counters.
 */
import { dtypeSize, DTYPES, type DType } from './dtype.js';
import { ScaleKVError } from './errors.js';
import { NATIVE_OP_NAMES } from './native-ops.generated.js';
import type { NativeEngine, NativeKernelLaunch, NativeMemory, NativeOps, NativeTensor } from './native.js';

const CATEGORIES = ['weights', 'kv', 'activations', 'scratch'] as const;
type Category = (typeof CATEGORIES)[number];

const BLOCK_ROUNDING = 512;
const closeEnough = (block: number, want: number) => block <= want + Math.floor(want / 4) + 4096;

/** One allocation, shared by a tensor and its views; it is recycled when the last of them is disposed. */
class CountedBlock {
  handles = 1;
  constructor(
    readonly device: CountingDevice,
    readonly block: number,
    readonly bytes: number,
    readonly category: Category,
    /** The static memory plan that placed it, and where: released without going to the cache. */
    readonly placed: { plan: PlanState; offset: number } | undefined,
    /** The allocation trace recording it, and its index there. */
    readonly traced: { trace: AllocationTrace; index: number } | undefined,
  ) {}
  drop(): void {
    if (--this.handles === 0) this.device.recycle(this);
  }
}

/**
 * A static memory plan being placed (or ended, while tensors it placed live): its arena joins the cache with the last
 * of them.
 * As the native arena, it refuses a placement that would overlap a live tensor's range.
 */
interface PlanState {
  sizes: number[];
  offsets: number[];
  next: number;
  diverged: boolean;
  arena: number;
  /** [offset, end) of the live tensors it placed, by offset. */
  ranges: [number, number][];
  ended: boolean;
}

/** Takes [offset, offset + bytes) among the sorted live ranges if it overlaps none. */
function takeRange(ranges: [number, number][], offset: number, bytes: number): boolean {
  let lo = 0;
  let hi = ranges.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (ranges[mid][0] < offset) lo = mid + 1;
    else hi = mid;
  }
  if (lo < ranges.length && ranges[lo][0] < offset + bytes) return false;
  if (lo > 0 && ranges[lo - 1][1] > offset) return false;
  ranges.splice(lo, 0, [offset, offset + bytes]);
  return true;
}

/**
 * The allocations of a stretch of work in order: their rounded sizes and their lifetimes in event time (an
 * event is one allocation or one release; `end` is Infinity for one still alive when the trace was taken).
 */
export interface AllocationTrace {
  sizes: number[];
  start: number[];
  end: number[];
}

class CountedTensor implements NativeTensor {
  readonly shape: number[];
  readonly dtype: string;
  #memory: CountedBlock;
  #disposed = false;

  constructor(memory: CountedBlock, shape: number[], dtype: string) {
    this.#memory = memory;
    this.shape = shape;
    this.dtype = dtype;
  }

  get bytes(): number {
    return this.#memory.bytes;
  }

  view(shape: number[]): NativeTensor {
    if (this.#disposed) throw new ScaleKVError('ERR_DISPOSED', 'view: tensor was disposed');
    const numel = shape.reduce((a, b) => a * b, 1);
    if (!shape.every((d) => Number.isSafeInteger(d) && d >= 0) || numel * dtypeSize(this.dtype as DType) !== this.bytes)
      throw new ScaleKVError('ERR_SHAPE', `view [${shape.join(', ')}] does not have the elements of [${this.shape.join(', ')}]`);
    this.#memory.handles++;
    return new CountedTensor(this.#memory, [...shape], this.dtype);
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  async read(): Promise<ArrayBuffer> {
    if (this.#disposed) throw new ScaleKVError('ERR_DISPOSED', 'tensor was disposed');
    return new ArrayBuffer(this.bytes);
  }

  write(data: ArrayBufferView): void {
    if (this.#disposed) throw new ScaleKVError('ERR_DISPOSED', 'tensor was disposed');
    if (data.byteLength !== this.bytes) throw new ScaleKVError('ERR_SHAPE', `write: ${data.byteLength} bytes for a tensor of ${this.bytes}`);
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#memory.drop();
  }
}

// Every op of the table: accepted, counted, not run.
export interface CountingDevice extends NativeOps {}
export class CountingDevice implements NativeEngine {
  readonly backend = 'count';
  readonly device = 'count (no memory, no compute: allocation accounting only)';
  #inUse: Record<Category, number> = { weights: 0, kv: 0, activations: 0, scratch: 0 };
  #peak: Record<Category, number> = { weights: 0, kv: 0, activations: 0, scratch: 0 };
  #totalInUse = 0;
  #totalPeak = 0;
  #reserved = 0;
  #reservedPeak = 0;
  #memoryLimit = 0;
  /** Sizes of the cached (released) blocks, ascending. */
  #cache: number[] = [];
  #plan: PlanState | undefined;
  #trace: AllocationTrace | undefined;
  #events = 0;
  #disposed = false;

  /** Called with every op and its arguments (shapes and scalars; tensors hold no data): the op stream of a dry run. */
  onOp?: (name: (typeof NATIVE_OP_NAMES)[number], args: Record<string, unknown>) => void;

  constructor() {
    for (const name of NATIVE_OP_NAMES)
      this[name] = ((args: Record<string, unknown>): void => {
        this.#enqueued++;
        this.onOp?.(name, args);
      }) as never;
  }

  tensor(dtype: string, shape: number[], data?: ArrayBufferView | null, category?: string, _fillByte?: number): NativeTensor {
    if (this.#disposed) throw new ScaleKVError('ERR_DISPOSED', 'engine was disposed');
    if (!DTYPES.includes(dtype as DType)) throw new ScaleKVError('ERR_DTYPE', `unknown dtype '${dtype}' (${DTYPES.join(', ')})`);
    let numel = 1;
    for (const d of shape) {
      if (!Number.isSafeInteger(d) || d < 0) throw new ScaleKVError('ERR_SHAPE', `shape entries must be non-negative integers, got ${d}`);
      numel *= d;
    }
    const cat = (category ?? 'activations') as Category;
    if (!CATEGORIES.includes(cat)) throw new ScaleKVError('ERR_INVALID_ARG', 'unknown memory category (weights, kv, activations, scratch)');
    if (data && (data as unknown as { length: number }).length !== numel)
      throw new ScaleKVError('ERR_SHAPE', `data has ${(data as unknown as { length: number }).length} elements but the shape needs ${numel}`);
    const bytes = numel * dtypeSize(dtype as DType);
    const want = Math.ceil(Math.max(bytes, 1) / BLOCK_ROUNDING) * BLOCK_ROUNDING;
    const plan = this.#plan;
    let placed: { plan: PlanState; offset: number } | undefined;
    if (plan && !plan.diverged) {
      const offset = plan.offsets[plan.next];
      if (plan.next < plan.sizes.length && want <= plan.sizes[plan.next] && takeRange(plan.ranges, offset, want)) {
        plan.next++;
        placed = { plan, offset };
      } else {
        plan.diverged = true;
      }
    }
    const block = placed ? want : this.#allocate(want);
    this.#inUse[cat] += bytes;
    this.#peak[cat] = Math.max(this.#peak[cat], this.#inUse[cat]);
    this.#totalInUse += bytes;
    this.#totalPeak = Math.max(this.#totalPeak, this.#totalInUse);
    let traced: { trace: AllocationTrace; index: number } | undefined;
    if (this.#trace) {
      traced = { trace: this.#trace, index: this.#trace.sizes.length };
      this.#trace.sizes.push(want);
      this.#trace.start.push(this.#events++);
      this.#trace.end.push(Infinity);
    }
    return new CountedTensor(new CountedBlock(this, block, bytes, cat, placed, traced), [...shape], dtype);
  }

  /** Starts recording an allocation trace (see AllocationTrace) of everything allocated from now on. */
  startTrace(): void {
    this.#trace = { sizes: [], start: [], end: [] };
    this.#events = 0;
  }

  /** The trace since startTrace(); recording stops. */
  takeTrace(): AllocationTrace {
    const t = this.#trace ?? { sizes: [], start: [], end: [] };
    this.#trace = undefined;
    return t;
  }

  beginMemoryPlan(sizes: number[], offsets: number[], total: number): void {
    if (sizes.length !== offsets.length || !(total > 0)) throw new ScaleKVError('ERR_INVALID_ARG', 'beginMemoryPlan: one offset per size and a positive total');
    sizes.forEach((size, i) => {
      if (!(size > 0) || offsets[i] % BLOCK_ROUNDING !== 0 || offsets[i] + size > total)
        throw new ScaleKVError('ERR_INVALID_ARG', `beginMemoryPlan: allocation ${i} must be non-empty, 512-byte aligned and inside the arena`);
    });
    this.endMemoryPlan();
    const want = Math.ceil(total / BLOCK_ROUNDING) * BLOCK_ROUNDING;
    // A cached block as large (an earlier plan's arena) serves, as in the native engine; the rest goes back.
    const i = lowerBound(this.#cache, want);
    const reused = i < this.#cache.length;
    const arena = reused ? this.#cache.splice(i, 1)[0] : want;
    this.trimCache();
    if (!reused) this.#reserve(arena);
    this.#plan = { sizes: [...sizes], offsets: [...offsets], next: 0, diverged: false, arena, ranges: [], ended: false };
  }

  endMemoryPlan(): { placed: number; diverged: boolean } {
    const plan = this.#plan;
    if (!plan) return { placed: 0, diverged: false };
    this.#plan = undefined;
    plan.ended = true;
    this.#releaseArena(plan);
    return { placed: plan.next, diverged: plan.diverged };
  }

  // The smallest cached block that is at least the rounded request, if it is close enough; else a new block.
  #allocate(want: number): number {
    const i = lowerBound(this.#cache, want);
    if (i < this.#cache.length && closeEnough(this.#cache[i], want)) return this.#cache.splice(i, 1)[0];
    if (this.#memoryLimit > 0 && this.#reserved + want > this.#memoryLimit) this.trimCache();  // the native retry
    this.#reserve(want);
    return want;
  }

  // New device bytes, within the memory limit (EngineCore::device_alloc).
  #reserve(bytes: number): void {
    if (this.#memoryLimit > 0 && this.#reserved + bytes > this.#memoryLimit)
      throw new ScaleKVError('ERR_OUT_OF_MEMORY', `cannot allocate ${bytes} bytes: ${this.#reserved} of the engine's memoryLimit ${this.#memoryLimit} bytes are taken`);
    this.#reserved += bytes;
    this.#reservedPeak = Math.max(this.#reservedPeak, this.#reserved);
  }

  setMemoryLimit(bytes: number): void {
    this.#memoryLimit = bytes;
  }

  /** @internal */
  recycle(b: CountedBlock): void {
    if (b.placed) {
      const { plan, offset } = b.placed;
      plan.ranges.splice(plan.ranges.findIndex(([o]) => o === offset), 1);
      this.#releaseArena(plan);
    } else {
      this.#cache.splice(lowerBound(this.#cache, b.block), 0, b.block);
    }
    this.#inUse[b.category] -= b.bytes;
    this.#totalInUse -= b.bytes;
    if (b.traced && b.traced.trace === this.#trace) b.traced.trace.end[b.traced.index] = this.#events++;
  }

  // An arena joins the cache once its plan has ended and the last tensor placed in it is gone.
  #releaseArena(plan: PlanState): void {
    if (plan.ended && plan.ranges.length === 0) this.#cache.splice(lowerBound(this.#cache, plan.arena), 0, plan.arena);
  }

  memory(): NativeMemory {
    return {
      inUse: { ...this.#inUse },
      peak: { ...this.#peak },
      totalInUse: this.#totalInUse,
      totalPeak: this.#totalPeak,
      reserved: this.#reserved,
      reservedPeak: this.#reservedPeak,
    };
  }

  trimCache(): void {
    for (const b of this.#cache) this.#reserved -= b;
    this.#cache = [];
  }

  async sync(): Promise<void> {}
  async marker(): Promise<void> {
    if (this.#disposed) throw new ScaleKVError('ERR_DISPOSED', 'engine was disposed');
  }
  dispose(): void {
    this.#disposed = true;
  }
  setProfiling(_on: boolean, _kernelCounters?: boolean, _sampleBlocks?: number): void {}
  profile(): Record<string, { count: number; ms: number }> {
    return {};
  }
  kernelCounters(): NativeKernelLaunch[] {
    return [];
  }


  enqueued(): number {
    return this.#enqueued;
  }
  #enqueued = 0;
}

// First index whose value is >= x.
function lowerBound(sorted: number[], x: number): number {
  let lo = 0;
  let hi = sorted.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}
