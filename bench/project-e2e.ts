/**
 * A projected time per Infinity-2B image (1024², batch 1, CFG, bf16) on a named GPU: exact per-op shape
 * accounting plus counted kernels.
 *   1. The whole generation and VAE decode run on the 'count' backend (no memory, no compute), which records
 *      every op with its argument shapes and scalars: the image's exact op stream (all 32 layers, 13 scales).
 *   2. Each distinct (op, shapes, scalars) is replayed once on the emulator with fresh random inputs (index
 *      inputs synthesised valid: gathers strided over the history, windows over the last keys, segments equal),
 *      its kernel launches counted (grids sampled) and projected (bench/projection.ts).
 *   3. The image's time is the sum over the stream of each op's projection times its multiplicity.
 * Not included: the T5 text encoder, host work between launches and launch gaps beyond the per-launch floor.
 */
import { createEngine, type Engine } from '../lib/engine.js';
import type { CountingDevice } from '../lib/counting-device.js';
import { generate, decodeImage } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { preset, type InfinityConfig } from '../lib/model/presets.js';
import { scaleSchedule, type PixelBudget } from '../lib/model/schedule.js';
import { VaeDecoder } from '../lib/model/vae.js';
import type { NativeTensor } from '../lib/native.js';
import type { NativeOpName } from '../lib/native-ops.generated.js';
import type { Tensor } from '../lib/tensor.js';
import type { KvPolicy } from '../lib/kv/policy.js';
import { DEVICES, loadKernelResources, projectLaunch, type DeviceModel, type KernelResources } from './projection.js';
import { rand } from './random.js';

interface RecordedOp {
  name: NativeOpName;
  /** Tensor args as { dtype, shape }, scalars as given. */
  args: Record<string, { dtype: string; shape: number[] } | unknown>;
  count: number;
}

const isTensor = (v: unknown): v is NativeTensor => typeof v === 'object' && v !== null && 'shape' in v && 'dtype' in v && 'bytes' in v;

/** The op stream of one image on the count backend, grouped by identical (op, shapes, scalars). */
export async function recordImageOps(o: { config?: InfinityConfig; pn?: PixelBudget; kvPolicy?: (depth: number) => KvPolicy; textTokens?: number } = {}): Promise<RecordedOp[]> {
  const e = await createEngine({ backend: 'count' });
  const ops = new Map<string, RecordedOp>();
  (e.native as CountingDevice).onOp = (name, args) => {
    const summary: RecordedOp['args'] = {};
    for (const [k, v] of Object.entries(args)) if (v !== undefined) summary[k] = isTensor(v) ? { dtype: v.dtype, shape: [...v.shape] } : v;
    const key = name + JSON.stringify(summary);
    const op = ops.get(key);
    if (op) op.count++;
    else ops.set(key, { name, args: summary, count: 1 });
  };
  try {
    const c = o.config ?? preset('infinity-2b');
    const model = await InfinityModel.allocate(e, c, { dtype: 'bf16' });
    const vae = await VaeDecoder.allocate(e, { ...c.vae, weightDtype: 'bf16', dtype: 'bf16' });
    const textTokens = o.textTokens ?? 64;
    const schedule = scaleSchedule({ aspect: 1, pn: o.pn ?? '1M' }).scales;
    const r = await generate(model, {
      textFeatures: { kv: new Float32Array(textTokens * c.textChannels), lens: [textTokens] },
      schedule,
      cfg: 3,
      ...(o.kvPolicy ? { kvPolicy: o.kvPolicy(c.depth) } : {}),
    });
    await decodeImage(vae, r.summedCodes);
    r.summedCodes.dispose();
    model.dispose();
    vae.dispose();
  } finally {
    e.dispose();
  }
  return [...ops.values()];
}

const spread = (n: number, bound: number) => Int32Array.from({ length: n }, (_, i) => Math.min(bound - 1, Math.floor((i * bound) / Math.max(n, 1))));
const repeatRows = (perRow: Int32Array, rows: number) => {
  const out = new Int32Array(perRow.length * rows);
  for (let r = 0; r < rows; r++) out.set(perRow, r * perRow.length);
  return out;
};

/** Valid contents for an op's integer inputs, from its other arguments; undefined: random floats / bits. */
function indexData(op: RecordedOp, arg: string, shape: number[]): Int32Array | undefined {
  const a = op.args as Record<string, { shape: number[] } & Record<string, number>>;
  const num = (k: string) => (op.args[k] as number | undefined) ?? 0;
  const last = shape[shape.length - 1];
  const lead = shape.slice(0, -1).reduce((x, y) => x * y, 1);
  switch (`${op.name}.${arg}`) {
    case 'attention.gather':
      return repeatRows(spread(last, Math.max(num('histLen'), 1)), lead);
    case 'attention.windowRows':
      return spread(last, a.q.shape[2]);
    case 'evictCompact.keep':
      return repeatRows(spread(last, num('histLen') + (a.curK?.shape[2] ?? 0)), lead);
    case 'selection.windowKeys': {
      const nKeys = a.logits.shape[3];
      return Int32Array.from({ length: last }, (_, i) => nKeys - last + i);
    }
    case 'segmentAttention.cuSeqlens':
      return Int32Array.from({ length: last }, (_, i) => Math.floor((i * a.qkv.shape[0]) / (last - 1)));
    case 'crossAttention.cuSeqlens': {
      const n = (a.kv ?? a.k).shape[0];
      return Int32Array.from({ length: last }, (_, i) => Math.floor((i * n) / (last - 1)));
    }
    case 'crossAttention.kvStarts': {
      const n = (a.kv ?? a.k).shape[0];
      return Int32Array.from({ length: last }, (_, i) => Math.floor((i * n) / last));
    }
    case 'attention.pageTable':
    case 'evictCompact.pageTable':
    case 'qkNormRope.pageTable': {
      // Rows take the pool's pages in turn (an arena after many compactions is shuffled; the cost is the same).
      const pages = (a.histK ?? a.k).shape[0];
      return Int32Array.from({ length: lead * last }, (_, i) => i % pages);
    }
    case 'qkNormRope.positions':
      return Int32Array.from({ length: shape[0] * 2 }, (_, i) => {
        const token = Math.floor(i / 2);
        return i % 2 === 0 ? Math.floor(token / 64) : token % 64;
      });
  }
  return undefined;
}

function inputTensor(e: Engine, op: RecordedOp, arg: string, t: { dtype: string; shape: number[] }, seed: number): Tensor {
  const n = t.shape.reduce((x, y) => x * y, 1);
  const idx = t.dtype === 'i32' ? indexData(op, arg, t.shape) : undefined;
  if (idx) return e.tensor(idx, t.shape, 'i32');
  if (t.dtype === 'i32' || t.dtype === 'u8') {
    const bits = Int32Array.from(rand(n, seed), (v) => (v > 0 ? 1 : 0));
    return t.dtype === 'u8' ? e.tensor(Uint8Array.from(bits), t.shape, 'u8') : e.tensor(bits, t.shape, 'i32');
  }
  return e.tensor(rand(n, seed), t.shape, t.dtype as 'f32' | 'bf16');
}

export interface ProjectedOp {
  name: string;
  path: string;
  shapes: string;
  count: number;
  /** Projected seconds of one call. */
  seconds: number;
  flops: number;
  /** Of which on tensor cores. */
  tensorFlops: number;
  /** The dtype of the op's weight / main operand (gemm w, conv2d weight, attention q), when it has one. */
  operandDtype?: string;
  launches: number;
}

/** Replays each recorded op once on the emulator with the counters on and projects it onto `device`. */
export async function projectOps(e: Engine, ops: RecordedOp[], device: DeviceModel, resources: Map<string, KernelResources>, sampleBlocks: number, onOp?: (i: number, n: number) => void): Promise<ProjectedOp[]> {
  const out: ProjectedOp[] = [];
  for (const [i, op] of ops.entries()) {
    onOp?.(i, ops.length);
    const tensors: Tensor[] = [];
    const args: Record<string, unknown> = {};
    let seed = 1;
    for (const [k, v] of Object.entries(op.args)) {
      if (typeof v === 'object' && v !== null && 'shape' in v && 'dtype' in v) {
        const t = inputTensor(e, op, k, v as { dtype: string; shape: number[] }, seed++);
        tensors.push(t);
        args[k] = t.native;
      } else args[k] = v;
    }
    try {
      e.startProfiling({ kernelCounters: true, sampleBlocks });
      (e.native as unknown as Record<string, (a: unknown) => void>)[op.name](args);
      const entries = await e.stopProfiling();
      const launches = entries.flatMap((p) => p.launches ?? []);
      const projected = launches.map((l) => projectLaunch(l, device, resources));
      out.push({
        name: op.name,
        path: entries.map((p) => p.path).find((p) => p !== undefined) ?? 'kernel',
        shapes: Object.entries(op.args)
          .filter(([, v]) => typeof v === 'object' && v !== null && 'shape' in v)
          .map(([k, v]) => `${k}[${(v as { shape: number[] }).shape.join(',')}]${(v as { dtype: string }).dtype}`)
          .join(' '),
        count: op.count,
        seconds: projected.reduce((s, p) => s + p.seconds, 0),
        flops: projected.reduce((s, p) => s + p.flops, 0),
        tensorFlops: launches.reduce((s, l) => s + (l.counters.tensorFlops ?? 0), 0),
        operandDtype: ((op.args.w ?? op.args.weight ?? op.args.q) as { dtype?: string } | undefined)?.dtype,
        launches: launches.length,
      });
    } finally {
      for (const t of tensors) t.dispose();
    }
  }
  return out;
}

export async function projectImage(deviceName: string, o: { sampleBlocks: number; buildDir: string; kvPolicy?: (depth: number) => KvPolicy; onOp?: (i: number, n: number) => void }): Promise<ProjectedOp[]> {
  const device = DEVICES[deviceName];
  if (!device) throw new Error(`unknown device '${deviceName}'`);
  const ops = await recordImageOps({ kvPolicy: o.kvPolicy });
  const e = await createEngine({ backend: 'emu' });
  try {
    return await projectOps(e, ops, device, loadKernelResources(o.buildDir), o.sampleBlocks, o.onOp);
  } finally {
    e.dispose();
  }
}

/** Per op family: calls, projected ms per image, share, projected TFLOP/s; then the total and any slow paths. */
export function formatImageProjection(ops: ProjectedOp[], deviceName: string, kv = 'full'): string {
  const families = new Map<string, { calls: number; seconds: number; flops: number }>();
  for (const op of ops) {
    const key = op.path === 'kernel' ? op.name : `${op.name}:${op.path}`;
    const f = families.get(key) ?? { calls: 0, seconds: 0, flops: 0 };
    f.calls += op.count;
    f.seconds += op.seconds * op.count;
    f.flops += op.flops * op.count;
    families.set(key, f);
  }
  const total = [...families.values()].reduce((s, f) => s + f.seconds, 0);
  const rows = [...families.entries()].sort((a, b) => b[1].seconds - a[1].seconds);
  const lines = [
    `PROJECTED per Infinity-2B image (1024², batch 1, CFG, bf16 blocks and VAE, KV policy ${kv}) on ${DEVICES[deviceName].name}: exact op stream (count backend) x per-shape emulator counters; not measured.`,
    '| op (path) | calls | projected ms | share | projected TFLOP/s |',
    '| --- | --- | --- | --- | --- |',
    ...rows.map(([k, f]) => `| ${k} | ${f.calls} | ${(f.seconds * 1e3).toFixed(2)} | ${((100 * f.seconds) / total).toFixed(1)} % | ${f.flops > 0 ? (f.flops / f.seconds / 1e12).toFixed(0) : '-'} |`),
    `| **total** | ${rows.reduce((s, [, f]) => s + f.calls, 0)} | **${(total * 1e3).toFixed(1)}** | | |`,
  ];
  const slow = ops.filter((op) => op.path !== 'kernel');
  lines.push(slow.length === 0 ? 'Slow paths taken: none.' : `Slow paths taken: ${slow.map((op) => `${op.name}:${op.path} x${op.count} (${op.shapes})`).join('; ')}`);
  return lines.join('\n');
}
