/**
 * The flan-t5 tokenizer as Infinity calls it (spec §4.1): the model's Hugging Face `tokenizer.json` run by
 * `@huggingface/tokenizers` (Hugging Face's own JS implementation of the normalizer, Metaspace pre-tokenizer
 * and Unigram model), with `max_length=512` and truncation, so a prompt's ids are its first 511 pieces
 * followed by `</s>`. No padding: the encoder runs each prompt's real tokens only.
 */
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer } from '@huggingface/tokenizers';
import { fail, ScaleKVError } from '../errors.js';
import { readJsonFile } from './json-file.js';

/** Infinity's `max_length`: at most this many ids per prompt, `</s>` included. */
export const T5_MAX_LENGTH = 512;

export interface TokenizedPrompts {
  /** Every prompt's ids, concatenated in order (each ends with `</s>`). */
  ids: Int32Array;
  /** Ids per prompt. */
  lens: number[];
  /** Whether a prompt was longer than `maxLength - 1` pieces and lost its tail. */
  truncated: boolean[];
}

export class T5Tokenizer {
  readonly eosId: number;
  readonly maxLength: number;
  readonly vocabSize: number;
  readonly #tokenizer: Tokenizer;

  /** @param json the parsed `tokenizer.json` of a T5 model (a Unigram model with a `</s>` token). */
  constructor(json: unknown, opts: { maxLength?: number } = {}) {
    const model = (json as { model?: { type?: unknown; vocab?: unknown } } | null)?.model;
    if (!model || typeof model !== 'object') fail('ERR_FORMAT', 'tokenizer.json has no model section');
    if (model.type !== 'Unigram')
      fail('ERR_FORMAT', `tokenizer.json holds a ${JSON.stringify(model.type)?.slice(0, 40)} model; the T5 tokenizer is a Unigram (SentencePiece) model`);
    this.maxLength = opts.maxLength ?? T5_MAX_LENGTH;
    if (!Number.isSafeInteger(this.maxLength) || this.maxLength < 2) fail('ERR_INVALID_ARG', `maxLength must be an integer >= 2, got ${this.maxLength}`);
    try {
      this.#tokenizer = new Tokenizer(json as object, {});
    } catch (e) {
      throw new ScaleKVError('ERR_FORMAT', `tokenizer.json could not be read as a tokenizer: ${(e as Error).message}`, { cause: e });
    }
    const eos = this.#tokenizer.token_to_id('</s>');
    if (eos === undefined) fail('ERR_FORMAT', "tokenizer.json has no '</s>' token");
    this.eosId = eos;
    this.vocabSize = Array.isArray(model.vocab) ? model.vocab.length : 0;
  }

  /** Reads `tokenizer.json`, given as its path or as the model directory holding it. */
  static fromFile(path: string, opts: { maxLength?: number } = {}): T5Tokenizer {
    let file = path;
    try {
      if (statSync(path).isDirectory()) file = join(path, 'tokenizer.json');
    } catch {
      fail('ERR_INVALID_ARG', `${path}: no such tokenizer file or model directory`);
    }
    const json = readJsonFile(file, 'tokenizer');
    return new T5Tokenizer(json, opts);
  }

  /** One prompt: its first `maxLength - 1` pieces and `</s>`. An empty prompt is `</s>` alone, as in Hugging Face. */
  encode(prompt: string): { ids: Int32Array; truncated: boolean } {
    if (typeof prompt !== 'string') fail('ERR_INVALID_ARG', `a prompt must be a string, got ${typeof prompt}`);
    const pieces = this.#tokenizer.encode(prompt, { add_special_tokens: false }).ids;
    const kept = Math.min(pieces.length, this.maxLength - 1);
    const ids = new Int32Array(kept + 1);
    for (let i = 0; i < kept; i++) ids[i] = pieces[i];
    ids[kept] = this.eosId;
    return { ids, truncated: pieces.length > kept };
  }

  /** Several prompts, concatenated as the encoder takes them (Infinity's `kv_compact` order). */
  encodeBatch(prompts: readonly string[]): TokenizedPrompts {
    if (!Array.isArray(prompts) || prompts.length === 0) fail('ERR_INVALID_ARG', 'prompts must be a non-empty array of strings');
    const parts = prompts.map((p) => this.encode(p));
    const ids = new Int32Array(parts.reduce((n, p) => n + p.ids.length, 0));
    let at = 0;
    for (const p of parts) {
      ids.set(p.ids, at);
      at += p.ids.length;
    }
    return { ids, lens: parts.map((p) => p.ids.length), truncated: parts.map((p) => p.truncated) };
  }
}
