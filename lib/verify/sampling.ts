// Conformance of the deterministic part of the official top-k / top-p sampler (spec sec. 8) against the
// `sampling` golden fixture: masked logits and keep masks, both exact.
import { join } from 'node:path';
import type { Engine } from '../engine.js';
import { SafetensorsFile } from '../safetensors.js';
import { Check, diffCheck } from './compare.js';

export interface SamplingManifest {
  case: string;
  specs: { name: string; shape: number[]; top_k: number; top_p: number }[];
}

export async function verifySampling(engine: Engine, manifest: SamplingManifest, dir: string): Promise<Check[]> {
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  const checks: Check[] = [];
  try {
    for (const spec of manifest.specs ?? []) {
      const name = spec.name;
      const shape = io.entry(`${name}/logits`).shape;
      const logits = engine.tensor(io.f32(`${name}/logits`), shape, 'f32');
      const out = engine.empty(shape, 'f32', { fillByte: 0xff });
      try {
        engine.ops.topkTopPMask({ logits, out, topK: spec.top_k ?? 0, topP: spec.top_p ?? 0 });
        const masked = (await out.read()) as Float32Array;
        if (io.has(`${name}/masked`)) checks.push(diffCheck(`${name}/masked`, masked, io.f32(`${name}/masked`)));
        if (io.has(`${name}/keep`)) checks.push(diffCheck(`${name}/keep`, Int32Array.from(masked, (v) => (v === -Infinity ? 0 : 1)), io.i32(`${name}/keep`)));
      } finally {
        logits.dispose();
        out.dispose();
      }
    }
  } finally {
    io.close();
  }
  return checks;
}
