// Conformance of the VAE decoder (spec sec. 10) against the `vae_decode` golden fixture: raw (pre-clamp) decoder
// output for each latent `z_<size>` vs `raw_<size>`.
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import type { Engine } from '../engine.js';
import { fail } from '../errors.js';
import { VaeDecoder, vaeDecoderConfigFromManifest } from '../model/vae.js';
import { SafetensorsFile } from '../safetensors.js';
import { Check, relCheck } from './compare.js';

export const VAE_TOLERANCE = 1e-4;

export interface VaeDecodeManifest {
  case: string;
  vae: Record<string, unknown>;
  /** Where the decoder weights are, e.g. "identical VAE to ../forward_fullcache (...): ../forward_fullcache/vae.safetensors". */
  weights?: string;
}

/** The weights file: vae.safetensors in the fixture, else the last *.safetensors path the manifest's `weights` names. */
export function vaeWeightsPath(manifest: VaeDecodeManifest, dir: string): string {
  const candidates = [join(dir, 'vae.safetensors')];
  const named = [...String(manifest.weights ?? '').matchAll(/[^\s:'"(),]+\.safetensors/g)].map((m) => m[0]);
  for (const n of named.reverse()) candidates.push(resolve(dir, n));
  candidates.push(resolve(dir, '..', 'forward_fullcache', 'vae.safetensors'));
  const found = candidates.find((c) => existsSync(c));
  if (!found) fail('ERR_FIXTURE', `${dir}: VAE weights not found (looked at ${candidates.join(', ')})`);
  return found;
}

export async function verifyVaeDecode(engine: Engine, manifest: VaeDecodeManifest, dir: string): Promise<Check[]> {
  const weightsPath = vaeWeightsPath(manifest, dir);
  const weights = new SafetensorsFile(weightsPath);
  let vae: VaeDecoder;
  try {
    vae = await VaeDecoder.load(engine, weights, vaeDecoderConfigFromManifest(manifest.vae));
  } finally {
    weights.close();
  }
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  const checks: Check[] = [];
  try {
    const sizes = io.names.filter((n) => /^z_[^/]+$/.test(n)).map((n) => n.slice(2)).sort();
    for (const size of sizes) {
      if (!io.has(`raw_${size}`)) continue;
      const zShape = io.entry(`z_${size}`).shape;
      const z = engine.tensor(io.f32(`z_${size}`), zShape, 'f32');
      const image = vae.decode(z);
      try {
        const want = io.f32(`raw_${size}`);
        const shapeOk = image.shape.join(',') === io.entry(`raw_${size}`).shape.join(',');
        const got = shapeOk ? ((await image.read()) as Float32Array) : new Float32Array(0);
        checks.push(relCheck(`raw_${size}`, got, want, VAE_TOLERANCE, shapeOk ? `weights ${dirname(weightsPath)}` : `shape [${image.shape.join(', ')}]`));
      } finally {
        z.dispose();
        image.dispose();
      }
    }
  } finally {
    io.close();
    vae.dispose();
  }
  return checks;
}
