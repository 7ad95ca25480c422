import type { Engine, Tensor } from '../engine.js';
import { ScaleKVError } from '../errors.js';
import type { SafetensorsFile } from '../safetensors.js';
import { ReferenceScaleKVCluster, ReferencePooling } from '../scalekv/reference.js';
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
    pooling: ReferencePooling;
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

function gatherRows(src: Float32Array, kept: Int32Array, pairs: number, keyLen: number, n: number, hd: number): Float32Array {
  const out = new Float32Array(pairs * n * hd);
  for (let p = 0; p < pairs; p++)
    for (let i = 0; i < n; i++) out.set(src.subarray((p * keyLen + kept[p * n + i]) * hd, (p * keyLen + kept[p * n + i] + 1) * hd), (p * n + i) * hd);
  return out;
}

/**
 * Compacts K/V on the engine with evictCompact (the cache manager's path; repeated entries, which average pooling
 * can select, are copied once per occurrence as the official gather does) and reads back the kept rows.
 */
async function compactOnEngine(engine: Engine, k: Float32Array, v: Float32Array, kept: Int32Array, call: UnitCall, n: number) {
  const shape = [call.bsz, call.heads, call.key_len, call.hd];
  const hk = engine.tensor(k, shape, 'f32', { category: 'kv' });
  const hv = engine.tensor(v, shape, 'f32', { category: 'kv' });
  try {
    engine.ops.evictCompact({ history: { k: hk, v: hv, len: call.key_len }, keep: kept, repeats: true });
    const [ok, ov] = await Promise.all([hk.read(), hv.read()]);
    const pairs = call.bsz * call.heads;
    const take = (a: Float32Array) => {
      const out = new Float32Array(pairs * n * call.hd);
      for (let p = 0; p < pairs; p++) out.set(a.subarray(p * call.key_len * call.hd, (p * call.key_len + n) * call.hd), p * n * call.hd);
      return out;
    };
    return { k: take(ok as Float32Array), v: take(ov as Float32Array) };
  } finally {
    hk.dispose();
    hv.dispose();
  }
}

export async function verifyUpdateKvUnits(engine: Engine, manifest: UnitManifest, io: SafetensorsFile): Promise<Check[]> {
  const checks: Check[] = [];
  for (const call of manifest.calls) {
    const id = call.id;
    const from = call.inputs_from;
    const keys = io.f32(`${from}/key_states`);
    const values = io.f32(`${from}/value_states`);
    const queries = loadQueries(io, from, call);
    const cluster = new ReferenceScaleKVCluster({
      cacheSizes: call.ctor.cache_sizes,
      windowSize: call.ctor.window_size,
      baseCapacity: call.ctor.base_capacity,
      kernelSize: call.ctor.kernel_size,
      pooling: call.ctor.pooling,
      layerIdx: call.ctor.layer_idx,
      scaleTokens: manifest.SCALE,
    });
    cluster.hasReachedBase = call.has_reached_base_before;
    const kT: Tensor = engine.tensor(keys, [call.bsz, call.heads, call.key_len, call.hd], 'f32');
    const qT: Tensor = engine.tensor(queries, [call.bsz, call.heads, call.query_len, call.hd], 'f32');
    try {
      let update;
      try {
        update = await cluster.update(kT, qT, call.scale_ind);
      } catch (e) {
        const raised = e instanceof ScaleKVError && e.code === 'ERR_BUDGET';
        checks.push(matchCheck(`${id}/exception`, call.exception !== null && raised, call.exception ?? `unexpected: ${(e as Error).message}`));
        continue;
      }
      if (call.exception !== null) {
        checks.push(matchCheck(`${id}/exception`, false, `expected ${call.exception}, nothing raised`));
        continue;
      }
      if (call.has_reached_base_after !== undefined)
        checks.push(matchCheck(`${id}/has_reached_base`, cluster.hasReachedBase === call.has_reached_base_after));
      if (!update.changed) {
        checks.push(matchCheck(`${id}/unchanged`, call.returned_unchanged === true));
        if (io.has(`${id}/out_key`)) checks.push(relCheck(`${id}/out_key`, keys, io.f32(`${id}/out_key`), 0));
        continue;
      }
      checks.push(matchCheck(`${id}/unchanged`, call.returned_unchanged !== true));
      const n = update.shape[2];
      const pairs = call.bsz * call.heads;
      if (io.has(`${id}/window`)) {
        const expected = io.i32(`${id}/window`);
        const ours = new Int32Array(expected.length);
        for (let p = 0; p < pairs; p++) ours.set(update.window, p * update.window.length);
        checks.push(diffCheck(`${id}/window`, ours, expected));
      }
      if (io.has(`${id}/kept`)) checks.push(diffCheck(`${id}/kept`, update.kept, io.i32(`${id}/kept`)));
      if (io.has(`${id}/pooled_scores`) && update.pooledScores)
        checks.push(relCheck(`${id}/pooled_scores`, update.pooledScores, io.f32(`${id}/pooled_scores`), F32_TOLERANCE));
      // The cache after update_kv: the recorded K/V, or (where only the kept list is recorded, e.g. u06 with its
      // repeated entries) the inputs gathered by the recorded list.
      if (io.has(`${id}/out_key`) || io.has(`${id}/kept`)) {
        const { k, v } = await compactOnEngine(engine, keys, values, update.kept, call, n);
        const recorded = io.has(`${id}/out_key`);
        const want = (name: string, src: Float32Array) =>
          recorded ? io.f32(`${id}/${name}`) : gatherRows(src, io.i32(`${id}/kept`), pairs, call.key_len, n, call.hd);
        const tag = recorded ? '' : ' (gathered by the recorded kept list)';
        checks.push(relCheck(`${id}/out_key${tag}`, k, want('out_key', keys), 0));
        checks.push(relCheck(`${id}/out_value${tag}`, v, want('out_value', values), 0));
      }
    } finally {
      kT.dispose();
      qT.dispose();
    }
  }
  return checks;
}
