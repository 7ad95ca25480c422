/**
 * The KV policy hook of the Infinity sampling loop: how much history each layer may hold, and, per generation, what
 * of every (layer, scale) stays in it.
 *
 * A `KvPolicy` is configuration only; `begin()` returns a `KvPolicySession` that holds everything one generation
 * changes, so one policy object serves any number of generations at once. Per (layer, scale) the loop asks the
 * session where the scale's K/V go (`placement`), writes them there (KvCache.place), runs the attention over
 * [history ‖ current] and then calls `afterAttention`.
 */
import type { Engine, Tensor } from '../engine.js';
import type { KvCache } from './cache.js';

/**
 * Where a (layer, scale)'s K/V are written before its attention:
 * - 'append': straight after the layer's history, which then holds the whole scale (nothing left to decide);
 * - 'decide': into the scale's shared scratch; after the attention the session keeps what it wants of
 *   [history ‖ current] with KvCache.compact, or nothing (the history stays as it was).
 */
export type KvPlacement = 'append' | 'decide';

/** One (layer, scale) step, before its attention. */
export interface KvStep {
  layer: number;
  scaleIndex: number;
  /** Tokens of this scale. */
  tokens: number;
  /** True at the last scale of the schedule: its K/V are never read again. */
  lastScale: boolean;
}

/** What one generation tells its session up front. */
export interface KvGeneration {
  /** The scale grids (h, w) of this generation. */
  schedule: readonly (readonly [number, number])[];
  /** Images: the first `batch` cache rows are the conditional ones (2·batch rows with CFG). */
  batch: number;
}

/** What a session sees after layer `layer` attended at scale `scaleIndex`. */
export interface AfterAttentionContext extends KvStep {
  engine: Engine;
  cache: KvCache;
  placement: KvPlacement;
  /** History tokens before this scale: the keys the scale attended over are [0, historyLength + tokens). */
  historyLength: number;
  /** The scale grids (h, w) of this generation, and the first token of every scale. */
  schedule: readonly (readonly [number, number])[];
  scaleStarts: readonly number[];
  /** [rows, n, 3C]: input @ W_qkvᵀ without bias; the first C columns are ScaleKV's raw scoring query. */
  qkv: Tensor;
  /** [rows, heads, n, headDim]: the attention query (normalised, scaled, rotated). */
  q: Tensor;
}

/** The per-generation state of a policy. */
export interface KvPolicySession {
  /** Where the step's K/V go (see KvPlacement). 'append' must fit the layer's capacity. */
  placement(step: KvStep): KvPlacement;
  /**
   * After the step's attention. Queues its work on the engine; after a 'decide' placement it may call
   * ctx.cache.compact once for the layer, after 'append' it must leave the cache alone.
   */
  afterAttention?(ctx: AfterAttentionContext): void | Promise<void>;
  /** The generation ended (normally or not). */
  end?(): void;
}

export interface KvPolicy {
  readonly name: string;
  /** History capacity of a layer in tokens (excluding the scale being computed) for a schedule of these scale sizes. */
  capacity(layer: number, scaleTokens: readonly number[]): number;
  /**
   * History length of a layer after each scale but the last (whose K/V are never kept), for a schedule of these scale
   * sizes: what the KV arena pages (kvPoolPages). Absent: the layer is taken at its capacity throughout.
   */
  historyLengths?(layer: number, scaleTokens: readonly number[]): number[];
  /** A fresh session for one generation on `cache`. */
  begin(cache: KvCache, generation: KvGeneration): KvPolicySession;
}

/** Keep every scale but the last, whose K/V nothing reads. */
export function appendUnlessLast(step: KvStep): KvPlacement {
  return step.lastScale ? 'decide' : 'append';
}

/** Every scale's K/V kept (the full cache): the history after scale si holds scales 0 .. si. */
export function cumulativeLengths(scaleTokens: readonly number[]): number[] {
  let len = 0;
  return scaleTokens.slice(0, -1).map((n) => (len += n));
}

/** [scale][layer] history lengths of a policy for a schedule (see KvPolicy.historyLengths), for kvPoolPages. */
export function policyHistoryLengths(policy: KvPolicy, layers: number, scaleTokens: readonly number[]): number[][] {
  const perLayer = Array.from({ length: layers }, (_, l) =>
    policy.historyLengths?.(l, scaleTokens) ?? scaleTokens.slice(0, -1).map(() => policy.capacity(l, scaleTokens)),
  );
  return scaleTokens.slice(0, -1).map((_, si) => perLayer.map((lengths) => lengths[si]));
}
