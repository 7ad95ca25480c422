import type { Tensor } from '../engine.js';
import { fail } from '../errors.js';
import { observationWindow, SCALE_TOKENS_1M_SQUARE } from './window.js';

export type ReferencePooling = 'maxpool' | 'avgpool';

export interface SelectKeepOptions {
  /** [rows, heads, keyLen, headDim]: the cached keys, current scale last (the official `key_states`). */
  keys: Tensor;
  /** [rows, heads, Lq, headDim]: the current scale's raw queries (the official `query_states`). */
  queries: Tensor;
  /** 0-based scale index; with `scaleTokens` it gives the current scale's length. */
  scaleIndex: number;
  /** Entries kept per (row, head), window included. */
  budget: number;
  windowSize?: number;
  kernelSize?: number;
  pooling?: ReferencePooling;
  /** Tokens per scale (default: the official hard-coded 1M 1:1 table). */
  scaleTokens?: readonly number[];
}

export interface SelectKeepResult {
  /** Kept positions per (row, head), ascending, [rows, heads, n] flattened. n = budget, or keyLen if uncompressed. */
  kept: Int32Array;
  shape: [number, number, number];
  /** Window key positions (shared by every row and head). */
  window: Int32Array;
  /** Pooled scores before the window is masked again, [rows, heads, keyLen]; absent when nothing was scored. */
  pooledScores?: Float32Array;
  /** False when budget >= keyLen: the official code returns the cache unchanged. */
  compressed: boolean;
}

/**
 * The official ScaleKV `update_kv` selection, built from the engine's ops: window logits from the attention
 * kernel (raw queries, scale 1/√headDim, no softmax), then the selection kernel (window keys masked, 1-D
 * pooling, top-(budget − window) with ties to the lowest index, union with the window, sorted).
 */
export async function selectKeepIndices(o: SelectKeepOptions): Promise<SelectKeepResult> {
  const { keys, queries } = o;
  const engine = keys.engine;
  engine.checkOwn(queries, 'queries');
  if (keys.shape.length !== 4 || queries.shape.length !== 4) fail('ERR_SHAPE', 'keys and queries must be [rows, heads, length, headDim]');
  const [rows, heads, keyLen, headDim] = keys.shape;
  const lq = queries.shape[2];
  if (queries.shape[0] !== rows || queries.shape[1] !== heads || queries.shape[3] !== headDim)
    fail('ERR_SHAPE', `queries ${JSON.stringify(queries.shape)} do not match keys ${JSON.stringify(keys.shape)}`);
  const windowSize = o.windowSize ?? 16;
  const kernel = o.kernelSize ?? 5;
  const pooling = o.pooling ?? 'maxpool';
  const table = o.scaleTokens ?? SCALE_TOKENS_1M_SQUARE;
  if (!Number.isInteger(o.budget) || o.budget < 1) fail('ERR_BUDGET', `budget must be a positive integer, got ${o.budget}`);
  if (!Number.isInteger(windowSize) || windowSize < 1) fail('ERR_INVALID_ARG', `windowSize must be a positive integer`);
  if (pooling !== 'maxpool' && pooling !== 'avgpool') fail('ERR_INVALID_ARG', `pooling must be 'maxpool' or 'avgpool'`);
  const scaleIndex = Math.max(0, Math.min(table.length - 1, o.scaleIndex));

  if (keyLen <= o.budget) {
    const kept = new Int32Array(rows * heads * keyLen);
    for (let i = 0; i < kept.length; i++) kept[i] = i % keyLen;
    return { kept, shape: [rows, heads, keyLen], window: new Int32Array(0), compressed: false };
  }
  const currentStart = Math.max(0, keyLen - table[scaleIndex]);
  const window = observationWindow(keyLen - currentStart, currentStart, keyLen, windowSize).keys;
  const nWindow = window.length;
  if (o.budget < nWindow)
    fail('ERR_BUDGET', `budget ${o.budget} is smaller than the observation window (${nWindow}); the official code raises here`);
  if (o.budget === nWindow) {
    const kept = new Int32Array(rows * heads * nWindow);
    for (let p = 0; p < rows * heads; p++) kept.set(window, p * nWindow);
    return { kept, shape: [rows, heads, nWindow], window, compressed: true };
  }
  // The window's queries are the current-scale rows at the window positions (clamped, as the reference).
  const offset = keyLen - lq;
  const queryRows = window.map((w) => Math.max(0, Math.min(lq - 1, w - offset)));
  const logits = engine.empty([rows, heads, nWindow, keyLen], 'f32', { category: 'scratch', fillByte: 0xff });
  const out = engine.empty([rows, heads, o.budget], 'i32', { category: 'scratch', fillByte: 0xff });
  const pooled = engine.empty([rows, heads, keyLen], 'f32', { category: 'scratch', fillByte: 0xff });
  try {
    engine.ops.attention({
      q: queries,
      history: { k: keys, v: keys, len: keyLen },
      scale: 1 / Math.sqrt(headDim),
      window: { rows: queryRows, logits },
    });
    engine.ops.selection({
      logits,
      windowKeys: window,
      budget: o.budget,
      mode: 'logits',
      pooling: pooling === 'maxpool' ? 'max' : 'avg',
      kernel,
      out,
      pooledScores: pooled,
    });
    const [kept, pooledScores] = await Promise.all([out.read(), pooled.read()]);
    return { kept: kept as Int32Array, shape: [rows, heads, o.budget], window, pooledScores: pooledScores as Float32Array, compressed: true };
  } finally {
    logits.dispose();
    out.dispose();
    pooled.dispose();
  }
}

export interface ReferenceClusterOptions {
  /** Indexed by 0-based scale + 2 (the official `cache_sizes`): per layer budgets, or null. */
  cacheSizes: (readonly number[] | null)[];
  windowSize?: number;
  baseCapacity?: number;
  kernelSize?: number;
  pooling?: ReferencePooling;
  layerIdx?: number;
  scaleTokens?: readonly number[];
}

export type ReferenceUpdate = { changed: false } | ({ changed: true; capacity: number } & SelectKeepResult);

/**
 * The control flow of the official `ScaleKVCluster.update_kv`, quirks included: no compression until the
 * cache first exceeds the base capacity, capacity = cacheSizes[scale + 2][layer] (scale 12 reads index 13
 * and re-arms the base check), no compression while keyLen <= capacity. Where the official code crashes
 * (a `None` budget row, a capacity below the window) this throws ERR_BUDGET instead.
 */
export class ReferenceScaleKVCluster {
  hasReachedBase = false;
  readonly options: Required<Omit<ReferenceClusterOptions, 'scaleTokens'>> & { scaleTokens: readonly number[] };

  constructor(o: ReferenceClusterOptions) {
    this.options = {
      cacheSizes: o.cacheSizes,
      windowSize: o.windowSize ?? 16,
      baseCapacity: o.baseCapacity ?? 121,
      kernelSize: o.kernelSize ?? 5,
      pooling: o.pooling ?? 'maxpool',
      layerIdx: o.layerIdx ?? 0,
      scaleTokens: o.scaleTokens ?? SCALE_TOKENS_1M_SQUARE,
    };
  }

  capacityFor(scaleIndex: number): number {
    const o = this.options;
    const idx = Math.max(0, Math.min(o.cacheSizes.length - 1, (scaleIndex === 12 ? 11 : scaleIndex) + 2));
    const row = o.cacheSizes[idx];
    if (row === null || row === undefined)
      fail('ERR_BUDGET', `no budget for scale ${scaleIndex} (cache_sizes[${idx}] is None: the official code raises TypeError)`);
    return o.layerIdx < row.length ? row[o.layerIdx] : o.baseCapacity;
  }

  async update(keys: Tensor, queries: Tensor, scaleIndex: number): Promise<ReferenceUpdate> {
    const keyLen = keys.shape[2];
    const o = this.options;
    if (keyLen <= o.baseCapacity && !this.hasReachedBase) return { changed: false };
    this.hasReachedBase = true;
    if (scaleIndex === 12) this.hasReachedBase = false;
    const capacity = this.capacityFor(scaleIndex);
    if (keyLen <= capacity) return { changed: false };
    const r = await selectKeepIndices({
      keys,
      queries,
      scaleIndex,
      budget: capacity,
      windowSize: o.windowSize,
      kernelSize: o.kernelSize,
      pooling: o.pooling,
      scaleTokens: o.scaleTokens,
    });
    return { changed: true, capacity, ...r };
  }
}
