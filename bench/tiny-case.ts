// The tiny model's end-to-end case (bench/e2e.ts, bench/interleaved.ts): the model, its VAE decoder, the 0.06M 1:1
// schedule and the prompt's text features, encoded once beforehand by the tiny T5 (the image time excludes text
// encoding; bench/t5.ts times it). It takes the library's modules as arguments and imports only types, so
// bench:interleaved can run it against another checkout's lib.
import type { Engine } from '../lib/engine.js';
import type * as InfinityModule from '../lib/model/infinity.js';
import type * as ScheduleModule from '../lib/model/schedule.js';
import type * as TinyModule from '../lib/model/tiny.js';
import type * as VaeModule from '../lib/model/vae.js';
import type * as T5Module from '../lib/text/t5-encoder.js';

export interface TinyCaseLib {
  InfinityModel: typeof InfinityModule.InfinityModel;
  VaeDecoder: typeof VaeModule.VaeDecoder;
  scaleSchedule: typeof ScheduleModule.scaleSchedule;
  createTinyModel: typeof TinyModule.createTinyModel;
  T5TextEncoder: typeof T5Module.T5TextEncoder;
}

export const TINY_CFG = 3;
export const TINY_TAU = 1;

export async function loadTinyCase(lib: TinyCaseLib, engine: Engine) {
  const tiny = lib.createTinyModel(0);
  const model = await lib.InfinityModel.load(engine, tiny.weights, tiny.config);
  const vaeWeights = new Map<string, Float32Array>();
  for (const n of tiny.vae.names) if (n.startsWith('decoder.')) vaeWeights.set(n, tiny.vae.f32(n));
  const vae = await lib.VaeDecoder.load(engine, vaeWeights, tiny.vaeConfig);
  const schedule = lib.scaleSchedule({ aspect: 1, pn: '0.06M' }).scales;
  const t5 = await lib.T5TextEncoder.load(engine, tiny.t5, tiny.tokenizer);
  const text = await t5.encode(['a tiny random model']).finally(() => t5.dispose());
  return { config: tiny.config, model, vae, schedule, text };
}
