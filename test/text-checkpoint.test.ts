// T5 model directories (lib/text/t5-checkpoint.ts): the golden text_encoder's, and the Hugging Face layouts the
// tests write from it (sharded safetensors with a decoder half that is never read, pytorch_model.bin, sharded
// .bin with an index); a config that disagrees with the tensors and other bad input get coded errors.
import test from 'ava';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { openCheckpoint } from '../lib/checkpoint/index.js';
import { parseT5Config, T5Checkpoint, t5EncoderShapes } from '../lib/text/t5-checkpoint.js';
import { safetensors, torchArchive } from './checkpoint-writers.js';
import { goldenDir, Rng, seedFor } from './helpers.js';

const golden = goldenDir('text_encoder');

if (!golden) {
  test('golden text_encoder checkpoint (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; T5 checkpoint tests skipped');
    t.pass();
  });
} else {
  const manifest = JSON.parse(readFileSync(join(golden, 'manifest.json'), 'utf8')) as { config: Record<string, number | string> };

  /** The golden encoder's tensors as stored: name, shape, f32 bytes. */
  async function goldenTensors(): Promise<{ name: string; shape: number[]; data: Buffer }[]> {
    const c = openCheckpoint(join(golden as string, 'model.safetensors'));
    try {
      return await Promise.all(c.names.map(async (name) => ({ name, shape: c.entry(name).shape, data: (await c.read(name)).data })));
    } finally {
      c.close();
    }
  }

  function layout(t: { teardown(fn: () => void): void }, files: Record<string, Buffer>, config?: unknown): string {
    const dir = mkdtempSync(join(tmpdir(), 'skv-t5-'));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(join(dir, 'config.json'), JSON.stringify(config ?? JSON.parse(readFileSync(join(golden as string, 'config.json'), 'utf8'))));
    copyFileSync(join(golden as string, 'tokenizer.json'), join(dir, 'tokenizer.json'));
    for (const [name, data] of Object.entries(files)) writeFileSync(join(dir, name), data);
    return dir;
  }

  const st = (ts: { name: string; shape: number[]; data: Buffer }[]) => safetensors(ts.map((x) => ({ name: x.name, dtype: 'F32', shape: x.shape, data: x.data })));
  const bin = (ts: { name: string; shape: number[]; data: Buffer }[]) =>
    torchArchive(ts.map((x, i) => ({ name: x.name, dtype: 'f32', shape: x.shape, key: String(i), storage: x.data })));

  test('golden text_encoder: config.json and every encoder tensor, read one at a time', async (t) => {
    const t5 = T5Checkpoint.open(golden);
    try {
      const c = manifest.config;
      t.deepEqual(t5.config, {
        dModel: c.d_model, dKv: c.d_kv, heads: c.num_heads, layers: c.num_layers, dFf: c.d_ff, buckets: c.relative_attention_num_buckets,
        maxDistance: c.relative_attention_max_distance, eps: c.layer_norm_epsilon, vocab: c.vocab_size,
      });
      const want = new Map((await goldenTensors()).map((x) => [x.name, x]));
      t.is(t5.shapes.size, want.size, 'the encoder reads every tensor of the fixture');
      for await (const [name, data] of t5.tensors()) {
        t.deepEqual(data.shape, want.get(name)?.shape, name);
        t.true(data.data.equals(want.get(name)!.data), name);
      }
    } finally {
      t5.close();
    }
  });

  test('Hugging Face layouts: sharded safetensors (decoder never read), pytorch_model.bin, sharded .bin', async (t) => {
    const rng = new Rng(seedFor(t));
    const tensors = await goldenTensors();
    // A decoder half the encoder must never touch: its bytes are garbage of the wrong size.
    const decoder = { name: 'decoder.block.0.layer.0.SelfAttention.q.weight', shape: [128, 128], data: Buffer.from('not a tensor') };
    const shuffled = [...tensors].sort(() => rng.next() - 0.5);
    const half = Math.ceil(shuffled.length / 2);
    const parts = [shuffled.slice(0, half), shuffled.slice(half)];
    const weightMap = (ext: string) => Object.fromEntries(parts.flatMap((p, i) => p.map((x) => [x.name, `model-0000${i + 1}-of-00002.${ext}`])));
    const dirs = {
      'sharded safetensors': layout(t, {
        'model-00001-of-00002.safetensors': st(parts[0]),
        'model-00002-of-00002.safetensors': st(parts[1]),
        'model-00003-of-00003.safetensors': Buffer.from('decoder shard: never opened'),
        'model.safetensors.index.json': Buffer.from(JSON.stringify({ weight_map: { ...weightMap('safetensors'), [decoder.name]: 'model-00003-of-00003.safetensors' } })),
      }),
      'pytorch_model.bin': layout(t, { 'pytorch_model.bin': bin(tensors) }),
      'sharded .bin': layout(t, {
        'model-00001-of-00002.bin': bin(parts[0]),
        'model-00002-of-00002.bin': bin(parts[1]),
        'pytorch_model.bin.index.json': Buffer.from(JSON.stringify({ weight_map: weightMap('bin') })),
      }),
    };
    for (const [what, dir] of Object.entries(dirs)) {
      const t5 = T5Checkpoint.open(dir);
      try {
        for (const x of tensors) t.true((await t5.read(x.name)).data.equals(x.data), `${what}: ${x.name}`);
        await t.throwsAsync(t5.read(decoder.name), { code: 'ERR_INVALID_ARG' }, `${what}: the decoder is not the encoder's`);
      } finally {
        t5.close();
      }
    }
    // The embedding stored under its tied encoder name.
    const tied = tensors.map((x) => (x.name === 'shared.weight' ? { ...x, name: 'encoder.embed_tokens.weight' } : x));
    const t5 = T5Checkpoint.open(layout(t, { 'model.safetensors': st(tied) }));
    t.true((await t5.read('shared.weight')).data.equals(tensors.find((x) => x.name === 'shared.weight')!.data));
    t5.close();
  });

  test('bad T5 directories: no config, a config that disagrees with the tensors, unsupported FFN, missing or mistyped tensors', async (t) => {
    const tensors = await goldenTensors();
    const config = JSON.parse(readFileSync(join(golden, 'config.json'), 'utf8'));
    const files = { 'model.safetensors': st(tensors) };
    const empty = mkdtempSync(join(tmpdir(), 'skv-t5-'));
    t.teardown(() => rmSync(empty, { recursive: true, force: true }));
    t.throws(() => T5Checkpoint.open(empty), { code: 'ERR_INVALID_ARG', message: /config\.json/ });
    writeFileSync(join(empty, 'config.json'), '{"d_model": ');
    t.throws(() => T5Checkpoint.open(empty), { code: 'ERR_FORMAT', message: /not JSON/ });
    t.throws(() => T5Checkpoint.open(layout(t, files, { ...config, d_model: 64 })), { code: 'ERR_SHAPE', message: /config\.json implies/ });
    t.throws(() => T5Checkpoint.open(layout(t, files, { ...config, num_layers: 2 })), { code: 'ERR_FORMAT', message: /encoder block 2.*num_layers 2/ });
    t.throws(() => T5Checkpoint.open(layout(t, files, { ...config, num_layers: 4 })), { code: 'ERR_FORMAT', message: /encoder\.block\.3/ });
    t.throws(() => T5Checkpoint.open(layout(t, files, { ...config, feed_forward_proj: 'relu' })), { code: 'ERR_FORMAT', message: /relu/ });
    t.throws(() => T5Checkpoint.open(layout(t, files, { ...config, model_type: 'bert' })), { code: 'ERR_FORMAT', message: /bert/ });
    t.throws(() => T5Checkpoint.open(layout(t, files, { ...config, num_heads: 0 })), { code: 'ERR_FORMAT', message: /num_heads/ });
    const without = tensors.filter((x) => x.name !== 'encoder.final_layer_norm.weight');
    t.throws(() => T5Checkpoint.open(layout(t, { 'model.safetensors': st(without) })), { code: 'ERR_FORMAT', message: /final_layer_norm/ });
    const ints = safetensors(tensors.map((x) => ({ name: x.name, dtype: x.name === 'shared.weight' ? 'I32' : 'F32', shape: x.shape, data: x.data })));
    t.throws(() => T5Checkpoint.open(layout(t, { 'model.safetensors': ints })), { code: 'ERR_DTYPE', message: /shared\.weight/ });
    t.throws(() => T5Checkpoint.open(layout(t, {})), { code: 'ERR_FORMAT' }, 'no weights at all');
  });

  test('t5EncoderShapes: flan-t5-xl (24 layers, d 2048, 32 heads of 64, d_ff 5120)', (t) => {
    const xl = parseT5Config({
      model_type: 't5', d_model: 2048, d_kv: 64, num_heads: 32, num_layers: 24, d_ff: 5120, feed_forward_proj: 'gated-gelu',
      relative_attention_num_buckets: 32, vocab_size: 32128,
    });
    const shapes = t5EncoderShapes(xl);
    t.is(shapes.size, 1 + 24 * 9 + 1 + 1);
    const params = [...shapes.values()].reduce((n, s) => n + s.reduce((a, b) => a * b, 1), 0);
    // shared 32128*2048, per layer 4*2048^2 + 3*2048*5120 + 2*2048, bias 32*32, final norm 2048.
    t.is(params, 32128 * 2048 + 24 * (4 * 2048 * 2048 + 3 * 2048 * 5120 + 2 * 2048) + 32 * 32 + 2048);
    t.is(xl.maxDistance, 128);
    t.is(xl.eps, 1e-6);
  });
}
