// Conformance of the 2-D RoPE (spec sec. 6) against the `rope2d` golden fixture: grid positions (exact), the
// cos/sin table and the rotation of q/k, both as the engine's qkNormRope applies them (normalize off, no biases).
import { join } from 'node:path';
import type { Engine } from '../engine.js';
import { rope2dPositions } from '../model/rope2d.js';
import { scaleSchedule, PixelBudget } from '../model/schedule.js';
import { SafetensorsFile } from '../safetensors.js';
import { Check, diffCheck, matchCheck, relCheck } from './compare.js';

export const ROPE_TOLERANCE = 1e-5;

type Triple = [number, number, number];

interface GridSpec {
  tensor: string;
  h_div_w: number;
  pn: string;
  head_dim: number;
  scale_schedule: Triple[];
  normalising_1M_last_scale?: Triple;
}

interface ApplySpec {
  prefix: string;
  h_div_w: number;
  pn: string;
  head_dim: number;
  scale_ind: number;
  start_position?: number;
  scale_schedule: Triple[];
}

export interface Rope2dManifest {
  case: string;
  grids: GridSpec[];
  applies: ApplySpec[];
}

/** The (UH, UW) normalising grid: the manifest's, else the 1M template of the ratio. */
function normGrid(spec: { h_div_w: number; normalising_1M_last_scale?: Triple }): [number, number] {
  const n = spec.normalising_1M_last_scale;
  if (n) return [n[1], n[2]];
  return scaleSchedule({ aspect: spec.h_div_w, pn: '1M' }).final1M;
}

function schedulePart(spec: { h_div_w: number; pn: string; scale_schedule: Triple[] }, name: string): Check[] {
  try {
    const ours = scaleSchedule({ aspect: spec.h_div_w, pn: spec.pn as PixelBudget }).scales;
    const theirs = spec.scale_schedule.map(([, h, w]) => [h, w]);
    return [matchCheck(`${name}/schedule`, JSON.stringify(ours) === JSON.stringify(theirs), `scaleSchedule(${spec.h_div_w}, ${spec.pn}) = ${JSON.stringify(ours)}`)];
  } catch (e) {
    return [matchCheck(`${name}/schedule`, false, (e as Error).message)];
  }
}

/** Runs qkNormRope without normalisation on q/k [B, H, L, c]; returns the rotated q and k. */
async function rotate(engine: Engine, q: Float32Array, k: Float32Array, shape: readonly number[], positions: Int32Array) {
  const [B, H, L, c] = shape;
  const qkv = new Float32Array(B * L * 3 * H * c);
  for (let b = 0; b < B; b++)
    for (let h = 0; h < H; h++)
      for (let t = 0; t < L; t++) {
        const src = ((b * H + h) * L + t) * c;
        const dst = (b * L + t) * 3 * H * c + h * c;
        qkv.set(q.subarray(src, src + c), dst);
        qkv.set(k.subarray(src, src + c), dst + H * c);
      }
  const tensors = [
    engine.tensor(qkv, [B, L, 3 * H * c], 'f32'),
    engine.empty([B, H, L, c], 'f32', { fillByte: 0xff }),
    engine.empty([B, H, L, c], 'f32', { fillByte: 0xff }),
    engine.empty([B, H, L, c], 'f32', { fillByte: 0xff }),
  ];
  const [tqkv, tq, tk, tv] = tensors;
  try {
    engine.ops.qkNormRope({ qkv: tqkv, normalize: false, positions, q: tq, k: tk, v: tv, kvOffset: 0 });
    const [oq, ok] = await Promise.all([tq.read(), tk.read()]);
    return { q: oq as Float32Array, k: ok as Float32Array };
  } finally {
    for (const t of tensors) t.dispose();
  }
}

export async function verifyRope2d(engine: Engine, manifest: Rope2dManifest, dir: string): Promise<Check[]> {
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  const checks: Check[] = [];
  try {
    for (const g of manifest.grids ?? []) {
      const name = g.tensor;
      checks.push(...schedulePart(g, name));
      const positions = rope2dPositions(g.scale_schedule, normGrid(g));
      checks.push(diffCheck(`${name}/positions`, positions, io.i32(`${name}/positions`)));
      if (!io.has(`${name}/cos_sin`)) continue;
      const [, L, halfStored] = io.entry(`${name}/cos_sin`).shape;
      const want = io.f32(`${name}/cos_sin`);
      const prefix = positions.subarray(0, 2 * L);
      // The engine's own table: rotating the unit vectors (1, 0) of every pair gives (cos, sin).
      const c = 2 * halfStored;
      const unit = new Float32Array(L * c);
      for (let i = 0; i < unit.length; i += 2) unit[i] = 1;
      const { q } = await rotate(engine, unit, unit, [1, 1, L, c], prefix);
      const got = new Float32Array(2 * L * halfStored);
      for (let t = 0; t < L; t++)
        for (let p = 0; p < halfStored; p++) {
          got[t * halfStored + p] = q[t * c + 2 * p];
          got[(L + t) * halfStored + p] = q[t * c + 2 * p + 1];
        }
      checks.push(relCheck(`${name}/cos_sin`, got, want, ROPE_TOLERANCE));
    }
    for (const a of manifest.applies ?? []) {
      const name = a.prefix;
      const shape = io.entry(`${name}/q_in`).shape;
      const L = shape[2];
      const all = rope2dPositions(a.scale_schedule, normGrid(a));
      let start = 0;
      for (let s = 0; s < a.scale_ind; s++) start += a.scale_schedule[s][1] * a.scale_schedule[s][2];
      if (a.start_position !== undefined) checks.push(matchCheck(`${name}/start`, start === a.start_position, `ours ${start}, manifest ${a.start_position}`));
      const { q, k } = await rotate(engine, io.f32(`${name}/q_in`), io.f32(`${name}/k_in`), shape, all.slice(2 * start, 2 * (start + L)));
      checks.push(relCheck(`${name}/q_out`, q, io.f32(`${name}/q_out`), ROPE_TOLERANCE));
      checks.push(relCheck(`${name}/k_out`, k, io.f32(`${name}/k_out`), ROPE_TOLERANCE));
    }
  } finally {
    io.close();
  }
  return checks;
}
