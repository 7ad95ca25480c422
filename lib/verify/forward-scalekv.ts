// Conformance of ScaleKV reference mode in the whole Infinity forward against the `forward_scalekv` golden fixture:
// the official autoregressive_infer_cfg with the official ScaleKV patch (update_kv after every layer's attention),
// teacher-forced with the fixture's bits, f32. Compares the per-scale logits (and those of the same run with the full
// cache), the kept cache positions per (layer, scale, row, head), the observation windows, and the cache lengths
// before/after every update_kv.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { Engine } from '../engine.js';
import { fail } from '../errors.js';
import { openCheckpoint } from '../checkpoint/index.js';
import { configFromManifest } from '../model/config.js';
import { captureObserver } from '../model/capture.js';
import { generate } from '../model/generate.js';
import { InfinityModel } from '../model/infinity.js';
import type { KvTraceRecord } from '../kv/selection.js';
import { ScaleKvPolicy } from '../scalekv/policy.js';
import { SafetensorsFile } from '../safetensors.js';
import { Check, matchCheck, relCheck } from './compare.js';
import { FORWARD_F32_TOLERANCE, fixtureRun } from './forward-fullcache.js';

export interface ForwardScalekvManifest {
  case: string;
  model: Record<string, unknown>;
  scale_schedule: number[][];
  cfg_list: number[];
  tau_list: number[];
  scalekv: {
    window_size: number;
    base_capacity: number;
    kernel_size: number;
    pooling: 'maxpool' | 'avgpool';
    cache_sizes: (number[] | null)[];
  };
}

export interface ForwardScalekvOptions {
  /**
   * Only the first `scales` scales. Debugging aid only: a truncated schedule changes the summed-code grid (the last
   * scale's size), so the logits stop matching the fixture from the first upsampled scale on.
   */
  scales?: number;
}

const pad2 = (n: number) => String(n).padStart(2, '0');

export async function verifyForwardScalekv(engine: Engine, manifest: ForwardScalekvManifest, dir: string, opts: ForwardScalekvOptions = {}): Promise<Check[]> {
  const checks: Check[] = [];
  const config = configFromManifest(manifest.model);
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  let weightsPath = join(dir, 'weights.safetensors');
  if (!existsSync(weightsPath)) weightsPath = join(dir, '..', 'forward_fullcache', 'weights.safetensors');
  if (!existsSync(weightsPath)) fail('ERR_FIXTURE', `${dir}: no weights.safetensors here or in ../forward_fullcache`);
  const sk = manifest.scalekv;
  if (!sk || !Array.isArray(sk.cache_sizes)) fail('ERR_FIXTURE', `${dir}: manifest has no scalekv.cache_sizes`);
  const ckpt = openCheckpoint(weightsPath);
  let model: InfinityModel | undefined;
  try {
    model = await InfinityModel.load(engine, ckpt, config, { dtype: 'f32' });
    const { schedule, S, options } = fixtureRun(manifest, io, opts.scales);
    const records: KvTraceRecord[] = [];
    const policy = new ScaleKvPolicy({
      mode: 'reference',
      cacheSizes: sk.cache_sizes,
      baseCapacity: sk.base_capacity,
      windowSize: sk.window_size,
      kernelSize: sk.kernel_size,
      pooling: sk.pooling,
      trace: (r) => records.push(r),
      traceKept: true,
      // The official code also compresses after the last scale (wasted work); the fixture records it.
      traceLastScale: S === schedule.length,
    });
    const { observer, captured } = captureObserver(model, { logits: true });
    const res = await generate(model, { ...options, kvPolicy: policy, observer });
    res.summedCodes.dispose();
    for (let si = 0; si < S; si++) {
      const name = `s${pad2(si)}/logits`;
      const got = captured.get(name);
      if (!got) checks.push(matchCheck(name, false, 'not produced'));
      else checks.push(relCheck(name, got, io.f32(name), FORWARD_F32_TOLERANCE));
    }
    // The same run with the full cache, which the fixture records beside it (the 1M schedule's full-cache forward).
    if (io.has('s00/logits_fullcache')) {
      const full = captureObserver(model, { logits: true });
      (await generate(model, { ...options, observer: full.observer })).summedCodes.dispose();
      for (let si = 0; si < S; si++) {
        const name = `s${pad2(si)}/logits_fullcache`;
        const got = full.captured.get(`s${pad2(si)}/logits`);
        if (!io.has(name)) continue;
        if (!got) checks.push(matchCheck(name, false, 'not produced'));
        else checks.push(relCheck(name, got, io.f32(name), FORWARD_F32_TOLERANCE));
      }
    }
    // Cache lengths and compression flags per (layer, scale).
    const L = config.depth;
    const before = io.i32('kv/cache_len_before');
    const after = io.i32('kv/cache_len_after');
    const compressed = io.i32('kv/compressed');
    const T = before.length / L;
    const byKey = new Map(records.map((r) => [`${r.layer}/${r.scaleIndex}`, r]));
    let lenBad = 0;
    let flagBad = 0;
    const lenNotes: string[] = [];
    for (let l = 0; l < L; l++)
      for (let si = 0; si < S; si++) {
        const r = byKey.get(`${l}/${si}`);
        const i = l * T + si;
        if (!r || r.lenBefore !== before[i] || r.lenAfter !== after[i]) {
          lenBad++;
          if (lenNotes.length < 4) lenNotes.push(`L${l} s${si}: ${r?.lenBefore}->${r?.lenAfter} vs ${before[i]}->${after[i]}`);
        }
        if (!r || Number(r.compressed) !== compressed[i]) flagBad++;
      }
    checks.push({
      name: 'kv/cache_len_before+after', metric: 'differences', value: lenBad, tolerance: 0, pass: lenBad === 0,
      note: lenNotes.join('; ') || `${L * S} (layer, scale) steps`, covers: ['kv/cache_len_before', 'kv/cache_len_after'],
    });
    checks.push({ name: 'kv/compressed', metric: 'differences', value: flagBad, tolerance: 0, pass: flagBad === 0 });
    // Kept positions and windows per (layer, scale, row, head).
    const perStep = (what: 'kept' | 'window') => {
      let total = 0;
      let bad = 0;
      let listsBad = 0;
      let missing = 0;
      const covers: string[] = [];
      const where: string[] = [];
      for (const name of io.names) {
        const m = new RegExp(`^kv/L(\\d+)_s(\\d+)/${what}$`).exec(name);
        if (!m || Number(m[2]) >= S) continue;
        covers.push(name);
        const want = io.i32(name);
        const [rows, heads, n] = io.entry(name).shape as number[];
        const r = byKey.get(`${Number(m[1])}/${Number(m[2])}`);
        const ours = r?.[what];
        // A window is shared by every (row, head): ours is one list.
        const per = what === 'window' ? ours?.length : ours && ours.length / (rows * heads);
        if (!ours || per !== n) {
          missing++;
          continue;
        }
        total += want.length;
        for (let p = 0; p < rows * heads; p++) {
          let d = 0;
          for (let j = 0; j < n; j++) if (ours[(what === 'window' ? 0 : p * n) + j] !== want[p * n + j]) d++;
          bad += d;
          if (d) listsBad++;
          if (d && where.length < 4 && !where.includes(`L${m[1]} s${m[2]}`)) where.push(`L${m[1]} s${m[2]}`);
        }
      }
      checks.push({
        name: `kv/*/${what}`, metric: 'differences', value: bad + missing, tolerance: 0, pass: bad === 0 && missing === 0, covers,
        note: `${bad} of ${total} positions differ in ${listsBad} (row, head) lists${missing ? `, ${missing} (layer, scale) steps not selected alike` : ''}${where.length ? ` (${where.join(', ')})` : ''}`,
      });
    };
    perStep('kept');
    perStep('window');
  } finally {
    model?.dispose();
    ckpt.close();
    io.close();
  }
  return checks;
}
