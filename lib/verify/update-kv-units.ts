// Conformance of ScaleKV reference mode against the `update_kv_units` golden fixture: standalone calls of the
// official `ScaleKVCluster.update_kv`. Each call runs the code generation runs: a ScaleKvPolicy session on a KvCache
// whose only non-empty layer is the call's, filled as the sampling loop fills it (the previous cache appended, then
// the current scale written by qkNormRope where the session places it), the session's own decision, scoring,
// selection and compaction, read back from the cache.
import type { Engine, Tensor } from '../engine.js';
import { ScaleKVError } from '../errors.js';
import { KvCache, type KvTarget } from '../kv/cache.js';
import type { AfterAttentionContext, KvStep } from '../kv/policy.js';
import type { KvTraceRecord, Pooling } from '../kv/selection.js';
import type { SafetensorsFile } from '../safetensors.js';
import { ScaleKvPolicy } from '../scalekv/policy.js';
import { Check, diffCheck, matchCheck, relCheck } from './compare.js';

interface UnitCall {
  id: string;
  scale_ind: number;
  bsz: number;
  heads: number;
  hd: number;
  inputs_from: string;
  key_len: number;
  query_len: number;
  has_reached_base_before: boolean;
  has_reached_base_after?: boolean;
  exception: string | null;
  returned_unchanged?: boolean;
  out_len?: number;
  ctor: {
    cache_sizes: (number[] | null)[];
    window_size: number;
    base_capacity: number;
    kernel_size: number;
    pooling: Pooling;
    layer_idx: number;
  };
}

export interface UnitManifest {
  case: string;
  SCALE: number[];
  calls: UnitCall[];
}

export const F32_TOLERANCE = 1e-5;

// Queries may be stored sparsely: zeros except rows `query_row_index` (only window rows are read).
function loadQueries(io: SafetensorsFile, from: string, call: UnitCall): Float32Array {
  if (io.has(`${from}/query_states`)) return io.f32(`${from}/query_states`);
  const rows = io.i32(`${from}/query_row_index`);
  const values = io.f32(`${from}/query_rows`);
  const { bsz, heads, hd, query_len: lq } = call;
  const out = new Float32Array(bsz * heads * lq * hd);
  for (let p = 0; p < bsz * heads; p++) {
    for (let r = 0; r < rows.length; r++) {
      out.set(values.subarray((p * rows.length + r) * hd, (p * rows.length + r + 1) * hd), (p * lq + rows[r]) * hd);
    }
  }
  return out;
}

/**
 * The fused projection layout qkNormRope reads, [bsz, n, 3, heads, hd], from per-head [bsz, heads, len, hd] arrays:
 * rows first .. first + n of k and v, all n rows of q (absent: zeros).
 */
function packQkv(call: UnitCall, n: number, first: number, len: number, k: Float32Array, v: Float32Array, q?: Float32Array): Float32Array {
  const { bsz, heads, hd } = call;
  const out = new Float32Array(bsz * n * 3 * heads * hd);
  for (let b = 0; b < bsz; b++)
    for (let h = 0; h < heads; h++)
      for (let t = 0; t < n; t++) {
        const dst = ((b * n + t) * 3 * heads + h) * hd;
        const src = ((b * heads + h) * len + first + t) * hd;
        if (q) out.set(q.subarray(((b * heads + h) * n + t) * hd, ((b * heads + h) * n + t + 1) * hd), dst);
        out.set(k.subarray(src, src + hd), dst + heads * hd);
        out.set(v.subarray(src, src + hd), dst + 2 * heads * hd);
      }
  return out;
}

function gatherRows(src: Float32Array, kept: Int32Array, pairs: number, keyLen: number, n: number, hd: number): Float32Array {
  const out = new Float32Array(pairs * n * hd);
  for (let p = 0; p < pairs; p++)
    for (let i = 0; i < n; i++) out.set(src.subarray((p * keyLen + kept[p * n + i]) * hd, (p * keyLen + kept[p * n + i] + 1) * hd), (p * n + i) * hd);
  return out;
}

interface UnitRun {
  /** The session's trace of the step (absent when it raised). */
  record?: KvTraceRecord;
  error?: unknown;
  reachedBase: boolean;
  /** The layer's history after the step: [bsz, heads, len, hd] K and V. */
  k?: Float32Array;
  v?: Float32Array;
}

/** One official update_kv call, run by a ScaleKvPolicy session as the sampling loop runs it. */
async function runUnit(engine: Engine, manifest: UnitManifest, call: UnitCall, keys: Float32Array, values: Float32Array, queries: Float32Array): Promise<UnitRun> {
  const { bsz, heads, hd, key_len: keyLen, query_len: n, scale_ind: si } = call;
  const layer = call.ctor.layer_idx;
  const hist = keyLen - n;
  const records: KvTraceRecord[] = [];
  const policy = new ScaleKvPolicy({
    mode: 'reference',
    cacheSizes: call.ctor.cache_sizes,
    baseCapacity: call.ctor.base_capacity,
    windowSize: call.ctor.window_size,
    kernelSize: call.ctor.kernel_size,
    pooling: call.ctor.pooling,
    scaleTable: manifest.SCALE,
    trace: (r) => records.push(r),
    traceKept: true,
    traceScores: true,
  });
  // The official SCALE schedule (its maps as 1 x n grids: only the token counts matter to the reference mode).
  const schedule = manifest.SCALE.map((t, i) => [1, i === si ? n : t] as [number, number]);
  const capacity = Array.from({ length: layer + 1 }, (_, l) => (l === layer ? keyLen : 0));
  const cache = new KvCache(engine, { layers: layer + 1, rows: bsz, heads, headDim: hd, capacity, dtype: 'f32' });
  const session = policy.begin(cache, { schedule, batch: bsz });
  session.layerStates[layer].reachedBase = call.has_reached_base_before;
  const temps: Tensor[] = [];
  const t = <T extends Tensor>(x: T) => (temps.push(x), x);
  // qkNormRope without normalisation, biases or positions writes the given K/V (and q) unchanged.
  const write = (qkv: Float32Array, tokens: number, target: KvTarget) => {
    const q = t(engine.empty([bsz, heads, tokens, hd], 'f32', { fillByte: 0xff }));
    const qkvT = t(engine.tensor(qkv, [bsz, tokens, 3 * heads * hd], 'f32'));
    engine.ops.qkNormRope({ qkv: qkvT, normalize: false, q, k: target.k, v: target.v, kvOffset: target.offset, pageTable: target.pageTable });
    return { q, qkv: qkvT };
  };
  try {
    if (hist > 0) {
      cache.beginScale(hist);
      write(packQkv(call, hist, 0, keyLen, keys, values), hist, cache.place(layer, 'append'));
      cache.endScale();
    }
    cache.beginScale(n);
    const step: KvStep = { layer, scaleIndex: si, tokens: n, lastScale: false };
    try {
      const placement = session.placement(step);
      const { q, qkv } = write(packQkv(call, n, hist, keyLen, keys, values, queries), n, cache.place(layer, placement));
      const starts = schedule.map((_, i) => schedule.slice(0, i).reduce((a, [h, w]) => a + h * w, 0));
      const ctx: AfterAttentionContext = { ...step, engine, cache, placement, historyLength: hist, schedule, scaleStarts: starts, qkv, q };
      await session.afterAttention(ctx);
    } catch (error) {
      return { error, reachedBase: session.layerStates[layer].reachedBase };
    }
    const { k, v } = await cache.readHistory(layer);
    return { record: records[0], reachedBase: session.layerStates[layer].reachedBase, k: k as Float32Array, v: v as Float32Array };
  } finally {
    session.end();
    cache.dispose();
    for (const x of temps) x.dispose();
  }
}

export async function verifyUpdateKvUnits(engine: Engine, manifest: UnitManifest, io: SafetensorsFile): Promise<Check[]> {
  const checks: Check[] = [];
  for (const call of manifest.calls) {
    const id = call.id;
    const from = call.inputs_from;
    const keys = io.f32(`${from}/key_states`);
    const values = io.f32(`${from}/value_states`);
    const run = await runUnit(engine, manifest, call, keys, values, loadQueries(io, from, call));
    if (call.has_reached_base_after !== undefined)
      checks.push(matchCheck(`${id}/has_reached_base`, run.reachedBase === call.has_reached_base_after, `ours ${run.reachedBase}, official ${call.has_reached_base_after}`));
    if (run.error !== undefined || call.exception !== null) {
      const raised = run.error instanceof ScaleKVError && run.error.code === 'ERR_BUDGET';
      const ours = run.error === undefined ? 'nothing raised' : `raised ${(run.error as Error).message}`;
      checks.push(matchCheck(`${id}/exception`, call.exception !== null && raised, `official: ${call.exception ?? 'no exception'}; ours: ${ours}`));
      continue;
    }
    const r = run.record;
    if (!r) {
      checks.push(matchCheck(`${id}/step`, false, 'the session traced no step'));
      continue;
    }
    const pairs = call.bsz * call.heads;
    const n = r.lenAfter;
    checks.push(matchCheck(`${id}/unchanged`, (call.returned_unchanged === true) === !r.compressed, `ours ${r.compressed ? 'compressed' : 'unchanged'}`));
    if (call.out_len !== undefined) checks.push(matchCheck(`${id}/out_len`, n === call.out_len, `ours ${n}, official ${call.out_len}`));
    if (io.has(`${id}/window`)) {
      const expected = io.i32(`${id}/window`);
      const per = r.window?.length ?? 0;
      const ours = new Int32Array(per * pairs);
      for (let p = 0; p < pairs; p++) if (r.window) ours.set(r.window, p * per);
      checks.push(diffCheck(`${id}/window`, ours, expected, { listLength: expected.length / pairs }));
    }
    if (io.has(`${id}/kept`)) checks.push(diffCheck(`${id}/kept`, r.kept ?? new Int32Array(0), io.i32(`${id}/kept`), { listLength: io.entry(`${id}/kept`).shape[2] }));
    if (io.has(`${id}/pooled_scores`)) checks.push(relCheck(`${id}/pooled_scores`, r.pooledScores ?? new Float32Array(0), io.f32(`${id}/pooled_scores`), F32_TOLERANCE));
    // The cache after the step: exactly the returned K/V where recorded; where only the kept list is (e.g. u06 with
    // its repeated entries), exactly the inputs gathered by that list.
    if (io.has(`${id}/out_key`)) {
      checks.push(relCheck(`${id}/out_key`, run.k as Float32Array, io.f32(`${id}/out_key`), 0));
      checks.push(relCheck(`${id}/out_value`, run.v as Float32Array, io.f32(`${id}/out_value`), 0));
    } else if (io.has(`${id}/kept`)) {
      const kept = io.i32(`${id}/kept`);
      const m = io.entry(`${id}/kept`).shape[2];
      checks.push(relCheck(`${id}/cache K`, run.k as Float32Array, gatherRows(keys, kept, pairs, call.key_len, m, call.hd), 0, 'the inputs gathered by the recorded kept list'));
      checks.push(relCheck(`${id}/cache V`, run.v as Float32Array, gatherRows(values, kept, pairs, call.key_len, m, call.hd), 0, 'the inputs gathered by the recorded kept list'));
    }
  }
  return checks;
}
