// Conformance of the BSQ code arithmetic (spec sec. 9) against the `bsq_codes` golden fixture: bit labels to
// codes (exact), the running sum at the final latent size and the next-scale input (bilinear, align_corners=False).
import { join } from 'node:path';
import type { Engine, Tensor } from '../engine.js';
import { scaleSchedule, PixelBudget } from '../model/schedule.js';
import { SafetensorsFile } from '../safetensors.js';
import { Check, diffCheck, matchCheck, relCheck } from './compare.js';

export const BSQ_TOLERANCE = 1e-5;

type Triple = [number, number, number];

export interface BsqCodesManifest {
  case: string;
  codebook_dim: number;
  B?: number;
  schedules: { tag: string; h_div_w: number; pn: string; scale_schedule: Triple[] }[];
}

const pad2 = (n: number) => String(n).padStart(2, '0');

export async function verifyBsqCodes(engine: Engine, manifest: BsqCodesManifest, dir: string): Promise<Check[]> {
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  const checks: Check[] = [];
  const live: Tensor[] = [];
  const keep = <T extends Tensor>(t: T) => (live.push(t), t);
  try {
    for (const sched of manifest.schedules ?? []) {
      const { tag } = sched;
      const grids = sched.scale_schedule.map(([, h, w]) => [h, w] as [number, number]);
      try {
        const ours = scaleSchedule({ aspect: sched.h_div_w, pn: sched.pn as PixelBudget }).scales;
        checks.push(matchCheck(`${tag}/schedule`, JSON.stringify(ours) === JSON.stringify(grids), `scaleSchedule = ${JSON.stringify(ours)}`));
      } catch (e) {
        checks.push(matchCheck(`${tag}/schedule`, false, (e as Error).message));
      }
      const d = manifest.codebook_dim;
      const B = io.entry(`${tag}/s00/bits`).shape[0];
      const [H, W] = grids[grids.length - 1];
      const summed = keep(engine.tensor(new Float32Array(B * d * H * W), [B, d, H, W], 'f32'));
      for (let si = 0; si < grids.length; si++) {
        const p = `${tag}/s${pad2(si)}`;
        if (!io.has(`${p}/bits`)) break;
        const [h, w] = grids[si];
        const bits = keep(engine.tensor(io.i32(`${p}/bits`), [B, h, w, d], 'i32'));
        const codes = keep(engine.empty([B, d, h, w], 'f32', { fillByte: 0xff }));
        engine.ops.bitsToCodes({ bits, out: codes });
        engine.ops.resizeBilinear({ input: codes, out: summed, accumulate: true });
        if (io.has(`${p}/codes`)) checks.push(diffCheck(`${p}/codes`, (await codes.read()) as Float32Array, io.f32(`${p}/codes`)));
        if (io.has(`${p}/summed`)) checks.push(relCheck(`${p}/summed`, (await summed.read()) as Float32Array, io.f32(`${p}/summed`), BSQ_TOLERANCE));
        if (io.has(`${p}/next_input`)) {
          const shape = io.entry(`${p}/next_input`).shape;
          const next = keep(engine.empty(shape, 'f32', { fillByte: 0xff }));
          engine.ops.resizeBilinear({ input: summed, out: next });
          checks.push(relCheck(`${p}/next_input`, (await next.read()) as Float32Array, io.f32(`${p}/next_input`), BSQ_TOLERANCE));
        }
      }
      for (const t of live.splice(0)) t.dispose();
    }
  } finally {
    for (const t of live) t.dispose();
    io.close();
  }
  return checks;
}
