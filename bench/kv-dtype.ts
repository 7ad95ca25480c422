// The fidelity cost of an 8-bit KV cache (kvDtype 'int8' / 'fp8') on the shared golden model's 13-scale 1M schedule
// (`forward_scalekv`: its weights, prompt features, CFG and tau lists and bits), against the cache in the model's
// own dtype, with the full cache and with the fixture's ScaleKV plan:
// - logit error per scale with the fixture's bits forced at every scale (official gt_leak), so each scale differs
//   only by what the cache stores (relative L2 and the largest absolute difference);
// - the images of free-running generations (seeds 0..N-1) decoded by the fixture's VAE: PSNR and SSIM against the
//   same seed with the model-dtype cache, beside the same figures for the bf16 model against the f32 one (what a
//   change of the model's own precision costs), and the KV arena's bytes.
// `npm run bench:kv-dtype [-- --seeds N] [--golden DIR] [--backend B]`. Figures for bench/RESULTS.md.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { openCheckpoint } from '../lib/checkpoint/index.js';
import { createEngine, type BackendChoice, type Engine } from '../lib/engine.js';
import { psnrImage, ssimImage } from '../lib/eval/metrics.js';
import type { KvPolicy } from '../lib/kv/policy.js';
import { captureObserver } from '../lib/model/capture.js';
import { configFromManifest } from '../lib/model/config.js';
import { decodeImage, generate, type KvDtype } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { VaeDecoder, vaeDecoderConfigFromManifest } from '../lib/model/vae.js';
import { SafetensorsFile } from '../lib/safetensors.js';
import { ScaleKvPolicy } from '../lib/scalekv/policy.js';
import { fixtureRun } from '../lib/verify/forward-fullcache.js';
import type { ForwardScalekvManifest } from '../lib/verify/forward-scalekv.js';

const { values } = parseArgs({
  args: process.argv.slice(2),
  options: {
    golden: { type: 'string', default: process.env.SCALEKV_GOLDEN ?? join(import.meta.dirname, '..', '..', 'shared', 'golden') },
    seeds: { type: 'string', default: '2' },
    backend: { type: 'string', default: 'cpu' },
  },
});

const dir = join(values.golden, 'forward_scalekv');
if (!existsSync(join(dir, 'manifest.json'))) {
  process.stderr.write(`bench:kv-dtype: no forward_scalekv fixture under ${values.golden} (give --golden DIR or $SCALEKV_GOLDEN)\n`);
  process.exit(1);
}
const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as ForwardScalekvManifest & { vae: Record<string, unknown> };
const fullcacheDir = join(dir, '..', 'forward_fullcache');
const io = new SafetensorsFile(join(dir, 'io.safetensors'));
const { options } = fixtureRun(manifest, io);
const sk = manifest.scalekv;
const policies: Record<string, () => KvPolicy | undefined> = {
  full: () => undefined,
  scalekv: () => new ScaleKvPolicy({ mode: 'reference', cacheSizes: sk.cache_sizes, baseCapacity: sk.base_capacity, windowSize: sk.window_size, kernelSize: sk.kernel_size, pooling: sk.pooling }),
};
const seeds = Array.from({ length: Number(values.seeds) }, (_, i) => i);
const pad2 = (n: number) => String(n).padStart(2, '0');
const fixed = (x: number, d = 2) => (Number.isFinite(x) ? x.toFixed(d) : 'inf');

async function loadModel(e: Engine, dtype: 'f32' | 'bf16'): Promise<InfinityModel> {
  const weights = existsSync(join(dir, 'weights.safetensors')) ? join(dir, 'weights.safetensors') : join(fullcacheDir, 'weights.safetensors');
  return InfinityModel.load(e, openCheckpoint(weights), configFromManifest(manifest.model), { dtype });
}

async function teacherLogits(model: InfinityModel, policy: KvPolicy | undefined, kvDtype: KvDtype | undefined) {
  const { observer, captured } = captureObserver(model, { logits: true });
  const r = await generate(model, { ...options, kvPolicy: policy, kvDtype, observer });
  r.summedCodes.dispose();
  return { logits: manifest.scale_schedule.map((_, si) => captured.get(`s${pad2(si)}/logits`) as Float32Array), kvBytes: r.kvBytes };
}

async function image(model: InfinityModel, vae: VaeDecoder, policy: KvPolicy | undefined, kvDtype: KvDtype | undefined, seed: number) {
  const { teacherBits: _forced, ...free } = options;
  const r = await generate(model, { ...free, kvPolicy: policy, kvDtype, seed });
  try {
    return await decodeImage(vae, r.summedCodes);
  } finally {
    r.summedCodes.dispose();
  }
}

const e = await createEngine({ backend: values.backend as BackendChoice });
const vaeFile = new SafetensorsFile(join(existsSync(join(dir, 'vae.safetensors')) ? dir : fullcacheDir, 'vae.safetensors'));
const vae = await VaeDecoder.load(e, vaeFile, vaeDecoderConfigFromManifest(manifest.vae));
vaeFile.close();
const out: string[] = [];
const say = (s: string) => {
  out.push(s);
  process.stderr.write(s + '\n');
};
say(`# 8-bit KV fidelity: golden forward_scalekv model (${manifest.scale_schedule.length} scales, 1M 1:1), ${values.backend}, ${new Date().toISOString().slice(0, 10)}`);
const f32Model = await loadModel(e, 'f32');
const bf16Model = await loadModel(e, 'bf16');
for (const [policyName, makePolicy] of Object.entries(policies)) {
  for (const [dtype, model] of [['bf16', bf16Model], ['f32', f32Model]] as const) {
    const base = await teacherLogits(model, makePolicy(), undefined);
    for (const kvDtype of ['int8', 'fp8'] as const) {
      const q = await teacherLogits(model, makePolicy(), kvDtype);
      const rel: string[] = [];
      const abs: string[] = [];
      for (let si = 1; si < base.logits.length; si++) {
        const [a, b] = [base.logits[si], q.logits[si]];
        let num = 0;
        let den = 0;
        let worst = 0;
        for (let i = 0; i < a.length; i++) {
          num += (b[i] - a[i]) ** 2;
          den += a[i] ** 2;
          worst = Math.max(worst, Math.abs(b[i] - a[i]));
        }
        rel.push((Math.sqrt(num / den) * 100).toFixed(2));
        abs.push(worst.toFixed(3));
      }
      say(`| ${policyName} | ${dtype} model | ${kvDtype} | KV ${(q.kvBytes / 2 ** 10).toFixed(0)} / ${(base.kvBytes / 2 ** 10).toFixed(0)} KiB | rel. L2 logit error % s1..s12: ${rel.join(' ')} | max abs: ${abs.join(' ')} |`);
    }
  }
  // Free-running images: 8-bit caches against the bf16 cache of the bf16 model, and the bf16 model against f32.
  for (const seed of seeds) {
    const ref = await image(bf16Model, vae, makePolicy(), undefined, seed);
    const [h, w] = [ref.shape[1], ref.shape[2]];
    const versus = async (label: string, img: Awaited<ReturnType<typeof image>>) =>
      say(`| ${policyName} | seed ${seed} | ${label} | PSNR ${fixed(psnrImage(img.pixels, ref.pixels))} dB | SSIM ${fixed(ssimImage(img.pixels, ref.pixels, h, w), 4)} |`);
    for (const kvDtype of ['int8', 'fp8'] as const) await versus(`bf16 model, ${kvDtype} KV vs bf16 KV`, await image(bf16Model, vae, makePolicy(), kvDtype, seed));
    await versus('f32 model and KV vs bf16 model and KV', await image(f32Model, vae, makePolicy(), undefined, seed));
  }
}
f32Model.dispose();
bf16Model.dispose();
vae.dispose();
e.dispose();
process.stdout.write(out.join('\n') + '\n');
