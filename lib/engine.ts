import { availableParallelism } from 'node:os';
import { DType, DTYPES } from './dtype.js';
import { fail, rethrowNative, ScaleKVError } from './errors.js';
import { CountingDevice } from './counting-device.js';
import { loadNative, NativeEngine, type NativeKernelLaunch } from './native.js';
import { Ops } from './ops.js';
import { HostArray, Tensor, type TensorOwner } from './tensor.js';
import type { MemoryPlanReport, StaticMemoryPlan } from './memory-plan.js';

export { Tensor, type HostArray, type TensorOwner } from './tensor.js';

/** 'count' has no memory and no compute: a dry run of a workload's allocations (see counting-device.ts). */
export type BackendName = 'cpu' | 'cuda' | 'emu' | 'count';
export type BackendChoice = BackendName | 'auto';
export type MemoryCategory = 'weights' | 'kv' | 'activations' | 'scratch';
export const MEMORY_CATEGORIES: readonly MemoryCategory[] = ['weights', 'kv', 'activations', 'scratch'];

export interface EngineOptions {
  /**
   * 'auto' (default, or env SCALEKV_BACKEND) takes CUDA when a device is usable, else the CPU. 'count' runs
   * nothing and only keeps the memory counters, exactly as a real backend would (tensors read back as zeros).
   */
  backend?: BackendChoice;
  /** CPU backend: intra-op threads (default: all cores). */
  threads?: number;
  /**
   * Bytes the engine may hold on its device (live tensors, cached blocks and memory-plan arenas): an allocation past
   * it fails with ERR_OUT_OF_MEMORY exactly as a full device does, after the engine has given its cache back. Default
   * none (the device's own size). For tests and for sharing a device between processes.
   */
  memoryLimit?: number;
}

export interface MemoryStats {
  /** Bytes currently allocated, by category. */
  inUse: Record<MemoryCategory, number>;
  /** Highest bytes allocated at once, by category, since the engine was created. */
  peak: Record<MemoryCategory, number>;
  totalInUse: number;
  totalPeak: number;
  /**
   * Bytes the backend holds: live tensors plus the cache of released ones. A disposed tensor's memory is
   * reused by later allocations at once (the queue runs in order, so work still queued on it finishes first);
   * `trimCache()` returns the cache to the device.
   */
  reserved: number;
  reservedPeak: number;
}

/** One op's share of a profile: its backend name (e.g. 'gemm', 'conv2d'), how often it ran, total milliseconds. */
export interface OpProfileEntry {
  /** The op's kernel name ('gemm', 'attention', ...). */
  op: string;
  /**
   * The path it took when not the backend's fast kernel: a library ('onednn' on the CPU), or on CUDA and the
   * emulator a slower kernel and why ('simt (K % 8 != 0)'). One entry per path.
   */
  path?: string;
  count: number;
  ms: number;
  /** With `startProfiling({ kernelCounters: true })` (emu only): every kernel launch of these ops, in order. */
  launches?: KernelLaunch[];
}

/** A kernel launch with the emulator's cost counters; `lib/projection.ts` turns them into a projected time. */
export type KernelLaunch = Omit<NativeKernelLaunch, 'op'>;

export interface ProfilingOptions {
  /**
   * Also record every kernel launch with the emulator's cost counters (global-memory requests and sectors,
   * shared-memory wavefronts and bank conflicts, tensor-core FLOPs, barriers). The emu backend only; launches
   * then run one block at a time on the engine's thread, so the run is slower.
   */
  kernelCounters?: boolean;
  /**
   * With `kernelCounters`: grids of more blocks run only this many, spread evenly (first and last included),
   * and their counters are scaled to the whole grid. The ops' results are then incomplete: for projections of
   * shapes too large to emulate whole, never for a run whose output matters.
   */
  sampleBlocks?: number;
}

export interface TensorOptions {
  /** Which memory counter the tensor is charged to (default 'activations'). */
  category?: MemoryCategory;
}

function resolveChoice(opts: EngineOptions): BackendChoice {
  const fromEnv = process.env.SCALEKV_BACKEND;
  const choice = opts.backend ?? (fromEnv as BackendChoice | undefined) ?? 'auto';
  if (!['auto', 'cpu', 'cuda', 'emu', 'count'].includes(choice))
    fail('ERR_INVALID_ARG', `unknown backend '${choice}' (auto, cpu, cuda, emu, count)`);
  return choice;
}

/** Which backends this build of the addon contains, and whether a CUDA device is usable now. */
export interface BackendInfo {
  built: BackendName[];
  cuda: { available: boolean; reason: string };
  /**
   * The CPU backend: what its GEMM and convolution run on (oneDNN with its version and ISA, or null: the builtin
   * kernels), and the instruction-set level its own kernels were dispatched to at load (SCALEKV_CPU_ISA caps it).
   */
  cpu: { library: string | null; isa: 'avx512' | 'avx2' | 'generic' };
}

export function backendInfo(): BackendInfo {
  const addon = loadNative();
  return { built: addon.backends() as BackendName[], cuda: addon.cudaProbe(), cpu: { library: addon.cpuLibrary() || null, isa: addon.cpuIsa() as 'avx512' | 'avx2' | 'generic' } };
}

/**
 * Creates an engine: one backend, one device, one ordered op queue. Ops validate their arguments at the
 * call and run in order; `sync()` and `Tensor.read()` wait for them without blocking the event loop.
 */
export async function createEngine(opts: EngineOptions = {}): Promise<Engine> {
  const choice = resolveChoice(opts);
  const memoryLimit = checkedMemoryLimit(opts.memoryLimit);
  if (choice === 'count') {
    const device = new CountingDevice();
    device.setMemoryLimit(memoryLimit);
    return new Engine(device, 'count');
  }
  const addon = loadNative();
  let backend: BackendName;
  let fallbackReason: string | undefined;
  if (choice === 'auto') {
    const probe = addon.cudaProbe();
    backend = probe.available ? 'cuda' : 'cpu';
    if (!probe.available) fallbackReason = probe.reason;
  } else {
    backend = choice;
  }
  const threads = opts.threads ?? availableParallelism();
  if (!Number.isInteger(threads) || threads < 1) fail('ERR_INVALID_ARG', `threads must be a positive integer, got ${threads}`);
  let native: NativeEngine;
  try {
    native = new addon.NativeEngine(backend, threads, memoryLimit);
  } catch (e) {
    rethrowNative(e);
  }
  return new Engine(native, backend, fallbackReason);
}

function checkedMemoryLimit(bytes: number | undefined): number {
  if (bytes === undefined) return 0;
  if (!Number.isSafeInteger(bytes) || bytes < 1) fail('ERR_INVALID_ARG', `memoryLimit must be a positive integer number of bytes, got ${bytes}`);
  return bytes;
}

export class Engine implements TensorOwner {
  readonly backend: BackendName;
  /** A description of the device (name, memory, threads). */
  readonly device: string;
  /** With backend 'auto', why CUDA was not chosen. */
  readonly fallbackReason?: string;
  /** Kernel-level ops (see ops.ts). */
  readonly ops: Ops;
  /** @internal */
  readonly native: NativeEngine;
  #disposed = false;
  #countingKernels = false;

  /** @internal */
  constructor(native: NativeEngine, backend: BackendName, fallbackReason?: string) {
    this.native = native;
    this.backend = backend;
    this.device = native.device;
    this.fallbackReason = fallbackReason;
    this.ops = new Ops(this);
  }

  get disposed(): boolean {
    return this.#disposed;
  }

  /** Ops accepted since the engine was created: a call its checks reject adds none. */
  get enqueued(): number {
    return this.native.enqueued();
  }

  /** A tensor holding `data` (converted to `dtype`: a Float32Array rounds into bf16/f16). */
  tensor(data: HostArray, shape: readonly number[], dtype: DType, opts: TensorOptions = {}): Tensor {
    return this.#create(dtype, shape, data, opts.category, undefined);
  }

  /** An uninitialised tensor; `fill` sets every byte (0xff makes f32/bf16 NaN: a poisoned output). */
  empty(shape: readonly number[], dtype: DType, opts: TensorOptions & { fillByte?: number } = {}): Tensor {
    return this.#create(dtype, shape, null, opts.category, opts.fillByte);
  }

  #create(dtype: DType, shape: readonly number[], data: HostArray | null, category?: MemoryCategory, fillByte?: number): Tensor {
    if (!DTYPES.includes(dtype)) fail('ERR_DTYPE', `unknown dtype '${dtype}' (${DTYPES.join(', ')})`);
    if (!Array.isArray(shape)) fail('ERR_SHAPE', 'shape must be an array of integers');
    try {
      const t = this.native.tensor(dtype, [...shape], data, category, fillByte);
      return new Tensor(this, t, shape, dtype);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** Resolves when every op queued so far has finished; rejects with the first error one of them raised. */
  async sync(): Promise<void> {
    try {
      await this.native.sync();
    } catch (e) {
      rethrowNative(e);
    }
  }

  /**
   * Resolves once the device has finished every op queued before this call, without draining the queue: neither
   * this thread nor the engine's queue waits for the device, so ops queued after it keep the device busy (a
   * progress mark; on CUDA an event on the stream). Markers resolve in call order, and before any `sync()` or
   * `read()` called after them settles. A marker never rejects for the ops' errors: those stay pending for the
   * next `sync()` or `read()`. Rejects with ERR_DISPOSED on a disposed engine; one made before `dispose()`
   * still resolves once the queue has drained.
   */
  async marker(): Promise<void> {
    try {
      await this.native.marker();
    } catch (e) {
      rethrowNative(e);
    }
  }

  /**
   * Starts an op profile: from now on every op is bracketed by timing marks in queue order (CUDA events on the
   * GPU, the host clock on CPU and emu), so device time is measured without synchronising per op. Clears any
   * previous profile.
   */
  startProfiling(opts: ProfilingOptions = {}): void {
    if (opts.kernelCounters && this.backend !== 'emu') fail('ERR_BACKEND_UNAVAILABLE', `startProfiling: kernel counters need the emu backend (this engine runs on ${this.backend})`);
    try {
      this.native.setProfiling(true, opts.kernelCounters ?? false, opts.sampleBlocks ?? 0);
      this.#countingKernels = opts.kernelCounters ?? false;
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** Waits for the queued work, stops profiling and returns per-op counts and times, slowest first. */
  async stopProfiling(): Promise<OpProfileEntry[]> {
    try {
      await this.sync();
    } catch (e) {
      this.native.setProfiling(false);
      throw e;
    }
    const raw = this.native.profile();
    const launches = new Map<string, KernelLaunch[]>();
    for (const { op, ...launch } of this.native.kernelCounters()) {
      const list = launches.get(op) ?? [];
      list.push(launch);
      launches.set(op, list);
    }
    this.native.setProfiling(false);
    if (this.#countingKernels) {
      // The counters are the process's, switched off on the queue thread: free for another engine once this resolves.
      this.#countingKernels = false;
      await this.sync();
    }
    return Object.entries(raw)
      .map(([label, p]): OpProfileEntry => {
        const colon = label.indexOf(':');
        const entry: OpProfileEntry = colon < 0 ? { op: label, count: p.count, ms: p.ms } : { op: label.slice(0, colon), path: label.slice(colon + 1), count: p.count, ms: p.ms };
        const l = launches.get(label);
        if (l) entry.launches = l;
        return entry;
      })
      .sort((a, b) => b.ms - a.ms);
  }

  memory(): MemoryStats {
    const m = this.native.memory();
    return {
      inUse: m.inUse as Record<MemoryCategory, number>,
      peak: m.peak as Record<MemoryCategory, number>,
      totalInUse: m.totalInUse,
      totalPeak: m.totalPeak,
      reserved: m.reserved,
      reservedPeak: m.reservedPeak,
    };
  }

  /**
   * Caps the bytes the engine holds on its device from now on (undefined: no cap), as EngineOptions.memoryLimit; a
   * cap below what it holds already fails the next allocation that needs new device memory, not the held tensors.
   */
  setMemoryLimit(bytes: number | undefined): void {
    const limit = checkedMemoryLimit(bytes);
    try {
      this.native.setMemoryLimit(limit);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** Frees the cached memory of disposed tensors (after the work already queued). */
  trimCache(): void {
    try {
      this.native.trimCache();
    } catch (e) {
      rethrowNative(e);
    }
  }

  /**
   * Places the allocations that follow by a static memory plan (lib/memory-plan.ts) in one arena, allocated now:
   * allocation i takes offset i of the plan when it is no larger than planned. The first that is not ends the
   * placing (it and the rest come from the caching allocator: slower to reserve, never unsafe). Once
   * `endMemoryPlan()` has been called and the last tensor placed in it is disposed, the arena joins the cache of
   * released blocks, where the next plan takes it back (`trimCache()` frees it). The arena takes the cache's place:
   * a cached block as large serves as the arena, the others are returned to the device first (after the work
   * already queued, which this call waits for).
   */
  beginMemoryPlan(plan: StaticMemoryPlan): void {
    try {
      this.native.beginMemoryPlan(plan.sizes, plan.offsets, plan.total);
    } catch (e) {
      rethrowNative(e);
    }
  }

  /** Ends the placing of the plan begun last; says how many allocations it placed and whether the work left it. */
  endMemoryPlan(): MemoryPlanReport {
    return this.native.endMemoryPlan();
  }

  /** Runs `work` with its allocations placed by `plan` (see beginMemoryPlan), ending the plan however it ends. */
  async withMemoryPlan<T>(plan: StaticMemoryPlan, work: () => Promise<T>): Promise<{ result: T; plan: MemoryPlanReport }> {
    this.beginMemoryPlan(plan);
    let report: MemoryPlanReport | undefined;
    try {
      const result = await work();
      report = this.endMemoryPlan();
      return { result, plan: report };
    } finally {
      if (!report) this.endMemoryPlan();
    }
  }

  /** Stops the queue after the work already queued; tensors still alive release their memory when disposed. */
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.native.dispose();
  }

  /** @internal */
  checkOwn(t: Tensor, what: string): void {
    if (!(t instanceof Tensor)) fail('ERR_INVALID_ARG', `${what} must be a Tensor`);
    if (t.engine !== this) fail('ERR_INVALID_ARG', `${what} belongs to another engine`);
    if (t.disposed) throw new ScaleKVError('ERR_DISPOSED', `${what}: tensor was disposed`);
  }
}
