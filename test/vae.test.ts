// The VAE decoder and the latent code arithmetic against the golden fixtures produced by the official code
// (../shared/golden: vae_decode, forward_fullcache, bsq_codes).
import test from 'ava';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Engine } from '../lib/engine.js';
import { VaeDecoder, vaeDecoderConfigFromManifest, normalizeVaeDecoderKey } from '../lib/model/vae.js';
import { SafetensorsFile } from '../lib/safetensors.js';
import { goldenDir, maxAbs, maxAbsDiff, testBackends, withEngine } from './helpers.js';

const vaeDir = goldenDir('vae_decode');
const fullDir = goldenDir('forward_fullcache');
const bsqDir = goldenDir('bsq_codes');

test('normalizeVaeDecoderKey maps both official spellings to the wrapped one', (t) => {
  const same = ['decoder.conv_in.conv.weight', 'decoder.up.3.block.0.nin_shortcut.conv.bias', 'decoder.up.1.upsample.conv.conv.weight', 'decoder.norm_out.norm.bias'];
  for (const k of same) t.is(normalizeVaeDecoderKey(k), k);
  t.is(normalizeVaeDecoderKey('decoder.conv_in.weight'), 'decoder.conv_in.conv.weight');
  t.is(normalizeVaeDecoderKey('decoder.mid.block_1.norm1.weight'), 'decoder.mid.block_1.norm1.norm.weight');
  t.is(normalizeVaeDecoderKey('decoder.up.3.block.0.nin_shortcut.bias'), 'decoder.up.3.block.0.nin_shortcut.conv.bias');
  t.is(normalizeVaeDecoderKey('decoder.up.1.upsample.conv.weight'), 'decoder.up.1.upsample.conv.conv.weight');
  t.is(normalizeVaeDecoderKey('vae.decoder.norm_out.weight'), 'decoder.norm_out.norm.weight');
});

/** max |a - ref| / max |ref|: the decoder's error relative to the image's scale. */
function relErr(a: ArrayLike<number>, ref: ArrayLike<number>): number {
  return maxAbsDiff(a, ref) / maxAbs(ref);
}

async function loadDecoder(e: Engine): Promise<VaeDecoder> {
  const manifest = JSON.parse(readFileSync(join(vaeDir as string, 'manifest.json'), 'utf8'));
  const weights = new SafetensorsFile(join(fullDir as string, 'vae.safetensors'));
  try {
    return await VaeDecoder.load(e, weights, vaeDecoderConfigFromManifest(manifest.vae));
  } finally {
    weights.close();
  }
}

if (!vaeDir || !fullDir) {
  test('golden vae_decode (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; VAE decoder conformance tests skipped');
    t.pass();
  });
} else {
  for (const backend of testBackends()) {
    test(`golden vae_decode ${backend}: the decoder reproduces the official raw output (f32)`, async (t) => {
      const io = new SafetensorsFile(join(vaeDir, 'io.safetensors'));
      await withEngine(backend, async (e) => {
        const vae = await loadDecoder(e);
        for (const size of ['8x8', '6x8']) {
          const z = io.entry(`z_${size}`);
          const image = vae.decode(e.tensor(io.f32(`z_${size}`), z.shape, 'f32'));
          const want = io.f32(`raw_${size}`);
          t.deepEqual([...image.shape], io.entry(`raw_${size}`).shape);
          const err = relErr((await image.read()) as Float32Array, want);
          t.log(`${size}: max |error| / max |raw| = ${err.toExponential(2)}`);
          t.true(err <= 3e-5, `${size}: relative error ${err}`);
        }
        vae.dispose();
      });
      io.close();
    });

    test(`golden forward_fullcache ${backend}: summed codes decode to the official image and uint8 BGR pixels`, async (t) => {
      const io = new SafetensorsFile(join(fullDir, 'io.safetensors'));
      await withEngine(backend, async (e) => {
        const vae = await loadDecoder(e);
        const raw = vae.decode(e.tensor(io.f32('summed_codes'), io.entry('summed_codes').shape, 'f32'));
        const want = io.f32('image_float');
        const rawValues = (await raw.read()) as Float32Array;
        // Relative to the decoder output's scale (max |raw| = 3.6 here), the same measure as above.
        const err = maxAbsDiff(rawValues.map((v) => Math.min(1, Math.max(-1, v))), want) / maxAbs(rawValues);
        t.log(`16x16 -> 256x256: max |error| / max |raw| = ${err.toExponential(2)}`);
        t.true(err <= 3e-5, `relative error ${err}`);
        const [B, , H, W] = raw.shape;
        const pixels = e.empty([B, H, W, 3], 'u8', { fillByte: 0 });
        e.ops.imageToU8({ image: raw, out: pixels, bgr: true });
        const u8 = (await pixels.read()) as Uint8Array;
        const official = io.i32('image_uint8_bgr');
        // A byte may differ by one step only where truncation decides within the float image's error (and
        // the f32 rounding of (x + 1) / 2 * 255) of an integer: anywhere else it must be equal.
        const floatErr = maxAbsDiff(rawValues.map((v) => Math.min(1, Math.max(-1, v))), want);
        const edgeTolerance = 127.5 * floatErr + 2 * 2 ** -16;
        let off = 0, worst = 0, unexplained = 0;
        for (let i = 0; i < official.length; i++) {
          const d = Math.abs(u8[i] - official[i]);
          if (!d) continue;
          off++;
          worst = Math.max(worst, d);
          const [pixel, bgr] = [Math.floor(i / 3), i % 3];
          const level = ((want[(2 - bgr) * H * W + (pixel % (H * W))] + 1) / 2) * 255;
          if (Math.abs(level - Math.round(level)) > edgeTolerance) unexplained++;
        }
        t.log(`uint8 BGR: ${off} of ${official.length} values differ, by at most ${worst}; edge tolerance ${edgeTolerance}`);
        t.true(worst <= 1 && unexplained === 0, `${off} values differ (${unexplained} away from a truncation edge), worst ${worst}`);
        vae.dispose();
      });
      io.close();
    });
  }
}

if (!bsqDir) {
  test('golden bsq_codes (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; BSQ code conformance tests skipped');
    t.pass();
  });
} else {
  for (const backend of testBackends()) {
    test(`golden bsq_codes ${backend}: codes, the running sum and every next-scale input`, async (t) => {
      const manifest = JSON.parse(readFileSync(join(bsqDir, 'manifest.json'), 'utf8'));
      const io = new SafetensorsFile(join(bsqDir, 'io.safetensors'));
      await withEngine(backend, async (e) => {
        for (const sched of manifest.schedules as { tag: string; scale_schedule: number[][] }[]) {
          const scales = sched.scale_schedule.map(([, h, w]) => [h, w]);
          const [H, W] = scales[scales.length - 1];
          const d = manifest.codebook_dim as number;
          const summed = e.tensor(new Float32Array(d * H * W), [1, d, H, W], 'f32');
          for (let si = 0; si < scales.length; si++) {
            const [h, w] = scales[si];
            const key = `${sched.tag}/s${String(si).padStart(2, '0')}`;
            const bits = e.tensor(io.i32(`${key}/bits`), [1, h, w, d], 'i32');
            const codes = e.empty([1, d, h, w], 'f32', { fillByte: 0xff });
            e.ops.bitsToCodes({ bits, out: codes });
            t.deepEqual((await codes.read()) as Float32Array, io.f32(`${key}/codes`), `${key}/codes`);
            e.ops.resizeBilinear({ input: codes, out: summed, accumulate: true });
            const sumErr = maxAbsDiff((await summed.read()) as Float32Array, io.f32(`${key}/summed`));
            t.true(sumErr <= 1e-6, `${key}/summed: error ${sumErr}`);
            if (si + 1 < scales.length) {
              const [nh, nw] = scales[si + 1];
              const next = e.empty([1, d, nh, nw], 'f32', { fillByte: 0xff });
              e.ops.resizeBilinear({ input: summed, out: next });
              const nextErr = maxAbsDiff((await next.read()) as Float32Array, io.f32(`${key}/next_input`));
              t.true(nextErr <= 1e-6, `${key}/next_input: error ${nextErr}`);
              next.dispose();
            }
            bits.dispose();
            codes.dispose();
          }
          summed.dispose();
        }
      });
      io.close();
    });
  }
}
