/**
 * The T5 text encoder's files: config.json (parsed, then expanded to the encoder's tensor list, as T5Checkpoint.open
 * does before reading any weight) and tokenizer.json (built, then run on prompts with Unicode and control
 * characters). Each: one field of a valid file replaced, hostile documents, byte-level mutations.
 */
import fc from 'fast-check';
import { tinyTokenizerJson } from '../../../lib/model/tiny.js';
import { FLAN_T5_XL, parseT5Config, t5EncoderShapes } from '../../../lib/text/t5-checkpoint.js';
import { readJsonFile } from '../../../lib/text/json-file.js';
import { T5Tokenizer } from '../../../lib/text/tokenizer.js';
import { FuzzTarget, FuzzViolation, scratchFile } from '../harness.js';
import { byteMutations, hostileJson } from '../mutate.js';

const XL_JSON = {
  model_type: 't5', d_model: FLAN_T5_XL.dModel, d_kv: FLAN_T5_XL.dKv, num_heads: FLAN_T5_XL.heads, num_layers: FLAN_T5_XL.layers, d_ff: FLAN_T5_XL.dFf,
  feed_forward_proj: 'gated-gelu', relative_attention_num_buckets: FLAN_T5_XL.buckets, relative_attention_max_distance: FLAN_T5_XL.maxDistance,
  layer_norm_epsilon: FLAN_T5_XL.eps, vocab_size: FLAN_T5_XL.vocab, tie_word_embeddings: false, architectures: ['T5ForConditionalGeneration'],
};
const INT_FIELDS = ['d_model', 'd_kv', 'num_heads', 'num_layers', 'd_ff', 'relative_attention_num_buckets', 'relative_attention_max_distance', 'vocab_size'];

/** Whether a config.json is one the encoder can be built from (the reference's reading of the fields). */
function configIsValid(c: unknown): boolean {
  if (typeof c !== 'object' || c === null || Array.isArray(c)) return false;
  const o = c as Record<string, unknown>;
  const defaults: Record<string, number> = { relative_attention_num_buckets: 32, relative_attention_max_distance: 128 };
  const ints = INT_FIELDS.every((k) => {
    const v = o[k] ?? defaults[k];
    return Number.isSafeInteger(v) && (v as number) >= 1 && (v as number) <= (k === 'num_layers' ? 1024 : 1 << 20);
  });
  const eps = o.layer_norm_epsilon ?? 1e-6;
  return ints && (o.model_type ?? 't5') === 't5' && o.feed_forward_proj === 'gated-gelu' && typeof eps === 'number' && eps > 0 && Number.isFinite(eps);
}

function checkConfig(input: Uint8Array): void {
  const path = scratchFile('config.json', input);
  let parsed: unknown;
  try {
    parsed = JSON.parse(Buffer.from(input).toString('utf8'));
  } catch {
    parsed = undefined;
  }
  const config = parseT5Config(readJsonFile(path, 'T5 config'), path);
  if (!configIsValid(parsed)) throw new FuzzViolation('parsed a config.json the reference refuses');
  if (t5EncoderShapes(config).size !== 3 + 9 * config.layers) throw new FuzzViolation('encoder tensor list has the wrong length');
}

const configCases = fc.oneof(
  fc.record({ field: fc.constantFrom(...INT_FIELDS, 'model_type', 'feed_forward_proj', 'layer_norm_epsilon'), value: hostileJson }).map(({ field, value }) => ({
    bytes: Buffer.from(JSON.stringify({ ...XL_JSON, [field]: value })),
  })),
  fc.constantFrom(...INT_FIELDS).map((field) => ({ bytes: Buffer.from(JSON.stringify({ ...XL_JSON, [field]: undefined })) })),
  hostileJson.map((v) => ({ bytes: Buffer.from(JSON.stringify(v) ?? '') })),
  byteMutations(fc.constant(Buffer.from(JSON.stringify(XL_JSON, null, 2)))).map((bytes) => ({ bytes })),
);

export const t5ConfigTarget: FuzzTarget = {
  name: 't5-config',
  codes: ['ERR_FORMAT'],
  inputs: configCases,
  check: checkConfig,
  allocationBound: () => 64 << 10,
};

const TOKENIZER = tinyTokenizerJson() as Record<string, unknown> & { model: Record<string, unknown> };
const PROMPTS = ['a red fox in the snow', '', 'Ünïcödé ☃ 𝄞 \u0000\u0007\u001b[31m \ud800', 'x'.repeat(2000)];

function checkTokenizer(input: Uint8Array): void {
  const tokenizer = T5Tokenizer.fromFile(scratchFile('tokenizer.json', input));
  for (const p of PROMPTS) {
    const { ids } = tokenizer.encode(p);
    if (ids.length < 1 || ids.length > tokenizer.maxLength || ids[ids.length - 1] !== tokenizer.eosId) throw new FuzzViolation(`ids of ${JSON.stringify(p)} do not end with </s> within maxLength`);
  }
}

const tokenizerCases = fc.oneof(
  fc.record({ field: fc.constantFrom('type', 'vocab', 'unk_id'), value: fc.oneof(hostileJson, fc.constantFrom('BPE', 'WordPiece', 'Unigram')) }).map(({ field, value }) => ({
    bytes: Buffer.from(JSON.stringify({ ...TOKENIZER, model: { ...TOKENIZER.model, [field]: value } })),
  })),
  fc.record({ field: fc.constantFrom('normalizer', 'pre_tokenizer', 'decoder', 'added_tokens', 'model', 'post_processor'), value: hostileJson }).map(({ field, value }) => ({
    bytes: Buffer.from(JSON.stringify({ ...TOKENIZER, [field]: value })),
  })),
  fc
    .array(fc.tuple(fc.oneof(fc.string({ unit: 'binary', maxLength: 6 }), hostileJson), fc.oneof(fc.double(), hostileJson)), { maxLength: 6 })
    .map((vocab) => ({ bytes: Buffer.from(JSON.stringify({ ...TOKENIZER, model: { ...TOKENIZER.model, vocab: [['</s>', 0], ...vocab] } })) })),
  hostileJson.map((v) => ({ bytes: Buffer.from(JSON.stringify(v) ?? '') })),
  byteMutations(fc.constant(Buffer.from(JSON.stringify(TOKENIZER)))).map((bytes) => ({ bytes })),
);

export const tokenizerTarget: FuzzTarget = {
  name: 'tokenizer',
  codes: ['ERR_FORMAT'],
  inputs: tokenizerCases,
  check: checkTokenizer,
  allocationBound: (input) => input.length * 4 + (1 << 20),
};
