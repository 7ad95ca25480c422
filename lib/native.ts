import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { currentPlatform, prebuiltAddonPath, prebuiltPackageNames } from '../scripts/prebuilt.mjs';
import { ScaleKVError } from './errors.js';
import type { NativeOpArgs, NativeOpName } from './native-ops.generated.js';

/** The raw addon surface (csrc/addon.cc). Library code goes through Engine and Tensor instead. */
export interface NativeTensor {
  readonly shape: number[];
  readonly dtype: string;
  readonly bytes: number;
  readonly disposed: boolean;
  read(): Promise<ArrayBuffer>;
  write(data: ArrayBufferView): void;
  view(shape: number[]): NativeTensor;
  dispose(): void;
}

export interface NativeMemory {
  inUse: Record<string, number>;
  peak: Record<string, number>;
  totalInUse: number;
  totalPeak: number;
  reserved: number;
  reservedPeak: number;
}

/** One native method per op of the table, taking the generated argument object. */
export type NativeOps = { [K in NativeOpName]: (args: NativeOpArgs<NativeTensor>[K]) => void };

export interface NativeEngine extends NativeOps {
  readonly backend: string;
  readonly device: string;
  tensor(dtype: string, shape: number[], data?: ArrayBufferView | null, category?: string, fillByte?: number): NativeTensor;
  sync(): Promise<void>;
  /** Resolves once the device has passed this point of the queue; never reports the ops' errors. */
  marker(): Promise<void>;
  memory(): NativeMemory;
  dispose(): void;
  setProfiling(on: boolean, kernelCounters?: boolean, sampleBlocks?: number): void;
  trimCache(): void;
  /** Caps the bytes the backend holds (0: none); an allocation past it fails with ERR_OUT_OF_MEMORY. */
  setMemoryLimit(bytes: number): void;
  /** Static memory plan (csrc/engine_core.h begin_plan): the arena is allocated now; later allocations are placed. */
  beginMemoryPlan(sizes: number[], offsets: number[], total: number): void;
  endMemoryPlan(): { placed: number; diverged: boolean };
  profile(): Record<string, { count: number; ms: number }>;
  kernelCounters(): NativeKernelLaunch[];
  /** Ops accepted since the engine was created; a call rejected by its checks adds none. */
  enqueued(): number;
}

/** One kernel launch with the emulator's cost counters (kernels/emu/emu_profile.h), as the addon reports it. */
export interface NativeKernelLaunch {
  /** The profile label of the op that launched it ('gemm', 'gemm:simt (...)'). */
  op: string;
  kernel: string;
  grid: [number, number, number];
  block: [number, number, number];
  smemBytes: number;
  /** FLOPs outside the tensor cores, as the launcher declared them (0: none declared). */
  simtFlops: number;
  /** Blocks emulated: fewer than the grid's when sampling (the counters are then scaled to the grid). */
  blocksRun: number;
  counters: Record<string, number>;
}

/** One declaration of the op table (csrc/op_table.h), as `opTable()` returns it. */
export interface OpDeclaration {
  name: NativeOpName;
  kernel: string;
  summary: string;
  /** Valid calls, one per line: "operands present | symbol=value ... | attribute=value ...". */
  examples: string;
  operands: { name: string; io: 'in' | 'out' | 'inout'; optional: boolean; dtypes: string; shape: string; mayAlias: string }[];
  attributes: {
    name: string;
    kind: 'integer' | 'number' | 'boolean' | 'choice' | 'intList';
    required: boolean;
    default?: number;
    min?: number;
    max?: number;
    choices?: string;
    length?: number;
  }[];
}

export interface NativeAddon {
  NativeEngine: new (backend: string, threads: number, memoryLimit?: number) => NativeEngine;
  NativeTensor: new () => NativeTensor;
  backends(): string[];
  /** The library the CPU backend's GEMM and convolution run on, e.g. 'oneDNN 2.6.3 (...)'; '' for the builtin kernels. */
  cpuLibrary(): string;
  /** The instruction-set level of the CPU backend's own kernels: 'avx512', 'avx2' or 'generic'. */
  cpuIsa(): string;
  /** The machine's f32 FMA peak over `threads` threads, measured for `seconds` (blocks the caller; benchmarks). */
  measureFmaPeak(threads: number, seconds: number): { gflops: number; isa: string };
  cudaProbe(): { available: boolean; reason: string };
  opTable(): OpDeclaration[];
  path: string;
}

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');

/** One place the addon may be, and what put it there. */
export interface AddonCandidate {
  path: string;
  /** 'SCALEKV_ADDON', 'source build' or the prebuilt package's name. */
  origin: string;
}

/**
 * Where the addon may be, in order: SCALEKV_ADDON, a source build of this package (cmake-js, then node-gyp: what
 * `npm install` without a fitting prebuilt, or `scalekv build`, wrote), then the installed prebuilt platform packages,
 * the CUDA one first. A prebuilt package that is not installed has no candidate.
 */
export function addonCandidates(): AddonCandidate[] {
  const list: AddonCandidate[] = [];
  if (process.env.SCALEKV_ADDON) list.push({ path: process.env.SCALEKV_ADDON, origin: 'SCALEKV_ADDON' });
  for (const dir of ['build-cmake', 'build']) list.push({ path: join(packageRoot, dir, 'Release', 'scalekv.node'), origin: 'source build' });
  for (const name of prebuiltPackageNames()) {
    const path = prebuiltAddonPath(name, packageRoot);
    if (path) list.push({ path, origin: name });
  }
  return list;
}

/** What a consumer without an addon is told to do. */
function missingAddonAdvice(): string {
  const platform = currentPlatform();
  const prebuilt = platform.unsupported ?? `no prebuilt package (${prebuiltPackageNames().join(', ')}) is installed (npm leaves optional dependencies out with --omit=optional, or when one fails to download)`;
  return `${prebuilt}; build it from source with \`npx scalekv build\` (needs CMake and a C++17 compiler; nvcc for CUDA)`;
}

let cached: NativeAddon | undefined;

export function loadNative(): NativeAddon {
  if (cached) return cached;
  // libgomp (oneDNN's OpenMP runtime, which runs the CPU ops' threads) reads this when the addon loads. Its default
  // lets idle workers spin up to 300000 times (milliseconds) after every op, which on a few cores takes the CPU
  // from the event loop and from other processes; a short spin then sleep is what the engine's own pool did.
  if (process.env.OMP_WAIT_POLICY === undefined && process.env.GOMP_SPINCOUNT === undefined) process.env.GOMP_SPINCOUNT = '10000';
  const require = createRequire(import.meta.url);
  const tried: string[] = [];
  for (const { path, origin } of addonCandidates()) {
    if (!existsSync(path)) {
      tried.push(`${path} (absent)`);
      continue;
    }
    // A build that exists but does not load is an error, never a reason to fall back silently to a
    // build with fewer backends.
    try {
      const addon = require(path) as Omit<NativeAddon, 'path'>;
      cached = { ...addon, path };
      return cached;
    } catch (e) {
      throw new ScaleKVError('ERR_NATIVE_MISSING', `scalekv native addon ${path} (${origin}) failed to load: ${(e as Error).message}`, { cause: e });
    }
  }
  throw new ScaleKVError('ERR_NATIVE_MISSING', `scalekv native addon not found: ${missingAddonAdvice()}. Tried: ${tried.join('; ')}`);
}
