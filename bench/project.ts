/**
 * `npm run bench -- --backend emu --project h100`: the CUDA kernels at Infinity-2B's shapes, run on the emulator
 * with its cost counters (sampled grids), projected onto a GPU by bench/projection.ts. Every time and rate here is
 * *projected*, never measured; the table says so and names the device constants it assumes.
 */
import { join } from 'node:path';
import type { Engine, KernelLaunch } from '../lib/engine.js';
import { rand } from './random.js';
import { DEVICES, loadKernelResources, projectLaunch, type DeviceModel, type KernelResources, type ProjectedLaunch } from './projection.js';
import { kvPageTokensFor } from '../lib/kv/cache.js';

export interface ProjectedRow {
  op: string;
  shape: string;
  path: string;
  launches: (ProjectedLaunch & { launch: KernelLaunch })[];
  seconds: number;
  flops: number;
}

/** Runs `fn` (which queues one op) with the counters on; the op's launches projected onto `device`. */
export async function projectOp(e: Engine, device: DeviceModel, resources: Map<string, KernelResources>, op: string, shape: string, fn: () => void, sampleBlocks: number): Promise<ProjectedRow> {
  e.startProfiling({ kernelCounters: true, sampleBlocks });
  fn();
  const entries = (await e.stopProfiling()).filter((p) => p.op === op);
  if (entries.length !== 1 || !entries[0].launches) throw new Error(`bench --project: expected one profile entry with launches for ${op}, got ${entries.length}`);
  const launches = entries[0].launches.map((launch) => ({ ...projectLaunch(launch, device, resources), launch }));
  return {
    op,
    shape,
    path: entries[0].path ?? 'kernel',
    launches,
    seconds: launches.reduce((s, l) => s + l.seconds, 0),
    flops: launches.reduce((s, l) => s + l.flops, 0),
  };
}

/** The block Linears (and the fused residual of the branch-ending ones), attention and VAE convolutions of one Infinity-2B image at 1024² (CFG: 2 rows). */
export async function projectKernels(e: Engine, deviceName: string, opts: { sampleBlocks: number; buildDir: string }): Promise<ProjectedRow[]> {
  const device = DEVICES[deviceName];
  if (!device) throw new Error(`bench --project: unknown device '${deviceName}' (known: ${Object.keys(DEVICES).join(', ')})`);
  const resources = loadKernelResources(opts.buildDir);
  const rows: ProjectedRow[] = [];
  const tokens = 2 * 4096;
  for (const [n, k, what] of [
    [6144, 2048, 'mat_qkv'],
    [2048, 2048, 'proj / ca.mat_q / ca.proj'],
    [8192, 2048, 'ffn.fc1'],
    [2048, 8192, 'ffn.fc2'],
  ] as const) {
    for (const dtype of ['f32 x bf16', 'bf16'] as const) {
      const x = e.tensor(rand(tokens * k, 1), [tokens, k], dtype === 'bf16' ? 'bf16' : 'f32');
      const w = e.tensor(rand(n * k, 2), [n, k], 'bf16');
      const y = e.empty([tokens, n], dtype === 'bf16' ? 'bf16' : 'f32');
      rows.push(await projectOp(e, device, resources, 'gemm', `${tokens} x ${n} x ${k} (2B ${what}), ${dtype}`, () => e.ops.gemm({ x, w, y }), opts.sampleBlocks));
      for (const t of [x, w, y]) t.dispose();
    }
  }
  // The Linears that end a branch: gemm into an f32 tensor then gatedResidual (as the model ran them), against
  // gemmResidual, which adds into the residual stream in the GEMM's epilogue.
  for (const [k, xDtype, what] of [[2048, 'f32', 'proj'], [8192, 'bf16', 'ffn.fc2']] as const) {
    const n = 2048;
    const x = e.tensor(rand(tokens * k, 5), [1, tokens, k], xDtype);
    const w = e.tensor(rand(n * k, 6), [n, k], 'bf16');
    const residual = e.tensor(rand(tokens * n, 7), [1, tokens, n], 'f32');
    const gate = e.tensor(rand(6 * n, 8), [1, 6, n], 'f32');
    const product = e.empty([1, tokens, n], 'f32');
    const shape = `${tokens} x ${n} x ${k} (2B ${what}), ${xDtype === 'bf16' ? 'bf16' : 'f32 x bf16'}, + gated residual`;
    const gemm = await projectOp(e, device, resources, 'gemm', shape, () => e.ops.gemm({ x, w, y: product }), opts.sampleBlocks);
    const add = await projectOp(e, device, resources, 'gated_residual', shape, () => e.ops.gatedResidual({ x: residual, y: product, gate: { table: gate, slot: 1 } }), opts.sampleBlocks);
    rows.push({ ...gemm, op: 'gemm + gatedResidual', launches: [...gemm.launches, ...add.launches], seconds: gemm.seconds + add.seconds, flops: gemm.flops + add.flops });
    rows.push(await projectOp(e, device, resources, 'gemm_residual', shape, () => e.ops.gemmResidual({ x, w, y: residual, gate: { table: gate, slot: 1 } }), opts.sampleBlocks));
    for (const t of [x, w, residual, gate, product]) t.dispose();
  }
  const heads = 16;
  const d = 128;
  // The last scale's attention: the full cache, ScaleKV 10 % gathered from a full history (the reference's way),
  // and ScaleKV 10 % kept in the KV arena, contiguous and in shuffled pages of the GPU's size (paged / contiguous: the
  // cost of the page table).
  for (const [hist, lc, layout] of [
    [6425, 4096, 'contiguous'],
    [650, 4096, 'gathered'],
    [650, 4096, 'contiguous'],
    [650, 4096, 'paged'],
  ] as const) {
    const rowsR = 2;
    const P = kvPageTokensFor('cuda');
    const sh = (l: number) => [rowsR, heads, l, d];
    const capacity = layout === 'gathered' ? 6425 : hist;
    const tablePages = Math.ceil(capacity / P);
    const pages = 2 * rowsR * tablePages;
    const poolShape = layout === 'paged' ? [pages, heads, P, d] : sh(capacity);
    const poolElements = poolShape.reduce((a, b) => a * b, 1);
    const q = e.tensor(rand(rowsR * heads * 4096 * d, 3), sh(4096), 'bf16');
    const hk = e.tensor(rand(poolElements, 4), poolShape, 'bf16');
    const hv = e.tensor(rand(poolElements, 5), poolShape, 'bf16');
    const ck = e.tensor(rand(rowsR * heads * lc * d, 6), sh(lc), 'bf16');
    const cv = e.tensor(rand(rowsR * heads * lc * d, 7), sh(lc), 'bf16');
    const out = e.empty(sh(4096), 'bf16');
    const gather = layout === 'gathered' ? Int32Array.from({ length: rowsR * heads * hist }, (_, i) => Math.floor(((i % hist) * capacity) / hist)) : undefined;
    // Every other page of the pool, rows interleaved: no two consecutive history pages are adjacent.
    const pageTable = layout === 'paged' ? Int32Array.from({ length: rowsR * tablePages }, (_, i) => 2 * ((i % tablePages) * rowsR + Math.floor(i / tablePages))) : undefined;
    const shape = `rows ${rowsR} x heads ${heads}, Lq 4096, keys ${hist}${layout === 'gathered' ? ' gathered' : layout === 'paged' ? ` in ${P}-token pages` : ''}+${lc}, D ${d}, bf16`;
    rows.push(
      await projectOp(e, device, resources, 'attention', shape, () => e.ops.attention({ q, history: { k: hk, v: hv, len: capacity, gather, pageTable }, current: { k: ck, v: cv }, out, scale: 1 / Math.sqrt(d) }), opts.sampleBlocks),
    );
    for (const t of [q, hk, hv, ck, cv, out]) t.dispose();
  }
  for (const [channels, size] of [
    [512, 64],
    [512, 128],
    [512, 256],
    [256, 512],
    [128, 1024],
  ] as const) {
    const input = e.tensor(rand(channels * size * size, 8), [1, channels, size, size], 'bf16');
    const weight = e.tensor(rand(channels * channels * 9, 9), [channels, channels, 3, 3], 'bf16');
    const bias = e.tensor(rand(channels, 10), [channels], 'bf16');
    const out = e.empty([1, channels, size, size], 'bf16');
    rows.push(await projectOp(e, device, resources, 'conv2d', `[1, ${channels}, ${size}, ${size}] 3x3 -> ${channels} (2B VAE), bf16`, () => e.ops.conv2d({ input, weight, bias, out }), opts.sampleBlocks));
    for (const t of [input, weight, bias, out]) t.dispose();
  }
  return rows;
}

const fmt = (v: number, digits = 1) => (Number.isFinite(v) ? v.toFixed(digits) : '-');

export function formatProjection(rows: ProjectedRow[], deviceName: string, sampleBlocks: number): string {
  const device = DEVICES[deviceName];
  const header = ['op', 'shape', 'path', 'kernel', 'regs', 'blocks/SM', 'tensor GFLOP', 'DRAM MB', 'L2 sectors (M)', 'coalesced', 'smem wavefronts (M)', 'bank ×', 'bound', 'projected µs', 'projected TFLOP/s'];
  const table: string[][] = [];
  for (const r of rows) {
    for (const l of r.launches) {
      const c = l.launch.counters;
      table.push([
        r.op,
        r.shape,
        r.path,
        l.kernel,
        l.registers !== undefined ? String(l.registers) : '?',
        String(l.blocksPerSm),
        fmt((c.tensorFlops ?? 0) / 1e9, 1),
        fmt(((c.dramReadBytes ?? 0) + (c.dramWriteBytes ?? 0)) / 1e6, 1),
        fmt(((c.globalLoadSectors ?? 0) + (c.globalStoreSectors ?? 0)) / 1e6, 2),
        `${fmt(100 * l.coalescing, 0)} %`,
        fmt(((c.sharedLoadWavefronts ?? 0) + (c.sharedStoreWavefronts ?? 0)) / 1e6, 2),
        fmt(l.bankConflictFactor, 2),
        l.bound,
        fmt(l.seconds * 1e6, 1),
        fmt(l.flops / l.seconds / 1e12, 0),
      ]);
    }
    if (r.launches.length > 1) table.push([r.op, r.shape, r.path, '(op total)', '', '', '', '', '', '', '', '', '', fmt(r.seconds * 1e6, 1), fmt(r.flops / r.seconds / 1e12, 0)]);
  }
  const widths = header.map((h, i) => Math.max(h.length, ...table.map((row) => row[i].length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(' | ')} |`;
  const constants = Object.entries(device.sources)
    .map(([what, src]) => `  ${what}: ${src}`)
    .join('\n');
  return [
    `PROJECTED onto ${device.name} from the emulator's cost counters (not measured; grids sampled at ${sampleBlocks} blocks and scaled).`,
    `Device constants assumed:\n${constants}`,
    line(header),
    line(widths.map((w) => '-'.repeat(w))),
    ...table.map(line),
  ].join('\n');
}

export const defaultBuildDir = (root: string) => join(root, 'build-cmake');
