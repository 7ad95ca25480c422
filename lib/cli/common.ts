// Helpers shared by the CLI commands that load models and text features.
import { Checkpoint } from '../checkpoint/index.js';
import { toHostArray } from '../checkpoint/load.js';
import { fail } from '../errors.js';
import type { TextFeatures } from '../model/infinity.js';
import { SafetensorsFile } from '../safetensors.js';

export function parseAspect(s: string | undefined): number {
  if (s === undefined) return 1;
  const m = /^(\d+(?:\.\d+)?)(?:[/:](\d+(?:\.\d+)?))?$/.exec(s.trim());
  const v = m ? (m[2] ? Number(m[1]) / Number(m[2]) : Number(m[1])) : NaN;
  if (!(v > 0) || !Number.isFinite(v)) fail('ERR_INVALID_ARG', `--aspect must be a ratio h/w such as 1, 4/3 or 0.75, got '${s}'`);
  return v;
}

export function concatText(parts: TextFeatures[]): TextFeatures {
  const total = parts.reduce((n, p) => n + p.kv.length, 0);
  const kv = new Float32Array(total);
  let at = 0;
  for (const p of parts) {
    kv.set(p.kv, at);
    at += p.kv.length;
  }
  return { kv, lens: parts.flatMap((p) => [...p.lens]) };
}

/** The VAE decoder's tensors as f32 host arrays (the decoder is small next to the transformer). */
export async function readVaeDecoder(ckpt: Checkpoint): Promise<Map<string, Float32Array>> {
  const out = new Map<string, Float32Array>();
  for (const name of ckpt.names) {
    if (!name.startsWith('decoder.')) continue;
    out.set(name, toHostArray(await ckpt.read(name), 'f32', name) as Float32Array);
  }
  if (!out.size) fail('ERR_FORMAT', `${ckpt.path}: no VAE decoder tensors (decoder.*)`);
  return out;
}

export function loadTextFeatures(path: string, channels: number): TextFeatures {
  const f = new SafetensorsFile(path);
  try {
    if (!f.has('kv') || !f.has('lens')) fail('ERR_FORMAT', `${path}: text features need tensors 'kv' [tokens, ${channels}] and 'lens' [prompts]`);
    const shape = f.entry('kv').shape;
    if (shape.length !== 2 || shape[1] !== channels) fail('ERR_SHAPE', `${path}: 'kv' must be [tokens, ${channels}], got ${JSON.stringify(shape)}`);
    const lens = Array.from(f.i32('lens'));
    if (!lens.length || lens.some((n) => n < 1) || lens.reduce((a, b) => a + b, 0) !== shape[0])
      fail('ERR_SHAPE', `${path}: 'lens' must be positive and sum to the ${shape[0]} rows of 'kv'`);
    return { kv: f.f32('kv'), lens };
  } finally {
    f.close();
  }
}
