// Conformance of the whole Infinity forward (spec sec. 4.2 - 10) against the `forward_fullcache` golden fixture:
// the official autoregressive_infer_cfg teacher-forced with the fixture's bits (full KV cache, CFG on logits),
// f32 on both sides. Compares the text intermediates, every scale's block-0 input, next-scale codes and their word
// embedding, logits after CFG/tau, the captured hidden states, the summed codes and the decoded image.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { Engine } from '../engine.js';
import { fail } from '../errors.js';
import { openCheckpoint } from '../checkpoint/index.js';
import { configFromManifest } from '../model/config.js';
import { captureObserver } from '../model/capture.js';
import { decodeImage, generate } from '../model/generate.js';
import { InfinityModel } from '../model/infinity.js';
import { VaeDecoder, vaeDecoderConfigFromManifest } from '../model/vae.js';
import { SafetensorsFile } from '../safetensors.js';
import { Check, matchCheck, relCheck } from './compare.js';

/** The bar for f32: max |ours - official| / max |official| per tensor. */
export const FORWARD_F32_TOLERANCE = 1e-4;
/**
 * uint8 image: the official code truncates (x+1)/2*255, so values within an ulp of an integer step flip by one
 * between two correct f32 implementations (the VAE decoder alone flips ~38 of 196608 bytes of this fixture). Allowed:
 * at most 0.1% of the bytes differ, none by more than 1.
 */
export const IMAGE_U8_MAX_FRACTION = 1e-3;

export interface ForwardFullcacheManifest {
  case: string;
  model: Record<string, unknown>;
  vae: Record<string, unknown>;
  scale_schedule: number[][];
  cfg_list: number[];
  tau_list: number[];
  hidden_scales?: number[];
  B?: number;
}

/**
 * The teacher-forced run both forward fixtures record: their prompts, the first `scales` scales of their schedule,
 * their CFG and tau lists, and their bits. Returns the full schedule too (a truncated run changes what is checked).
 */
export function fixtureRun(manifest: { scale_schedule: number[][]; cfg_list: number[]; tau_list: number[] }, io: SafetensorsFile, scales?: number) {
  const schedule = manifest.scale_schedule.map((s) => [s[s.length - 2], s[s.length - 1]] as [number, number]);
  const S = Math.min(scales ?? schedule.length, schedule.length);
  const options = {
    textFeatures: { kv: io.f32('text/kv_compact'), lens: [...io.i32('text/lens')] },
    schedule: schedule.slice(0, S),
    cfg: manifest.cfg_list,
    tau: manifest.tau_list,
    teacherBits: schedule.slice(0, S).map((_, si) => io.i32(`s${String(si).padStart(2, '0')}/bits`)),
  };
  return { schedule, S, options };
}

export interface ForwardFullcacheOptions {
  /** Only the first `scales` scales (faster on slow backends); the image checks need the whole schedule. */
  scales?: number;
  /** Also compare every tensor of weights.pth with weights.safetensors (default true). */
  comparePth?: boolean;
}

export async function verifyForwardFullcache(engine: Engine, manifest: ForwardFullcacheManifest, dir: string, opts: ForwardFullcacheOptions = {}): Promise<Check[]> {
  const checks: Check[] = [];
  const tol = FORWARD_F32_TOLERANCE;
  const config = configFromManifest(manifest.model);
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  const weightsPath = join(dir, 'weights.safetensors');
  if (!existsSync(weightsPath)) fail('ERR_FIXTURE', `${dir}: no weights.safetensors`);
  const ckpt = openCheckpoint(weightsPath);
  let model: InfinityModel | undefined;
  let vae: VaeDecoder | undefined;
  try {
    model = await InfinityModel.load(engine, ckpt, config, { dtype: 'f32' });
    // weights.pth (torch.save zip) must hold exactly the same tensors.
    const pthPath = join(dir, 'weights.pth');
    if ((opts.comparePth ?? true) && existsSync(pthPath)) {
      const pth = openCheckpoint(pthPath);
      try {
        const bad: string[] = [];
        for (const name of ckpt.names) {
          if (!pth.has(name)) {
            bad.push(`${name} (missing)`);
            continue;
          }
          const [a, b] = await Promise.all([ckpt.read(name), pth.read(name)]);
          if (a.dtype !== b.dtype || a.shape.join(',') !== b.shape.join(',') || !a.data.equals(b.data)) bad.push(name);
        }
        checks.push(matchCheck('weights.pth == weights.safetensors', bad.length === 0 && pth.names.length === ckpt.names.length,
          bad.length ? `differ: ${bad.slice(0, 5).join(', ')}` : `${ckpt.names.length} tensors bit-identical`));
      } finally {
        pth.close();
      }
    }
    const { schedule, S, options } = fixtureRun(manifest, io, opts.scales);
    const { observer, captured } = captureObserver(model, { text: true, xIn: true, nextInput: true, logits: true, hidden: { scales: manifest.hidden_scales ?? [] } });
    const res = await generate(model, { ...options, observer });
    try {
      for (const [name, got] of captured) {
        if (!io.has(name)) continue;
        checks.push(relCheck(name, got, io.f32(name), tol));
      }
      // Every expected tensor of the scales that ran must have been produced.
      for (const name of io.names) {
        const m = /^(?:s(\d\d)\/(?:x_in|logits|next_codes|word_embed)|hidden\/s(\d\d)_layer\d+|text\/(?:normed_kv|cond_BD|cond_gss|ca_kv))$/.exec(name);
        if (!m) continue;
        const si = Number(m[1] ?? m[2] ?? 0);
        if (si < S && !captured.has(name)) checks.push(matchCheck(name, false, 'not produced'));
      }
      if (S === schedule.length) {
        checks.push(relCheck('summed_codes', (await res.summedCodes.read()) as Float32Array, io.f32('summed_codes'), tol));
        const vaeWeights = new SafetensorsFile(join(dir, 'vae.safetensors'));
        try {
          vae = await VaeDecoder.load(engine, vaeWeights, vaeDecoderConfigFromManifest(manifest.vae));
        } finally {
          vaeWeights.close();
        }
        const img = await decodeImage(vae, res.summedCodes, { bgr: true, float: true });
        checks.push(relCheck('image_float', img.float as Float32Array, io.f32('image_float'), tol));
        const want = io.i32('image_uint8_bgr');
        let differing = 0;
        let maxDiff = 0;
        for (let i = 0; i < want.length; i++) {
          const dlt = Math.abs(img.pixels[i] - want[i]);
          if (dlt) differing++;
          maxDiff = Math.max(maxDiff, dlt);
        }
        if (img.pixels.length !== want.length) maxDiff = Infinity;
        const allowed = Math.floor(IMAGE_U8_MAX_FRACTION * want.length);
        checks.push({
          name: 'image_uint8_bgr', metric: 'differences', value: differing, tolerance: allowed, pass: differing <= allowed && maxDiff <= 1,
          note: `${differing} of ${want.length} bytes differ (max |diff| ${maxDiff}); truncation at float edges allows <= ${allowed}, each by 1`,
        });
      }
    } finally {
      res.summedCodes.dispose();
    }
  } finally {
    vae?.dispose();
    model?.dispose();
    ckpt.close();
    io.close();
  }
  return checks;
}
