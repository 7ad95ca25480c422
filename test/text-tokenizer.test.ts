// The flan-t5 tokenizer (lib/text/tokenizer.ts) against the official tokenizer's ids in the golden
// text_encoder fixture (sentencepiece, Unicode and a prompt truncated at 512 included), and its bad input.
import test from 'ava';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SafetensorsFile } from '../lib/safetensors.js';
import { T5_MAX_LENGTH, T5Tokenizer } from '../lib/text/tokenizer.js';
import { goldenDir, Rng, seedFor } from './helpers.js';

const dir = goldenDir('text_encoder');

if (!dir) {
  test('golden text_encoder tokenizer (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; tokenizer conformance tests skipped');
    t.pass();
  });
} else {
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as { prompts: string[]; max_length: number };
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  const ids = io.i32('ids');
  const lens = Array.from(io.i32('lens'));
  io.close();

  test('golden text_encoder: every prompt tokenizes to the official ids, the long one truncated to 511 pieces + </s>', (t) => {
    const tok = T5Tokenizer.fromFile(dir);
    t.is(tok.maxLength, manifest.max_length);
    const batch = tok.encodeBatch(manifest.prompts);
    t.deepEqual(batch.lens, lens);
    t.deepEqual(Array.from(batch.ids), Array.from(ids));
    t.deepEqual(batch.truncated, lens.map((n) => n === T5_MAX_LENGTH), 'only the prompt at 512 ids lost its tail');
    t.true(batch.truncated.some(Boolean), 'the fixture has a truncated prompt');
    let at = 0;
    for (const n of lens) {
      t.is(batch.ids[at + n - 1], tok.eosId, 'each prompt ends with </s>');
      at += n;
    }
  });

  test('golden text_encoder: one prompt at a time equals the batch; an empty prompt is </s> alone', (t) => {
    const tok = T5Tokenizer.fromFile(join(dir, 'tokenizer.json'));
    let at = 0;
    manifest.prompts.forEach((p, i) => {
      t.deepEqual(Array.from(tok.encode(p).ids), Array.from(ids.subarray(at, at + lens[i])));
      at += lens[i];
    });
    t.deepEqual(Array.from(tok.encode('').ids), [tok.eosId]);
    t.false(tok.encode('').truncated);
  });

  test('golden text_encoder: maxLength cuts every prompt at maxLength - 1 pieces, random lengths', (t) => {
    const rng = new Rng(seedFor(t));
    const full = T5Tokenizer.fromFile(dir);
    const long = manifest.prompts[manifest.prompts.length - 1];
    for (let k = 0; k < 5; k++) {
      const maxLength = rng.int(2, 600);
      const cut = T5Tokenizer.fromFile(dir, { maxLength }).encode(long);
      const pieces = Array.from(new T5Tokenizer(JSON.parse(readFileSync(join(dir, 'tokenizer.json'), 'utf8')), { maxLength: 100000 }).encode(long).ids).slice(0, -1);
      const want = [...pieces.slice(0, maxLength - 1), full.eosId];
      t.deepEqual(Array.from(cut.ids), want, `maxLength ${maxLength}`);
      t.is(cut.truncated, pieces.length > maxLength - 1);
    }
  });

  test('bad tokenizer input: missing, unreadable, not JSON, another model type, no </s>, non-string prompts', (t) => {
    const tmp = mkdtempSync(join(tmpdir(), 'skv-tok-'));
    try {
      t.throws(() => T5Tokenizer.fromFile(join(tmp, 'absent.json')), { code: 'ERR_INVALID_ARG' });
      t.throws(() => T5Tokenizer.fromFile(tmp), { code: 'ERR_INVALID_ARG' }, 'a directory without tokenizer.json');
      writeFileSync(join(tmp, 'broken.json'), '{"model": {"type": "Unigram"');
      t.throws(() => T5Tokenizer.fromFile(join(tmp, 'broken.json')), { code: 'ERR_FORMAT' });
      const json = JSON.parse(readFileSync(join(dir, 'tokenizer.json'), 'utf8'));
      t.throws(() => new T5Tokenizer({ ...json, model: { ...json.model, type: 'BPE' } }), { code: 'ERR_FORMAT', message: /BPE/ });
      t.throws(() => new T5Tokenizer({ ...json, model: undefined }), { code: 'ERR_FORMAT' });
      const withoutEos = {
        ...json,
        added_tokens: json.added_tokens.filter((a: { content: string }) => a.content !== '</s>'),
        model: { ...json.model, vocab: json.model.vocab.map((v: [string, number]) => (v[0] === '</s>' ? ['<eos-renamed>', v[1]] : v)) },
      };
      t.throws(() => new T5Tokenizer(withoutEos), { code: 'ERR_FORMAT', message: /<\/s>/ });
      t.throws(() => new T5Tokenizer(json, { maxLength: 1 }), { code: 'ERR_INVALID_ARG' });
      const tok = new T5Tokenizer(json);
      t.throws(() => tok.encode(7 as unknown as string), { code: 'ERR_INVALID_ARG' });
      t.throws(() => tok.encodeBatch([]), { code: 'ERR_INVALID_ARG' });
    } finally {
      rmSync(tmp, { recursive: true, force: true });
    }
  });
}
