// What the CLI commands share: number flags, the progress line, and the one way they load a model (a Pipeline)
// and its prompts from --weights/--vae/--text/--preset/--dtype/--backend/--prompt.
import type { BackendChoice } from '../engine.js';
import { fail } from '../errors.js';
import type { TextFeatures } from '../model/infinity.js';
import type { PresetName } from '../model/presets.js';
import { Pipeline, PipelineProgress, presetConfig, readTextFeatures } from '../pipeline.js';

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
  preset?: string;
  dtype?: string;
  backend?: string;
  prompt?: string[];
}

/**
 * The model of a command: with --weights, that checkpoint (--preset, default infinity-2b; --vae when `decode`) and
 * the T5 features of --text (read first, so a bad file fails before a long load); without, the built-in tiny
 * model and the --prompt texts (or `defaultPrompts`).
 */
export async function loadFromFlags(f: ModelFlags, o: { decode: boolean; defaultPrompts: readonly string[] }): Promise<{ pipeline: Pipeline; text: TextFeatures }> {
  if (f.dtype !== undefined && f.dtype !== 'bf16' && f.dtype !== 'f32') fail('ERR_INVALID_ARG', `--dtype must be bf16 or f32, got '${f.dtype}'`);
  const backend = (f.backend ?? 'auto') as BackendChoice;
  if (!f.weights) {
    if (f.text || f.vae || f.preset) fail('ERR_INVALID_ARG', '--text, --vae and --preset need --weights (without them the built-in tiny model runs)');
    const pipeline = await Pipeline.load({ backend, dtype: f.dtype as 'bf16' | 'f32' | undefined, decode: o.decode });
    try {
      return { pipeline, text: pipeline.text({ prompts: f.prompt?.length ? f.prompt : o.defaultPrompts }) };
    } catch (e) {
      await pipeline.dispose();
      throw e;
    }
  }
  if (!f.text) fail('ERR_INVALID_ARG', '--weights needs --text (precomputed T5 features)');
  if (f.prompt?.length) fail('ERR_INVALID_ARG', '--prompt needs the T5 text encoder (not available yet): give --text features');
  if (o.decode && !f.vae) fail('ERR_INVALID_ARG', '--weights needs --vae here');
  const { config } = presetConfig(f.preset);
  const text = readTextFeatures(f.text, config.textChannels);
  const pipeline = await Pipeline.load({
    backend, weights: f.weights, vae: o.decode ? f.vae : undefined, preset: f.preset as PresetName | 'tiny' | undefined, dtype: f.dtype as 'bf16' | 'f32' | undefined, decode: o.decode,
  });
  return { pipeline, text };
}
