/**
 * A roofline projection of kernel launches onto a named GPU, from the emulator's cost counters
 * (kernels/emu/emu_profile.h, `engine.startProfiling({ kernelCounters: true })`). Every figure it produces is
 * *projected*: a bound from counted work and published peaks, not a measurement.
 *
 * Per launch, each resource's time is its counted work over its peak, derated by how much of the GPU the grid
 * can occupy:
 *   tensor  mma FLOPs / dense bf16 tensor peak        simt   declared FLOPs / f32 FMA peak
 *   dram    distinct sectors read + written / HBM      l2     all global sectors (32 B) / L2 bandwidth
 *   smem    shared-memory wavefronts / (SMs x 1 per clock)
 * and the launch takes the largest of them (perfect overlap), but no less than the launch floor. Occupancy:
 * blocks per SM from threads, shared memory and (when ptxas's report is found) registers; a grid of fewer blocks
 * than SMs uses that fraction of the GPU; a grid of several waves loses its last wave's empty slots.
 * Not modelled: latency (dependent loads, barriers with few warps), L1 hits, instruction issue limits.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { KernelLaunch } from '../lib/engine.js';

export interface DeviceModel {
  name: string;
  sms: number;
  /** SM clock (Hz) the SIMT and shared-memory peaks assume. */
  clockHz: number;
  tensorBf16Flops: number;
  simtF32Flops: number;
  hbmBytesPerS: number;
  l2BytesPerS: number;
  /** Shared-memory wavefronts (128 B) each SM serves per clock. */
  smemWavefrontsPerClock: number;
  maxThreadsPerSm: number;
  maxBlocksPerSm: number;
  registersPerSm: number;
  smemBytesPerSm: number;
  /** Shared memory the runtime reserves per resident block. */
  smemReservedPerBlock: number;
  /** No launch takes less (launch latency plus the kernel's ramp), seconds. */
  launchFloorS: number;
  /** Where each constant comes from. */
  sources: Record<string, string>;
}

export const DEVICES: Record<string, DeviceModel> = {
  h100: {
    name: 'H100 SXM5 80GB',
    sms: 132,
    clockHz: 1.98e9,
    tensorBf16Flops: 989.4e12,
    simtF32Flops: 66.9e12,
    hbmBytesPerS: 3.35e12,
    l2BytesPerS: 7.0e12,
    smemWavefrontsPerClock: 1,
    maxThreadsPerSm: 2048,
    maxBlocksPerSm: 32,
    registersPerSm: 65536,
    smemBytesPerSm: 228 * 1024,
    smemReservedPerBlock: 1024,
    launchFloorS: 2e-6,
    sources: {
      'tensor bf16 989.4 TFLOP/s (dense), f32 66.9 TFLOP/s, HBM3 3.35 TB/s, 132 SMs': 'NVIDIA H100 Tensor Core GPU datasheet (SXM5 column)',
      'clock 1.98 GHz': 'implied by the f32 peak: 132 SMs x 128 FP32 lanes x 2 FLOP x 1.98 GHz = 66.9 TFLOP/s',
      'shared memory 128 B per clock per SM (33.4 TB/s aggregate)': 'NVIDIA Hopper tuning guide / H100 whitepaper (32 banks x 4 B)',
      'threads 2048, blocks 32, registers 64K, shared memory 228 KiB per SM, 1 KiB reserved per block': 'CUDA C++ Programming Guide, compute capability 9.0 table',
      'L2 7 TB/s': 'assumption: NVIDIA publishes no L2 bandwidth; third-party microbenchmarks of H100 report several TB/s (between HBM and shared memory)',
      'launch floor 2 us': 'assumption: launch latency plus ramp of a small kernel on one stream (lower with CUDA graphs)',
    },
  },
};

/** ptxas's report for one kernel on one architecture. */
export interface KernelResources {
  registers: number;
  spillBytes: number;
  stackBytes: number;
}

/** "void scalekv::cuda_ops::(anonymous namespace)::k<64, 4>(Params)" -> "k<64, 4>", as the emulator names kernels. */
export function shortKernelName(demangled: string): string {
  const s = demangled.replaceAll('(anonymous namespace)::', '');
  let depth = 0;
  let start = 0;
  let end = s.length;
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (c === '<') depth++;
    else if (c === '>') depth--;
    else if (depth === 0 && c === '(') {
      end = i;
      break;
    } else if (depth === 0 && c === ' ') start = i + 1;
    else if (depth === 0 && c === ':' && s[i + 1] === ':') start = i + 2;
  }
  return s.slice(start, end);
}

/**
 * Registers and spills per kernel from the reports the CUDA build leaves next to its objects
 * (scripts/ptxas-resources.sh), for architecture `arch` ('sm_90'). Empty when the CUDA backend was not built
 * here or c++filt is missing.
 */
export function loadKernelResources(buildDir: string, arch = 'sm_90'): Map<string, KernelResources> {
  const out = new Map<string, KernelResources>();
  const dir = join(buildDir, 'CMakeFiles', 'skv_cuda.dir', 'kernels', 'cuda');
  if (!existsSync(dir)) return out;
  const entries: { mangled: string; res: KernelResources }[] = [];
  for (const file of readdirSync(dir).filter((f) => f.endsWith('.resources.txt'))) {
    let current: { mangled: string; res: KernelResources } | null = null;
    for (const line of readFileSync(join(dir, file), 'utf8').split('\n')) {
      const entry = /Compiling entry function '([^']+)' for '([^']+)'/.exec(line);
      if (entry) {
        current = entry[2] === arch ? { mangled: entry[1], res: { registers: 0, spillBytes: 0, stackBytes: 0 } } : null;
        if (current) entries.push(current);
        continue;
      }
      if (!current) continue;
      const frame = /(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads/.exec(line);
      if (frame) {
        current.res.stackBytes = Number(frame[1]);
        current.res.spillBytes = Number(frame[2]) + Number(frame[3]);
      }
      const used = /Used (\d+) registers/.exec(line);
      if (used) current.res.registers = Number(used[1]);
    }
  }
  if (entries.length === 0) return out;
  let names: string[];
  try {
    names = execFileSync('c++filt', { input: entries.map((e) => e.mangled).join('\n') + '\n', encoding: 'utf8' }).trimEnd().split('\n');
  } catch {
    return out;
  }
  entries.forEach((e, i) => out.set(shortKernelName(names[i] ?? e.mangled), e.res));
  return out;
}

export type Bound = 'tensor' | 'simt' | 'dram' | 'l2' | 'smem' | 'launch';

export interface ProjectedLaunch {
  kernel: string;
  seconds: number;
  bound: Bound;
  /** Per-resource times (s) before taking the largest. */
  terms: Record<Exclude<Bound, 'launch'>, number>;
  flops: number;
  /** Useful bytes / sector bytes of global loads and stores (1 = perfectly coalesced). */
  coalescing: number;
  /** Shared-memory wavefronts / conflict-free wavefronts (1 = no bank conflicts). */
  bankConflictFactor: number;
  blocksPerSm: number;
  /** Fraction of the GPU's throughput the grid can use (SMs busy, last-wave tail). */
  utilisation: number;
  registers?: number;
}

export function blocksPerSm(l: KernelLaunch, d: DeviceModel, registers?: number): number {
  const threads = l.block[0] * l.block[1] * l.block[2];
  const warps = Math.ceil(threads / 32);
  let n = Math.min(d.maxBlocksPerSm, Math.floor(d.maxThreadsPerSm / (warps * 32)));
  n = Math.min(n, Math.floor(d.smemBytesPerSm / (l.smemBytes + d.smemReservedPerBlock)));
  if (registers) {
    const perWarp = Math.ceil((Math.ceil(registers / 8) * 8 * 32) / 256) * 256;
    n = Math.min(n, Math.floor(Math.floor(d.registersPerSm / perWarp) / warps));
  }
  return Math.max(n, 0);
}

export function projectLaunch(l: KernelLaunch, d: DeviceModel, resources?: Map<string, KernelResources>): ProjectedLaunch {
  const c = (name: string) => l.counters[name] ?? 0;
  const registers = resources?.get(l.kernel)?.registers;
  const perSm = blocksPerSm(l, d, registers);
  const blocks = l.grid[0] * l.grid[1] * l.grid[2];
  const slots = d.sms * Math.max(perSm, 1);
  const waves = Math.ceil(blocks / slots);
  const utilisation = blocks <= slots ? Math.min(1, blocks / d.sms) : blocks / (waves * slots);
  const sectorBytes = 32 * (c('globalLoadSectors') + c('globalStoreSectors'));
  const wavefronts = c('sharedLoadWavefronts') + c('sharedStoreWavefronts');
  const ideal = c('sharedLoadIdealWavefronts') + c('sharedStoreIdealWavefronts');
  const terms = {
    tensor: c('tensorFlops') / d.tensorBf16Flops / utilisation,
    simt: l.simtFlops / d.simtF32Flops / utilisation,
    dram: (c('dramReadBytes') + c('dramWriteBytes')) / d.hbmBytesPerS / utilisation,
    l2: sectorBytes / d.l2BytesPerS / utilisation,
    smem: wavefronts / (d.sms * d.smemWavefrontsPerClock * d.clockHz) / utilisation,
  };
  let bound: Bound = 'launch';
  let seconds = d.launchFloorS;
  for (const [k, v] of Object.entries(terms) as [Exclude<Bound, 'launch'>, number][])
    if (v > seconds) {
      seconds = v;
      bound = k;
    }
  const useful = c('globalLoadBytes') + c('globalStoreBytes');
  return {
    kernel: l.kernel,
    seconds,
    bound,
    terms,
    flops: c('tensorFlops') + l.simtFlops,
    coalescing: sectorBytes > 0 ? useful / sectorBytes : 1,
    bankConflictFactor: ideal > 0 ? wavefronts / ideal : 1,
    blocksPerSm: perSm,
    utilisation,
    ...(registers !== undefined ? { registers } : {}),
  };
}
