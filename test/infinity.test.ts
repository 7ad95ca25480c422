// The Infinity transformer and its sampling loop against the official forward (../shared/golden/forward_fullcache),
// on every backend; teacher forcing, sampling determinism across backends, abort, memory accounting, the KV-policy
// hook and weight validation.
import test from 'ava';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BackendName, Engine } from '../lib/engine.js';
import { ScaleKVError } from '../lib/errors.js';
import { openCheckpoint } from '../lib/checkpoint/index.js';
import type { Checkpoint, TensorData } from '../lib/checkpoint/index.js';
import { configFromManifest } from '../lib/model/config.js';
import { generate, GenerateOptions } from '../lib/model/generate.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { FullKvPolicy } from '../lib/kv/baselines.js';
import { kvPageTokensFor } from '../lib/kv/cache.js';
import type { KvPolicy } from '../lib/kv/policy.js';
import { SafetensorsFile } from '../lib/safetensors.js';
import { verifyFixture } from '../lib/verify/index.js';
import { verifyForwardFullcache } from '../lib/verify/forward-fullcache.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../lib/dtype.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { infinityLogitsRef, type InfinityRefProblem } from './transformer-reference.js';
import { goldenDir, maxAbs, maxAbsDiff, testBackends, withEngine } from './helpers.js';

const dir = goldenDir('forward_fullcache');

for (const backend of testBackends()) {
  test(`transpose12 ${backend}: [A,B,C,D] -> [A,C,B,D] at an offset, every dtype; bad dims rejected`, async (t) => {
    await withEngine(backend, async (e) => {
      const [A, B, C, D] = [2, 3, 5, 7];
      const n = A * B * C * D;
      for (const dtype of ['f32', 'bf16', 'i32', 'u8'] as const) {
        const src = dtype === 'f32' || dtype === 'bf16' ? new Float32Array(n).map((_, i) => i % 200) : dtype === 'i32' ? new Int32Array(n).map((_, i) => i) : new Uint8Array(n).map((_, i) => i % 251);
        const input = e.tensor(src, [n], dtype);
        const out = e.empty([n + 11], dtype, { fillByte: 0 });
        e.ops.transpose12({ input, out, dims: [A, B, C, D], outOffset: 11 });
        const got = await out.read();
        let bad = 0;
        for (let a = 0; a < A; a++)
          for (let b = 0; b < B; b++)
            for (let c = 0; c < C; c++)
              for (let d = 0; d < D; d++) if (got[11 + ((a * C + c) * B + b) * D + d] !== src[((a * B + b) * C + c) * D + d]) bad++;
        t.is(bad, 0, dtype);
        t.is(got[0], 0);
        t.throws(() => e.ops.transpose12({ input, out, dims: [A, B, C, D + 1] }), { instanceOf: ScaleKVError });
        t.throws(() => e.ops.transpose12({ input, out, dims: [A, B, C, D], outOffset: 12 }), { instanceOf: ScaleKVError });
        t.throws(() => e.ops.transpose12({ input, out: input, dims: [A, B, C, D] }), { instanceOf: ScaleKVError });
        // A slice of the input from inOffset on: [1, 3, 4, 7] of the 210 elements from element 9.
        const slice = e.empty([3 * 4 * 7], dtype, { fillByte: 0xff });
        e.ops.transpose12({ input, out: slice, dims: [1, 3, 4, 7], inOffset: 9 });
        const part = await slice.read();
        let wrong = 0;
        for (let b = 0; b < 3; b++)
          for (let c = 0; c < 4; c++)
            for (let d = 0; d < 7; d++) if (part[(c * 3 + b) * 7 + d] !== src[9 + (b * 4 + c) * 7 + d]) wrong++;
        t.is(wrong, 0, `${dtype} from an input offset`);
        t.throws(() => e.ops.transpose12({ input, out: slice, dims: [1, 3, 4, 7], inOffset: n - 83 }), { code: 'ERR_SHAPE' }, 'past the input');
        slice.dispose();
        input.dispose();
        out.dispose();
      }
    });
  });
}

if (!dir) {
  test('golden forward_fullcache (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; Infinity forward tests skipped');
    t.pass();
  });
} else {
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8'));
  const config = configFromManifest(manifest.model);
  const schedule = (manifest.scale_schedule as number[][]).map((s) => [s[1], s[2]] as [number, number]);

  const withModel = async <T>(e: Engine, fn: (m: InfinityModel, io: SafetensorsFile) => Promise<T>): Promise<T> => {
    const ckpt = openCheckpoint(join(dir, 'weights.safetensors'));
    const io = new SafetensorsFile(join(dir, 'io.safetensors'));
    let model: InfinityModel | undefined;
    try {
      model = await InfinityModel.load(e, ckpt, config);
      return await fn(model, io);
    } finally {
      model?.dispose();
      ckpt.close();
      io.close();
    }
  };
  const textOf = (io: SafetensorsFile) => ({ kv: io.f32('text/kv_compact'), lens: [...io.i32('text/lens')] });
  const baseOpts = (io: SafetensorsFile, scales = schedule.length): GenerateOptions => ({
    textFeatures: textOf(io),
    schedule: schedule.slice(0, scales),
    cfg: manifest.cfg_list,
    tau: manifest.tau_list,
  });

  for (const backend of testBackends()) {
    test(`golden forward_fullcache ${backend}: text path, every scale's logits and hidden states, summed codes and image (f32, 1e-4)`, async (t) => {
      const checks = await withEngine(backend, (e) => verifyForwardFullcache(e, manifest, dir, { comparePth: backend === 'cpu' }));
      for (const c of checks) if (!c.pass || /logits|summed|image|hidden\/s04_layer3/.test(c.name)) t.log(`${c.pass ? 'ok' : 'FAIL'} ${c.name}: ${c.metric} ${c.value} ${c.note ?? ''}`);
      t.true(checks.length >= 40, `only ${checks.length} checks`);
      for (const n of ['text/cond_BD', 's06/logits', 'hidden/s04_layer3', 'summed_codes', 'image_float', 'image_uint8_bgr'])
        t.true(checks.some((c) => c.name === n), `${n} checked`);
      if (backend === 'cpu') t.true(checks.some((c) => c.name.startsWith('weights.pth') && c.pass), 'weights.pth tensors equal the safetensors ones');
      t.true(checks.every((c) => c.pass));
    });
  }

  test('verifyFixture knows forward_fullcache', async (t) => {
    const report = await verifyFixture(dir, { backend: 'cpu' });
    t.is(report.kind, 'forward_fullcache');
    t.true(report.pass);
  });

  test('the model loads from weights.pth as from safetensors', async (t) => {
    await withEngine('cpu', async (e) => {
      const pth = openCheckpoint(join(dir, 'weights.pth'));
      const io = new SafetensorsFile(join(dir, 'io.safetensors'));
      try {
        const m = await InfinityModel.load(e, pth, config);
        const bits = schedule.slice(0, 3).map((_, si) => io.i32(`s0${si}/bits`));
        const r = await generate(m, { ...baseOpts(io, 3), teacherBits: bits, capture: { logits: true } });
        t.true(maxRel(r.captured.get('s02/logits') as Float32Array, io.f32('s02/logits')) <= 1e-4);
        r.summedCodes.dispose();
        m.dispose();
      } finally {
        pth.close();
        io.close();
      }
    });
  });

  // The tolerance of the bf16 model: a float64 forward from the fixture's per-scale block inputs, once exact (it
  // must reproduce the official f32 logits) and once rounded to bf16 where the engine's bf16 model rounds.
  let bf16Reference: { exact: Float64Array[]; rounded: Float64Array[] } | undefined;
  const bf16ReferenceLogits = () => {
    if (bf16Reference) return bf16Reference;
    const io = new SafetensorsFile(join(dir, 'io.safetensors'));
    const weights = new SafetensorsFile(join(dir, 'weights.safetensors'));
    try {
      const cu = [...io.i32('text/cu_seqlens_k')];
      const problem: InfinityRefProblem = {
        ...config, schedule, ropeGrid: scaleSchedule({ aspect: manifest.h_div_w_template, pn: '1M' }).final1M,
        xIn: schedule.map((_, si) => io.f32(`s0${si}/x_in`)), condGss: io.f32('text/cond_gss'), condBD: io.f32('text/cond_BD'),
        textKv: io.f32('text/ca_kv'), cuSeqlens: [...cu, ...cu.slice(1).map((c) => c + cu[cu.length - 1])], // conditional rows, then unconditional
        cfg: manifest.cfg_list, tau: manifest.tau_list, batch: manifest.B,
      };
      const weight = (name: string) => weights.f32(name);
      bf16Reference = { exact: infinityLogitsRef(weight, problem), rounded: infinityLogitsRef(weight, problem, (x) => bf16BitsToF32(f32ToBf16Bits(x))) };
      return bf16Reference;
    } finally {
      io.close();
      weights.close();
    }
  };

  for (const backend of testBackends()) {
    test(`bf16 weights and KV cache ${backend}: every scale's logits within twice the error of a bf16 reference forward, half the cache bytes`, async (t) => {
      const ref = bf16ReferenceLogits();
      await withEngine(backend, async (e) => {
        const ckpt = openCheckpoint(join(dir, 'weights.safetensors'));
        const io = new SafetensorsFile(join(dir, 'io.safetensors'));
        try {
          const m = await InfinityModel.load(e, ckpt, config, { dtype: 'bf16' });
          const bits = schedule.map((_, si) => io.i32(`s0${si}/bits`));
          const r = await generate(m, { ...baseOpts(io), teacherBits: bits, capture: { logits: true } });
          for (let si = 0; si < schedule.length; si++) {
            const official = io.f32(`s0${si}/logits`);
            const scale = Math.max(1, maxAbs(official));
            t.true(maxAbsDiff(ref.exact[si], official) <= 1e-4 * scale, `scale ${si}: the float64 reference reproduces the official f32 logits`);
            const refErr = maxAbsDiff(ref.rounded[si], official);
            const err = maxAbsDiff(r.captured.get(`s0${si}/logits`) as Float32Array, official);
            t.true(err <= 2 * refErr + 1e-5 * scale, `scale ${si}: max |diff| ${err}, bf16 reference ${refErr}`);
          }
          // History: all scales but the last, 265 tokens in whole pages (the backend's size).
          const P = r.kvArena.pageTokens;
          t.is(P, kvPageTokensFor(backend));
          t.is(r.kvBytes, 2 * 2 * Math.ceil(265 / P) * P * 64 * 2 * 2 * config.depth);
          r.summedCodes.dispose();
          m.dispose();
        } finally {
          ckpt.close();
          io.close();
        }
      });
    });
  }

  test('teacher forcing: the forced bits are the returned bits, and the logits do not depend on the seed', async (t) => {
    await withEngine('cpu', (e) =>
      withModel(e, async (m, io) => {
        const bits = schedule.map((_, si) => io.i32(`s0${si}/bits`));
        const a = await generate(m, { ...baseOpts(io), teacherBits: bits, seed: 1, capture: { logits: true } });
        const b = await generate(m, { ...baseOpts(io), teacherBits: bits, seed: 2, capture: { logits: true } });
        for (let si = 0; si < schedule.length; si++) {
          t.deepEqual(a.bits[si], bits[si]);
          t.deepEqual(a.captured.get(`s0${si}/logits`), b.captured.get(`s0${si}/logits`));
        }
        t.deepEqual([...a.summedCodes.shape], [1, 32, 16, 16]);
        t.is(a.timings.length, schedule.length);
        a.summedCodes.dispose();
        b.summedCodes.dispose();
      }),
    );
  });

  test('sampling: the same seed gives the same bits on every backend, another seed other bits', async (t) => {
    const scales = 5;
    const run = (backend: BackendName, seed: number) =>
      withEngine(backend, (e) =>
        withModel(e, async (m, io) => {
          const r = await generate(m, { ...baseOpts(io, scales), seed, topK: 900, topP: 0.97 });
          r.summedCodes.dispose();
          return r.bits;
        }),
      );
    const backends = testBackends();
    const ref = await run('cpu', 1234);
    t.is(ref.length, scales);
    for (const si of ref.keys()) t.is(ref[si].length, schedule[si][0] * schedule[si][1] * config.dVae);
    t.true(ref.every((b) => b.every((v) => v === 0 || v === 1)));
    t.deepEqual(await run('cpu', 1234), ref, 'repeatable');
    const other = await run('cpu', 4321);
    t.notDeepEqual(other, ref);
    for (const b of backends.filter((x) => x !== 'cpu')) t.deepEqual(await run(b, 1234), ref, `${b} bits equal cpu's`);
  });

  test('abort: a generation cancelled between scales throws ERR_ABORTED and frees everything it allocated', async (t) => {
    await withEngine('cpu', (e) =>
      withModel(e, async (m, io) => {
        const before = e.memory().inUse;
        const ctl = new AbortController();
        const seen: number[] = [];
        const err = await t.throwsAsync(
          generate(m, {
            ...baseOpts(io),
            signal: ctl.signal,
            onProgress: (si) => {
              seen.push(si);
              if (si === 2) ctl.abort();
            },
          }),
        );
        t.true(err instanceof ScaleKVError);
        t.is((err as ScaleKVError).code, 'ERR_ABORTED');
        t.deepEqual(seen, [0, 1, 2]);
        await e.sync();
        t.deepEqual(e.memory().inUse, before);
        // Already aborted: nothing runs.
        await t.throwsAsync(generate(m, { ...baseOpts(io), signal: AbortSignal.abort() }), { instanceOf: ScaleKVError });
      }),
    );
  });

  test('memory: weights are counted under weights, the KV cache under kv, and everything returns to zero after dispose', async (t) => {
    await withEngine('cpu', async (e) => {
      const base = e.memory().inUse;
      t.is(base.weights + base.kv + base.activations + base.scratch, 0);
      await withModel(e, async (m, io) => {
        const w = e.memory().inUse.weights;
        t.true(w >= 4 * manifest.model.n_params * 0.9, `weights ${w} bytes`);
        const r = await generate(m, baseOpts(io, 4));
        // Full cache history: 2 rows x 2 heads x (1+4+16) tokens (the last scale is never stored; 21 tokens are two
        // pages of 16) x 64 x 4 bytes x (K, V) x 4 layers, plus each layer's [2 rows, 2 pages] page table.
        t.is(r.kvBytes, 2 * 2 * 32 * 64 * 4 * 2 * 4);
        t.is(r.memory.peak.kv, r.kvBytes + 4 * 2 * 2 * 4);
        await e.sync();
        const mid = e.memory().inUse;
        t.is(mid.kv, 0);
        t.is(mid.activations, r.summedCodes.bytes);
        r.summedCodes.dispose();
      });
      await e.sync();
      t.deepEqual(e.memory().inUse, base);
    });
  });

  test('KV policy hook: called after every (layer, scale); K/V in the scratch, then compacting [history ‖ current] (keep all), equals appending in place', async (t) => {
    await withEngine('cpu', (e) =>
      withModel(e, async (m, io) => {
        const scales = 4;
        const bits = schedule.slice(0, scales).map((_, si) => io.i32(`s0${si}/bits`));
        const calls: string[] = [];
        const policy: KvPolicy = {
          name: 'compact-all',
          capacity: (l, tok) => new FullKvPolicy().capacity(l, tok),
          begin: () => ({
            placement: () => 'decide',
            afterAttention(ctx) {
              calls.push(`${ctx.layer}/${ctx.scaleIndex}`);
              // The history excludes the current scale (it lives in the shared scratch); keep all of [history ‖ current].
              const hist = ctx.cache.len(ctx.layer);
              t.is(hist, ctx.scaleStarts[ctx.scaleIndex]);
              t.is(ctx.historyLength, hist);
              if (ctx.lastScale) return;
              const len = hist + ctx.tokens;
              const { rows, heads } = ctx.cache;
              const keep = new Int32Array(rows * heads * len);
              for (let p = 0; p < rows * heads; p++) for (let i = 0; i < len; i++) keep[p * len + i] = i;
              t.throws(() => ctx.cache.compact(ctx.layer, keep.subarray(1), len), { code: 'ERR_SHAPE' });
              ctx.cache.compact(ctx.layer, keep, len);
              t.throws(() => ctx.cache.compact(ctx.layer, keep, len), { code: 'ERR_INTERNAL' }, 'once per (layer, scale)');
            },
          }),
        };
        const a = await generate(m, { ...baseOpts(io, scales), teacherBits: bits, capture: { logits: true } });
        const b = await generate(m, { ...baseOpts(io, scales), teacherBits: bits, capture: { logits: true }, kvPolicy: policy });
        t.is(calls.length, scales * config.depth);
        for (let si = 0; si < scales; si++) t.deepEqual(b.captured.get(`s0${si}/logits`), a.captured.get(`s0${si}/logits`));
        a.summedCodes.dispose();
        b.summedCodes.dispose();
      }),
    );
  });

  test('weights: a wrong shape is rejected with ERR_SHAPE naming the key, a missing tensor with ERR_FORMAT, unknown keys ignored', async (t) => {
    const tmp = mkdtempSync(join(tmpdir(), 'skv-inf-'));
    const src = openCheckpoint(join(dir, 'weights.safetensors'));
    try {
      const tensors = new Map<string, TensorData>();
      for (const n of src.names) tensors.set(n, await src.read(n));
      const bad = 'block_chunks.1.module.0.ffn.fc1.weight';
      const orig = tensors.get(bad) as TensorData;
      const write = (name: string, m: Map<string, TensorData>) => {
        const p = join(tmp, name);
        writeFileSync(p, safetensors(m));
        return p;
      };
      // fc1 [512, 128] stored as [256, 256] (same byte count): only the shape check can catch it.
      const wrong = new Map(tensors);
      wrong.set(bad, { ...orig, shape: [256, 256] });
      const missing = new Map(tensors);
      missing.delete('head.bias');
      const extra = new Map(tensors);
      extra.set('lvl_1L', { dtype: 'f32', shape: [1], data: Buffer.alloc(4) });
      for (const k of [...extra.keys()].filter((k) => k.endsWith('zero_k_bias'))) extra.delete(k);
      await withEngine('cpu', async (e) => {
        for (const viaEntry of [true, false]) {
          const ck = openCheckpoint(write('wrong.safetensors', wrong));
          // Without `entry` the check happens as the tensor is read.
          const source = viaEntry ? ck : { names: ck.names, read: (n: string) => ck.read(n) };
          const err = await t.throwsAsync(InfinityModel.load(e, source, config), { instanceOf: ScaleKVError });
          t.is((err as ScaleKVError).code, 'ERR_SHAPE');
          t.true(err?.message.includes(bad), err?.message);
          ck.close();
          await e.sync();
          t.deepEqual(e.memory().inUse, { weights: 0, kv: 0, activations: 0, scratch: 0 }, 'nothing leaked');
        }
        const ck2 = openCheckpoint(write('missing.safetensors', missing));
        const err2 = await t.throwsAsync(InfinityModel.load(e, ck2, config), { instanceOf: ScaleKVError });
        t.is((err2 as ScaleKVError).code, 'ERR_FORMAT');
        t.true(err2?.message.includes('head.bias'));
        ck2.close();
        const ck3: Checkpoint = openCheckpoint(write('extra.safetensors', extra));
        const m = await InfinityModel.load(e, ck3, config);
        m.dispose();
        ck3.close();
      });
    } finally {
      src.close();
      rmSync(tmp, { recursive: true, force: true });
    }
  });
}

function maxRel(a: Float32Array, b: Float32Array): number {
  let s = 0;
  let d = 0;
  for (let i = 0; i < b.length; i++) {
    s = Math.max(s, Math.abs(b[i]));
    d = Math.max(d, Math.abs(a[i] - b[i]));
  }
  return a.length === b.length ? d / (s || 1) : Infinity;
}

/** A minimal safetensors writer (F32 / I64 / I32 as read from a checkpoint). */
function safetensors(tensors: Map<string, TensorData>): Buffer {
  const names: Record<string, string> = { f32: 'F32', i64: 'I64', i32: 'I32', f64: 'F64', bf16: 'BF16', f16: 'F16', u8: 'U8' };
  const header: Record<string, unknown> = {};
  let off = 0;
  for (const [n, t] of tensors) {
    header[n] = { dtype: names[t.dtype], shape: t.shape, data_offsets: [off, off + t.data.length] };
    off += t.data.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, Buffer.from(json), ...[...tensors.values()].map((t) => t.data)]);
}
