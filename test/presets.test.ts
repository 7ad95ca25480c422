import test from 'ava';
import { join } from 'node:path';
import { infinityBlockKey } from '../lib/checkpoint/index.js';
import {
  blockPrefix, checkWeightShapes, expectedVaeShapes, expectedWeightShapes, infinityConfigFromManifest, isBufferKey, parameterCount,
  preset, PRESET_NAMES, VAE_2B,
} from '../lib/model/presets.js';
import { tinyConfig, TINY_VAE } from '../lib/model/tiny.js';
import { SafetensorsFile } from '../lib/safetensors.js';
import { vaeDecoderConfigFromManifest } from '../lib/model/vae.js';
import { goldenDir } from './helpers.js';
import { readFileSync } from 'node:fs';

test('presets of spec sec. 1.1', (t) => {
  const table: [string, number, number, number, number, number, number, number][] = [
    ['infinity-2b', 32, 2048, 16, 128, 8192, 8, 4],
    ['infinity-8b', 40, 3584, 28, 128, 14336, 8, 5],
    ['infinity-layer12', 12, 768, 8, 96, 3072, 4, 3],
    ['infinity-layer16', 16, 1152, 12, 96, 4608, 4, 4],
    ['infinity-layer24', 24, 1536, 16, 96, 6144, 4, 6],
    ['infinity-layer32', 32, 2080, 20, 104, 8192, 4, 8],
    ['infinity-layer40', 40, 2688, 24, 112, 10752, 4, 10],
    ['infinity-layer48', 48, 3360, 28, 120, 13312, 4, 12],
  ];
  t.deepEqual([...PRESET_NAMES].sort(), table.map((r) => r[0]).sort());
  for (const [name, depth, C, H, c, ffn, chunks, per] of table) {
    const p = preset(name as never);
    t.deepEqual([p.depth, p.embedDim, p.numHeads, p.headDim, p.ffnHidden, p.blockChunks, p.blocksPerChunk], [depth, C, H, c, ffn, chunks, per], name);
    t.is(p.textChannels, 2048);
    t.is(p.poolHeads, 16, `${name}: 2048 / 128`);
  }
  const b2 = preset('infinity-2b');
  const b8 = preset('infinity-8b');
  t.deepEqual([b2.dVae, b2.codebookDim, b2.vocab, b2.patchify, b2.poolHeadDim], [32, 32, 64, false, 128]);
  t.deepEqual([b8.dVae, b8.codebookDim, b8.vocab, b8.patchify, b8.poolHeadDim], [56, 14, 112, true, 224]);
  t.deepEqual(b2.vae, { ...VAE_2B, chMult: [1, 2, 4, 4, 4] });
  t.deepEqual(b8.vae.chMult, [1, 2, 4, 4]);
  t.is(b8.vae.patchSize, 8);
});

test('exact parameter counts of spec sec. 2.3 (buffers excluded) and the analytic fp32 file sizes of sec. 2.1', (t) => {
  const p2 = parameterCount(preset('infinity-2b'));
  const p8 = parameterCount(preset('infinity-8b'));
  t.is(p2.perBlock, 67_147_792);
  t.is(p8.perBlock, 205_589_020);
  t.is(Math.round(p2.nonBlock / 1e5) / 10, 55.8);
  t.is(Math.round(p8.nonBlock / 1e5) / 10, 152.2);
  t.is(Math.round(p2.total / 1e5) / 1e4, 2.2046);
  t.is(Math.round(p8.total / 1e5) / 1e4, 8.3758);
  const bytes = (name: 'infinity-2b' | 'infinity-8b') => [...expectedWeightShapes(preset(name)).values()].reduce((n, s) => n + 4 * s.reduce((a, b) => a * b, 1), 0);
  t.is(bytes('infinity-2b'), 8_818_788_608);
  t.is(bytes('infinity-8b'), 33_504_328_512);
});

test('expectedWeightShapes: official key names (sec. 2.2, 2.3)', (t) => {
  const c = preset('infinity-2b');
  const m = expectedWeightShapes(c);
  t.deepEqual(m.get('text_proj_for_sos.ca.mat_q'), [1, 16, 128]);
  t.deepEqual(m.get('text_proj_for_sos.ca.mat_kv.weight'), [4096, 2048]);
  t.deepEqual(m.get('word_embed.weight'), [2048, 32]);
  t.deepEqual(m.get('head.weight'), [64, 2048]);
  t.deepEqual(m.get('lvl_embed.weight'), [15, 2048]);
  t.deepEqual(m.get('block_chunks.7.module.3.ffn.fc2.weight'), [2048, 8192]);
  t.deepEqual(m.get('block_chunks.0.module.0.sa.scale_mul_1H11'), [1, 16, 1, 1]);
  t.false(m.has('block_chunks.8.module.0.ada_gss'));
  const m8 = expectedWeightShapes(preset('infinity-8b'));
  t.deepEqual(m8.get('text_proj_for_sos.ca.mat_q'), [1, 16, 224]);
  t.deepEqual(m8.get('word_embed.weight'), [3584, 56]);
  t.deepEqual(m8.get('head.weight'), [112, 3584]);
  t.deepEqual(m8.get('block_chunks.7.module.4.sa.mat_qkv.weight'), [3 * 3584, 3584]);
  for (let i = 0; i < 40; i++) t.is(blockPrefix(preset('infinity-8b'), i), infinityBlockKey(i, 5));
  t.true(isBufferKey('block_chunks.0.module.0.sa.zero_k_bias'));
  t.false(isBufferKey('block_chunks.0.module.0.sa.v_bias'));
});

test('checkWeightShapes reports missing, unexpected and mismatched tensors; absent buffers are fine', (t) => {
  const c = tinyConfig();
  const want = expectedWeightShapes(c);
  const shapes = new Map(want);
  shapes.delete('block_chunks.1.module.1.sa.zero_k_bias');
  shapes.delete('head.bias');
  shapes.set('lvl_1L', [1, 521]);
  shapes.set('word_embed.weight', [128, 56]);
  const r = checkWeightShapes({ names: [...shapes.keys()], entry: (n) => ({ shape: shapes.get(n)! }) }, c);
  t.deepEqual(r.missing, ['head.bias']);
  t.deepEqual(r.unexpected, ['lvl_1L']);
  t.deepEqual(r.mismatched, [{ name: 'word_embed.weight', expected: [128, 32], found: [128, 56] }]);
});

test('expectedVaeShapes: the 2B decoder has 65.1M parameters (sec. 10)', (t) => {
  const n = (m: Map<string, number[]>) => [...m.values()].reduce((a, s) => a + s.reduce((x, y) => x * y, 1), 0);
  t.is(Math.round(n(expectedVaeShapes(VAE_2B)) / 1e5) / 10, 65.1);
  const m = expectedVaeShapes(VAE_2B);
  t.deepEqual(m.get('decoder.conv_in.conv.weight'), [512, 32, 3, 3]);
  t.deepEqual(m.get('decoder.up.1.block.0.nin_shortcut.conv.weight'), [256, 512, 1, 1]);
  t.true(m.has('decoder.up.4.upsample.conv.conv.weight'));
  t.false(m.has('decoder.up.0.upsample.conv.conv.weight'));
  t.deepEqual(m.get('decoder.conv_out.conv.weight'), [3, 128, 3, 3]);
});

const fullDir = goldenDir('forward_fullcache');
if (!fullDir) {
  test('layout vs the golden checkpoint (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; checkpoint layout comparison skipped');
    t.pass();
  });
} else {
  test('expectedWeightShapes / expectedVaeShapes / parameterCount match the golden checkpoint exactly', (t) => {
    const manifest = JSON.parse(readFileSync(join(fullDir, 'manifest.json'), 'utf8'));
    const c = infinityConfigFromManifest(manifest.model, vaeDecoderConfigFromManifest(manifest.vae));
    t.deepEqual(c, { ...tinyConfig(), name: 'manifest' });
    const w = new SafetensorsFile(join(fullDir, 'weights.safetensors'));
    const v = new SafetensorsFile(join(fullDir, 'vae.safetensors'));
    try {
      const shapes = expectedWeightShapes(c);
      t.deepEqual([...shapes.keys()].sort(), [...w.names].sort());
      for (const [n, s] of shapes) t.deepEqual(w.entry(n).shape, s, n);
      t.deepEqual([...shapes.keys()], manifest.weights_tensors.map((x: { name: string }) => x.name), 'state-dict order');
      t.deepEqual(checkWeightShapes(w, c), { missing: [], unexpected: [], mismatched: [] });
      t.is(parameterCount(c).total, manifest.model.n_params);
      const vs = expectedVaeShapes({ ...TINY_VAE, chMult: [...TINY_VAE.chMult] }, { quantizer: true });
      t.deepEqual([...vs.keys()], manifest.vae_tensors.map((x: { name: string }) => x.name), 'VAE state-dict order');
      for (const [n, s] of vs) t.deepEqual(v.entry(n).shape, s, n);
    } finally {
      w.close();
      v.close();
    }
  });
}
