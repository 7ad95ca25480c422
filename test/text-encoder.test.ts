// The T5 encoder on the engine (lib/text/t5-encoder.ts) against the official T5EncoderModel in the golden
// text_encoder fixture: every prompt's last hidden state (Infinity's kv_compact) on cpu and emu within 1e-4 of
// max |kv|; the unpadded, varlen run equals the padded and masked row the fixture recorded; batching into passes
// changes nothing; bf16 weights stay within bf16 error; the relative-position buckets follow HF; bad input is coded.
import test from 'ava';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { SafetensorsFile } from '../lib/safetensors.js';
import { T5Checkpoint } from '../lib/text/t5-checkpoint.js';
import { loadTextEncoder, relativePositionBias, T5TextEncoder, t5RelativeBucket } from '../lib/text/t5-encoder.js';
import { goldenDir, maxAbs, maxAbsDiff, Rng, seedFor, withEngine } from './helpers.js';

test('t5RelativeBucket: HF buckets (32 buckets, max distance 128): exact below 8, log-spaced to 128, keys after the query in the upper half', (t) => {
  // Independent float64 form of HF's formula, away from the exact boundaries 16, 32, 64 (checked as integers).
  const ref = (rel: number) => {
    const r = Math.abs(rel);
    const v = r < 8 ? r : Math.min(15, 8 + Math.floor((Math.log(r / 8) / Math.log(16)) * 8 + 1e-9));
    return (rel > 0 ? 16 : 0) + v;
  };
  for (let rel = -600; rel <= 600; rel++) t.is(t5RelativeBucket(rel, 32, 128), ref(rel), `offset ${rel}`);
  t.deepEqual([16, 32, 64, 91, 90].map((r) => t5RelativeBucket(r, 32, 128)), [26, 28, 30, 31, 30]);
  t.deepEqual([-16, -32, -64, -1000].map((r) => t5RelativeBucket(r, 32, 128)), [10, 12, 14, 15]);
  const table = Float32Array.from({ length: 32 * 2 }, (_, i) => i);
  const bias = relativePositionBias(table, { buckets: 32, heads: 2, maxDistance: 128 });
  t.is(bias.length, 2 * 257);
  t.is(bias[1 * 257 + 128 + 5], table[21 * 2 + 1], 'head 1, offset +5 -> bucket 21');
  t.is(bias[0 * 257 + 0], table[15 * 2 + 0], 'offset -128 -> bucket 15');
});

const dir = goldenDir('text_encoder');

if (!dir) {
  test('golden text_encoder encoder (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; T5 encoder conformance tests skipped');
    t.pass();
  });
} else {
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as { prompts: string[] };
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  const ids = io.i32('ids');
  const lens = Array.from(io.i32('lens'));
  const kv = io.f32('kv');
  const padded = io.f32('hidden_padded_first');
  io.close();
  const d = kv.length / ids.length;
  const tol = 1e-4 * maxAbs(kv);

  // scalekv verify (test/verify-kinds.test.ts) runs the fixture on every backend from the official ids; this is the
  // user's path, prompts as text.
  test('golden text_encoder cpu: encode(prompts) gives the official T5 features within 1e-4 of max |kv|', async (t) => {
    await withEngine('cpu', async (e) => {
      const enc = await loadTextEncoder(dir, e, { dtype: 'f32' });
      try {
        const got = await enc.encode(manifest.prompts);
        t.deepEqual(got.lens, lens);
        t.deepEqual(got.truncated, lens.map((n) => n === 512));
        const err = maxAbsDiff(got.kv, kv);
        t.true(err <= tol, `max error ${err} > ${tol}`);
      } finally {
        enc.dispose();
      }
    });
  });

  test('golden text_encoder cpu: the unpadded run of prompt 0 equals the padded, masked row on its real tokens', async (t) => {
    await withEngine('cpu', async (e) => {
      const enc = await loadTextEncoder(dir, e);
      try {
        const one = await enc.encodeIds(ids.subarray(0, lens[0]), [lens[0]]);
        const err = maxAbsDiff(one, padded.subarray(0, lens[0] * d));
        t.true(err <= tol, `error ${err} against hidden_padded_first`);
        // The padding rows themselves differ from any real token's: the comparison above is on the right rows.
        t.true(maxAbsDiff(padded.subarray(lens[0] * d, (lens[0] + 1) * d), one.subarray(0, d)) > 10 * tol);
      } finally {
        enc.dispose();
      }
    });
  });

  test('golden text_encoder cpu: passes of at most maxBatchTokens give the one-pass result; an empty prompt is </s> alone', async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine('cpu', async (e) => {
      const maxBatchTokens = rng.int(20, 600);
      const enc = await loadTextEncoder(dir, e, { maxBatchTokens });
      try {
        const got = await enc.encode(manifest.prompts);
        t.true(maxAbsDiff(got.kv, kv) <= tol, `maxBatchTokens ${maxBatchTokens}`);
        const empty = await enc.encode(['']);
        t.deepEqual(empty.lens, [1]);
        t.deepEqual(empty.truncated, [false]);
        t.is(empty.kv.length, d);
      } finally {
        enc.dispose();
      }
    });
  });

  test('golden text_encoder cpu: bf16 Linear weights stay within bf16 error of the official features', async (t) => {
    await withEngine('cpu', async (e) => {
      const enc = await loadTextEncoder(dir, e, { dtype: 'bf16' });
      try {
        t.is(enc.dtype, 'bf16');
        const got = await enc.encode(manifest.prompts.slice(0, 4));
        const n = lens.slice(0, 4).reduce((a, b) => a + b, 0) * d;
        const err = maxAbsDiff(got.kv, kv.subarray(0, n));
        // Weights, and the Linears' inputs with them (as autocast), rounded to bf16 (relative 2^-9) through 3 blocks
        // and a final norm: a few 1e-3 of max |kv|.
        t.true(err <= 2e-2 * maxAbs(kv), `bf16 error ${err}`);
        t.true(err > tol / 100, 'the weights really were rounded');
      } finally {
        enc.dispose();
      }
    });
  });

  test('golden text_encoder: bad input is coded and leaves nothing allocated', async (t) => {
    await withEngine('cpu', async (e) => {
      const before = e.memory().totalInUse;
      const enc = await loadTextEncoder(dir, e);
      await t.throwsAsync(enc.encodeIds(Int32Array.from([5, 9999]), [2]), { code: 'ERR_INDEX_RANGE' });
      await t.throwsAsync(enc.encodeIds(Int32Array.from([5, 1]), [3]), { code: 'ERR_SHAPE' });
      await t.throwsAsync(enc.encodeIds(Int32Array.from([5, 1]), [0, 2]), { code: 'ERR_INVALID_ARG' });
      await t.throwsAsync(enc.encode([]), { code: 'ERR_INVALID_ARG' });
      await t.throwsAsync(loadTextEncoder(dir, e, { dtype: 'f16' as 'f32' }), { code: 'ERR_DTYPE' });
      const ac = new AbortController();
      ac.abort();
      await t.throwsAsync(enc.encode(['a'], { signal: ac.signal }), { code: 'ERR_ABORTED' });
      enc.dispose();
      await t.throwsAsync(enc.encode(['a']), { code: 'ERR_DISPOSED' });
      t.is(e.memory().totalInUse, before);
      await t.throwsAsync(loadTextEncoder(join(dir, 'missing'), e), { code: 'ERR_INVALID_ARG' });
      // A source whose last block disagrees with the configuration: coded, and what was uploaded is freed.
      const ckpt = T5Checkpoint.open(dir);
      try {
        const lying = { config: ckpt.config, read: async (name: string) => {
          const x = await ckpt.read(name);
          return name.startsWith('encoder.block.2.layer.1.DenseReluDense.wo') ? { ...x, shape: [x.shape[1], x.shape[0]] } : x;
        } };
        await t.throwsAsync(T5TextEncoder.load(e, lying, undefined), { code: 'ERR_SHAPE', message: /block\.2.*wo/ });
        t.is(e.memory().totalInUse, before);
      } finally {
        ckpt.close();
      }
    });
  });
}
