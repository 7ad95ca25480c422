/**
 * Reading the sampling loop's intermediates back under the golden fixtures' names (forward_fullcache,
 * forward_scalekv): an observer of `generate`, so the loop itself carries no capture work.
 */
import type { Tensor } from '../engine.js';
import type { GenerateObserver } from './generate.js';
import { expandTextRows, type InfinityModel } from './infinity.js';

export interface CaptureOptions {
  /** text/normed_kv, text/cond_BD, text/cond_gss, text/ca_kv. */
  text?: boolean;
  /** sNN/x_in: block-0 input [bs, n, C] of every scale. */
  xIn?: boolean;
  /** sNN/next_codes [B, n, d] and sNN/word_embed [B, n, C] (before lvl_embed) for scales >= 1. */
  nextInput?: boolean;
  /** sNN/logits [B, n, 2d] after CFG and tau. */
  logits?: boolean;
  /** hidden/sNN_layerL: block outputs at these scales (all layers unless `layers` is given). */
  hidden?: { scales: readonly number[]; layers?: readonly number[] };
}

const pad2 = (n: number) => String(n).padStart(2, '0');

async function readF32(t: Tensor): Promise<Float32Array> {
  return (await t.read()) as Float32Array;
}

/** An observer that fills `captured` with what `opts` asks for; give it to one generation. */
export function captureObserver(model: InfinityModel, opts: CaptureOptions): { observer: GenerateObserver; captured: Map<string, Float32Array> } {
  const captured = new Map<string, Float32Array>();
  const hiddenScales = new Set(opts.hidden?.scales ?? []);
  const hiddenLayers = opts.hidden?.layers ? new Set(opts.hidden.layers) : undefined;
  let batch = 0;
  const observer: GenerateObserver = {
    onStart(run) {
      batch = run.batch;
    },
  };
  if (opts.text)
    observer.onText = async (text) => {
      // The official layout: every row's text in turn (the engine stores each distinct text once).
      const rows = (stored: Float32Array, width: number) => expandTextRows(stored, width, text.rowStarts, text.rowLens);
      captured.set('text/normed_kv', rows(text.normedKv, model.config.textChannels));
      captured.set('text/cond_BD', await readF32(text.cond));
      const condGss = model.sharedAdaLin(text.cond);
      try {
        captured.set('text/cond_gss', await readF32(condGss));
      } finally {
        condGss.dispose();
      }
      captured.set('text/ca_kv', rows(await readF32(text.projectedText), model.config.embedDim));
    };
  if (opts.xIn)
    observer.onScaleInput = async (si, x) => {
      captured.set(`s${pad2(si)}/x_in`, await readF32(x));
    };
  if (opts.hidden)
    observer.onLayer = async (si, layer, x) => {
      if (hiddenScales.has(si) && (!hiddenLayers || hiddenLayers.has(layer))) captured.set(`hidden/s${pad2(si)}_layer${layer}`, await readF32(x));
    };
  if (opts.logits)
    observer.onLogits = async (si, logits) => {
      captured.set(`s${pad2(si)}/logits`, await readF32(logits));
    };
  if (opts.nextInput)
    observer.onNextInput = async (si, codes) => {
      // The fixtures record the conditional rows only; word_embed without lvl_embed (added after it officially).
      const e = model.engine;
      const [rows, n] = codes.shape;
      const C = model.config.embedDim;
      captured.set(`s${pad2(si)}/next_codes`, (await readF32(codes)).slice(0, batch * n * model.config.dVae));
      const bias = e.tensor(model.wordEmbedBias(si, false), [C], 'f32');
      const embedded = e.empty([rows, n, C], 'f32');
      try {
        e.ops.gemm({ x: codes, w: model.wordEmbedWeight, bias, y: embedded });
        captured.set(`s${pad2(si)}/word_embed`, (await readF32(embedded)).slice(0, batch * n * C));
      } finally {
        bias.dispose();
        embedded.dispose();
      }
    };
  return { observer, captured };
}

const HOOKS = ['onStart', 'onText', 'onScaleInput', 'onLayer', 'onLogits', 'onNextInput'] as const;

/** One observer calling each given one in turn (undefined when none is given). */
export function composeObservers(list: readonly (GenerateObserver | undefined)[]): GenerateObserver | undefined {
  const present = list.filter((o): o is GenerateObserver => o !== undefined);
  if (present.length <= 1) return present[0];
  const out: GenerateObserver = {};
  for (const hook of HOOKS) {
    const withHook = present.filter((o) => o[hook]);
    if (!withHook.length) continue;
    (out as Record<string, unknown>)[hook] = async (...args: unknown[]) => {
      for (const o of withHook) await (o[hook] as (...a: unknown[]) => unknown).apply(o, args);
    };
  }
  return out;
}
