/**
 * The Infinity transformer config used by the model and the sampling loop. The type, the presets and the
 * state-dict layout live in presets.ts; this module adds the fixture-manifest reader with the consistency checks
 * the model relies on.
 */
import { fail } from '../errors.js';
import { infinityConfigFromManifest } from './presets.js';
import type { InfinityConfig } from './presets.js';
import type { VaeDecoderConfig } from './vae.js';

export type { InfinityConfig } from './presets.js';
export { infinityConfig, preset, expectedWeightShapes, blockPrefix } from './presets.js';

/**
 * The config from a fixture manifest's `model` entry (official snake_case names: embed_dim, depth, num_heads,
 * block_chunks, ffn_hidden, text_channels, text_maxlen, norm_eps, codebook_dim, apply_spatial_patchify), checked
 * against the derived quantities the manifest also lists (head_dim, text_pool_heads, d_vae, V).
 */
export function configFromManifest(model: Record<string, unknown>, vae?: VaeDecoderConfig): InfinityConfig {
  const cfg = infinityConfigFromManifest(model, vae);
  const check = (key: string, ours: number) => {
    const v = model[key];
    if (typeof v === 'number' && v !== ours) fail('ERR_INVALID_ARG', `model config: ${key} = ${v}, but the config derives ${ours}`);
  };
  check('head_dim', cfg.headDim);
  check('text_pool_heads', cfg.poolHeads);
  check('d_vae', cfg.dVae);
  check('V', cfg.vocab);
  return cfg;
}
