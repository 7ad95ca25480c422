// What the CLI commands share: number flags, the progress line, and the one way they load a model (a Pipeline)
// and its prompts from --weights/--vae/--t5/--text/--preset/--dtype/--backend/--prompt.
import type { BackendChoice } from '../engine.js';
import { fail } from '../errors.js';
import type { TextFeatures } from '../model/infinity.js';
import type { PresetName } from '../model/presets.js';
import { Pipeline, PipelineGenerateOptions, PipelineProgress, presetConfig, readTextFeatures } from '../pipeline.js';

/**
 * `s` safe to print on a terminal: control characters (C0, DEL, C1), line and paragraph separators and the
 * bidirectional overrides, which a file could use to forge or hide output, become \xNN / \uNNNN escapes. A 'field'
 * (a tensor name, a metadata value) also has its backslashes doubled so an escape is never ambiguous; a 'message'
 * (an error, whose names are already JSON-quoted) keeps backslashes and its line breaks.
 */
export function printable(s: string, kind: 'field' | 'message' = 'field'): string {
  return s.replace(/[\\\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g, (c) => {
    if (kind === 'message' && (c === '\\' || c === '\n')) return c;
    if (c === '\\') return '\\\\';
    const code = c.charCodeAt(0);
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
  });
}

export function parseNumber(s: string | undefined, what: string, dflt: number): number {
  if (s === undefined) return dflt;
  const v = Number(s);
  if (!Number.isFinite(v)) fail('ERR_INVALID_ARG', `${what} must be a number, got '${s}'`);
  return v;
}

/** Progress on stderr: a bar on a terminal, a line per step otherwise. */
export function progressLine(): (p: PipelineProgress) => void {
  const tty = process.stderr.isTTY;
  return ({ stage, done, total }) => {
    if (stage !== 'sampling') return;
    if (tty) {
      const width = 24;
      const filled = Math.round((done / total) * width);
      process.stderr.write(`\rsampling [${'#'.repeat(filled)}${' '.repeat(width - filled)}] scale ${done}/${total}`);
      if (done === total) process.stderr.write('\n');
    } else {
      process.stderr.write(`sampling: scale ${done}/${total}\n`);
    }
  };
}

export interface ModelFlags {
  weights?: string;
  vae?: string;
  text?: string;
  'negative-text'?: string;
  t5?: string;
  preset?: string;
  dtype?: string;
  backend?: string;
  prompt?: string[];
  'negative-prompt'?: string[];
}

/** What a command conditions on: prompts as text (encoded by the pipeline's T5) or precomputed features. */
export type TextRequest = Pick<PipelineGenerateOptions, 'prompts' | 'negativePrompts' | 'textFeatures' | 'negativeTextFeatures'>;

/**
 * The model of a command and what it conditions on. With --weights: that checkpoint (--preset, default
 * infinity-2b; --vae when `decode`) and either --t5 DIR with --prompt texts (and --negative-prompt) or the T5
 * features of --text (and --negative-text), read first so a bad file fails before a long load. Without: the
 * built-in tiny model (its own tiny T5) and the --prompt texts, or `defaultPrompts`.
 */
export async function loadFromFlags(f: ModelFlags, o: { decode: boolean; defaultPrompts: readonly string[] }): Promise<{ pipeline: Pipeline; request: TextRequest }> {
  if (f.dtype !== undefined && f.dtype !== 'bf16' && f.dtype !== 'f32') fail('ERR_INVALID_ARG', `--dtype must be bf16 or f32, got '${f.dtype}'`);
  const backend = (f.backend ?? 'auto') as BackendChoice;
  const negatives = f['negative-prompt'] ?? [];
  const prompts = f.prompt?.length ? f.prompt : o.defaultPrompts;
  if (negatives.length > 1 && negatives.length !== prompts.length)
    fail('ERR_INVALID_ARG', `give one --negative-prompt for every prompt, or one per --prompt (${prompts.length}); got ${negatives.length}`);
  const byText: TextRequest = { prompts, negativePrompts: negatives.length === 0 ? undefined : negatives.length === 1 ? negatives[0] : negatives };
  if (!f.weights) {
    if (f.text || f.vae || f.preset || f.t5 || f['negative-text'])
      fail('ERR_INVALID_ARG', '--text, --negative-text, --t5, --vae and --preset need --weights (without them the built-in tiny model runs, with its own tiny T5)');
    const pipeline = await Pipeline.load({ backend, dtype: f.dtype as 'bf16' | 'f32' | undefined, decode: o.decode });
    return { pipeline, request: byText };
  }
  if (o.decode && !f.vae) fail('ERR_INVALID_ARG', '--weights needs --vae here');
  const { config } = presetConfig(f.preset);
  let request: TextRequest;
  if (f.t5) {
    if (f.text || f['negative-text']) fail('ERR_INVALID_ARG', 'give --t5 with --prompt texts, or --text features, not both');
    if (!f.prompt?.length) fail('ERR_INVALID_ARG', '--t5 needs at least one --prompt');
    request = byText;
  } else {
    if (!f.text) fail('ERR_INVALID_ARG', '--weights needs --t5 DIR (a flan-t5-xl directory) with --prompt texts, or --text FEATURES.safetensors');
    if (f.prompt?.length || negatives.length) fail('ERR_INVALID_ARG', '--prompt and --negative-prompt need --t5 (the text encoder); with --text give --negative-text');
    request = {
      textFeatures: readTextFeatures(f.text, config.textChannels),
      negativeTextFeatures: f['negative-text'] ? readTextFeatures(f['negative-text'], config.textChannels) : undefined,
    };
  }
  const pipeline = await Pipeline.load({
    backend, weights: f.weights, vae: o.decode ? f.vae : undefined, preset: f.preset as PresetName | 'tiny' | undefined, dtype: f.dtype as 'bf16' | 'f32' | undefined, decode: o.decode, t5: f.t5,
  });
  return { pipeline, request };
}

/** The T5 features of a request (prompts encoded on the pipeline's engine), for commands that need them whole. */
export async function textOf(pipeline: Pipeline, request: TextRequest): Promise<TextFeatures> {
  return (await pipeline.text(request)).text;
}
