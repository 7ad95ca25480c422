import test, { type ExecutionContext } from 'ava';
import type { BackendName, Tensor } from '../lib/engine.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../lib/dtype.js';
import { bsqCodeValue } from '../lib/ops.js';
import { conv2dRef, groupNormRef, imageToU8Ref, resizeBilinearRef } from './latent-reference.js';
import { bf16Round, maxAbs, maxAbsDiff, Rng, seedFor, testBackends, withEngine } from './helpers.js';

const roundBf16 = (x: number) => bf16BitsToF32(f32ToBf16Bits(x));
const f32 = async (t: Tensor) => (await t.read()) as Float32Array;

/** Exact comparison that stays fast on large arrays (ava's deepEqual diffs element by element). */
function mismatches(actual: ArrayLike<number>, want: ArrayLike<number>): number {
  if (actual.length !== want.length) return Infinity;
  let n = 0;
  for (let i = 0; i < want.length; i++) if (!Object.is(actual[i], want[i])) n++;
  return n;
}

/** f32: within 1e-5 of the reference's magnitude. */
function closeF32(actual: ArrayLike<number>, ref: ArrayLike<number>): { ok: boolean; err: number } {
  const err = maxAbsDiff(actual, ref);
  return { ok: err <= 1e-5 * Math.max(1, maxAbs(ref)), err };
}

/** bf16 output: within twice the error of rounding the exact result to bf16 (plus an f32 accumulation term). */
function closeBf16(actual: ArrayLike<number>, ref: ArrayLike<number>): { ok: boolean; err: number; refErr: number } {
  const err = maxAbsDiff(actual, ref);
  const refErr = maxAbsDiff(Array.from(ref, roundBf16), ref);
  return { ok: err <= 2 * refErr + 1e-5 * Math.max(1, maxAbs(ref)), err, refErr };
}

/** closeF32 or closeBf16 by the output dtype, as one assertion. */
function expectClose(t: ExecutionContext, dtype: 'f32' | 'bf16', got: ArrayLike<number>, ref: ArrayLike<number>, label: string): void {
  if (dtype === 'f32') {
    const r = closeF32(got, ref);
    t.true(r.ok, `${label}: error ${r.err}`);
  } else {
    const r = closeBf16(got, ref);
    t.true(r.ok, `${label}: error ${r.err} vs bf16 rounding ${r.refErr}`);
  }
}

/** conv2d over [B, I, O, H, W, k, bias 0/1] cases against conv2dRef of the stored (dtype-rounded) inputs. */
async function checkConv2d(t: ExecutionContext, backend: BackendName, dtype: 'f32' | 'bf16', cases: number[][]): Promise<void> {
  const rng = new Rng(seedFor(t));
  await withEngine(backend, async (e) => {
    for (const [B, I, O, H, W, k, biasFlag] of cases) {
      const round = dtype === 'bf16' ? bf16Round : (a: Float32Array) => a;
      const x = round(rng.normals(B * I * H * W));
      const w = round(rng.normals(O * I * k * k, 1 / Math.sqrt(I * k * k)));
      const bias = round(rng.normals(O));
      const withBias = biasFlag === 1;
      const out = e.empty([B, O, H, W], dtype, { fillByte: 0xff });
      e.ops.conv2d({
        input: e.tensor(x, [B, I, H, W], dtype),
        weight: e.tensor(w, [O, I, k, k], dtype),
        bias: withBias ? e.tensor(bias, [O], dtype) : undefined,
        out,
      });
      const ref = conv2dRef(x, w, withBias ? bias : undefined, B, I, O, H, W, k);
      const got = await f32(out);
      expectClose(t, dtype, got, ref, `${[B, I, O, H, W, k]} bias=${withBias}`);
    }
  });
}

test('bsqCodeValue is the official f32 code magnitude (1/sqrt(d), L2-normalised)', (t) => {
  t.is(bsqCodeValue(32), 0.1767767071723938);
  t.is(bsqCodeValue(16), 0.25);
  t.is(bsqCodeValue(14), Math.fround(0.26726127));
});

for (const backend of testBackends()) {
  test(`bitsToCodes ${backend}: u8 and i32 bits -> channels-first +-value codes`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const [B, h, w, d] of [[1, 1, 1, 32], [2, 3, 5, 14], [1, 4, 4, 56]]) {
        for (const dtype of ['u8', 'i32'] as const) {
          const raw = Array.from({ length: B * h * w * d }, () => rng.int(0, 1));
          const bits = e.tensor(dtype === 'u8' ? Uint8Array.from(raw) : Int32Array.from(raw), [B, h, w, d], dtype);
          const out = e.empty([B, d, h, w], 'f32', { fillByte: 0xff });
          e.ops.bitsToCodes({ bits, out });
          const got = await f32(out);
          const v = bsqCodeValue(d);
          let bad = 0;
          for (let b = 0; b < B; b++)
            for (let c = 0; c < d; c++)
              for (let p = 0; p < h * w; p++)
                if (got[(b * d + c) * h * w + p] !== (raw[(b * h * w + p) * d + c] ? v : -v)) bad++;
          t.is(bad, 0, `[${B},${h},${w},${d}] ${dtype}`);
        }
      }
    });
  });

  test(`resizeBilinear ${backend}: up, down, same size and accumulate match the torch formula`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const cases = [[1, 1, 1, 1, 16, 16], [1, 3, 2, 2, 16, 16], [2, 5, 12, 12, 16, 16], [1, 4, 16, 16, 6, 6], [1, 2, 64, 64, 2, 2],
        [1, 3, 7, 5, 11, 3], [2, 2, 9, 13, 9, 13], [1, 1, 1, 8, 4, 1]];
      for (const [B, C, h, w, oh, ow] of cases) {
        const x = rng.normals(B * C * h * w);
        const base = rng.normals(B * C * oh * ow);
        const input = e.tensor(x, [B, C, h, w], 'f32');
        const out = e.empty([B, C, oh, ow], 'f32', { fillByte: 0xff });
        e.ops.resizeBilinear({ input, out });
        const ref = resizeBilinearRef(x, B * C, h, w, oh, ow);
        const r = closeF32(await f32(out), ref);
        t.true(r.ok, `${[B, C, h, w, oh, ow]}: error ${r.err}`);
        const acc = e.tensor(base, [B, C, oh, ow], 'f32');
        e.ops.resizeBilinear({ input, out: acc, accumulate: true });
        const r2 = closeF32(await f32(acc), ref.map((v, i) => v + base[i]));
        t.true(r2.ok, `${[B, C, h, w, oh, ow]} accumulate: error ${r2.err}`);
      }
    });
  });

  for (const dtype of ['f32', 'bf16'] as const) {
    test(`conv2d ${backend} ${dtype}: 1x1 and 3x3 match a float64 reference`, async (t) => {
      // [B, I, O, H, W, k]: widths around the 8-column CPU tile, channel counts off every tile, 1x1 images.
      const cases = [[1, 1, 1, 1, 1, 3], [2, 5, 7, 6, 11, 3], [1, 16, 33, 9, 17, 3], [1, 3, 4, 3, 3, 3], [2, 12, 5, 4, 9, 1],
        [1, 32, 64, 8, 8, 3], [1, 64, 32, 5, 16, 1], [1, 8, 3, 1, 20, 3]];
      await checkConv2d(t, backend, dtype, cases.map((c) => [...c, c[2] % 2 === 1 || c[5] === 3 ? 1 : 0]));
    });
  }

  test(`conv2d ${backend} bf16: tensor-core tiles (128 channels x 128 pixels, K step 32) with every tail`, async (t) => {
    // [B, I, O, H, W, k, bias]: in 3/20/70 (K = I*k*k off the 32-step and, but for 32/24, off the 8-element
    // weight chunks), out 8/24/136 (one and two 128-channel tiles), pixel tiles crossing image rows and the
    // batch boundary, 1x1 and 3x5 images.
    const cases = [[1, 3, 8, 1, 1, 3, 1], [2, 20, 24, 3, 5, 3, 0], [1, 70, 136, 17, 9, 3, 1], [2, 3, 136, 33, 40, 1, 1],
      [1, 20, 8, 33, 40, 3, 1], [2, 70, 24, 17, 9, 1, 0], [1, 3, 24, 1, 1, 1, 0], [1, 32, 136, 33, 40, 3, 1],
      [2, 24, 8, 3, 5, 1, 1], [2, 70, 136, 17, 9, 3, 1]];
    await checkConv2d(t, backend, 'bf16', cases);
  });

  test(`conv2d ${backend}: f32 activations with bf16 weights`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const [B, I, O, H, W] = [1, 24, 10, 7, 13];
      const x = rng.normals(B * I * H * W);
      const w = bf16Round(rng.normals(O * I * 9, 0.2));
      const bias = bf16Round(rng.normals(O));
      const out = e.empty([B, O, H, W], 'f32', { fillByte: 0xff });
      e.ops.conv2d({ input: e.tensor(x, [B, I, H, W], 'f32'), weight: e.tensor(w, [O, I, 3, 3], 'bf16'), bias: e.tensor(bias, [O], 'bf16'), out });
      const r = closeF32(await f32(out), conv2dRef(x, w, bias, B, I, O, H, W, 3));
      t.true(r.ok, `error ${r.err}`);
    });
  });

  for (const dtype of ['f32', 'bf16'] as const) {
    test(`groupNorm ${backend} ${dtype}: with and without swish, in place, matches a float64 reference`, async (t) => {
      const rng = new Rng(seedFor(t));
      await withEngine(backend, async (e) => {
        // [B, C, G, H, W]
        const cases = [[1, 32, 32, 1, 1], [2, 64, 32, 5, 7], [1, 48, 24, 3, 11], [1, 96, 32, 16, 16], [3, 6, 2, 2, 9]];
        for (const [B, C, G, H, W] of cases) {
          for (const swish of [false, true]) {
            const round = dtype === 'bf16' ? bf16Round : (a: Float32Array) => a;
            // An offset mean makes the variance sensitive to cancellation.
            const x = round(rng.normals(B * C * H * W).map((v) => 3 + 2 * v));
            const weight = rng.normals(C).map((v) => 1 + 0.1 * v);
            const bias = rng.normals(C, 0.1);
            const input = e.tensor(x, [B, C, H, W], dtype);
            const inPlace = swish;
            const out = inPlace ? input : e.empty([B, C, H, W], dtype, { fillByte: 0xff });
            e.ops.groupNorm({ input, weight: e.tensor(weight, [C], 'f32'), bias: e.tensor(bias, [C], 'f32'), out, groups: G, eps: 1e-6, swish });
            const ref = groupNormRef(x, weight, bias, B, C, H * W, G, 1e-6, swish);
            const got = await f32(out);
            expectClose(t, dtype, got, ref, `${[B, C, G, H, W]} swish=${swish}`);
          }
        }
      });
    });
  }

  test(`upsampleNearest2x ${backend}: every pixel becomes a 2x2 block (f32, bf16, u8)`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const [B, C, H, W] of [[1, 1, 1, 1], [2, 3, 5, 7], [1, 4, 8, 8]]) {
        const x = rng.normals(B * C * H * W);
        const want = new Float32Array(B * C * 4 * H * W);
        for (let p = 0; p < B * C; p++)
          for (let y = 0; y < 2 * H; y++)
            for (let xx = 0; xx < 2 * W; xx++) want[(p * 2 * H + y) * 2 * W + xx] = x[(p * H + (y >> 1)) * W + (xx >> 1)];
        for (const dtype of ['f32', 'bf16'] as const) {
          const out = e.empty([B, C, 2 * H, 2 * W], dtype, { fillByte: 0xff });
          e.ops.upsampleNearest2x({ input: e.tensor(x, [B, C, H, W], dtype), out });
          t.is(mismatches(await f32(out), dtype === 'bf16' ? bf16Round(want) : want), 0, `${[B, C, H, W]} ${dtype}`);
        }
        const bytes = Uint8Array.from(x, (v) => (v * 40) & 0xff);
        const out8 = e.empty([B, C, 2 * H, 2 * W], 'u8', { fillByte: 0xff });
        e.ops.upsampleNearest2x({ input: e.tensor(bytes, [B, C, H, W], 'u8'), out: out8 });
        t.is(mismatches(await out8.read(), Uint8Array.from(want, (v) => (v * 40) & 0xff)), 0);
      }
    });
  });

  test(`pixelShuffle2x / pixelUnshuffle2x ${backend}: the spec 9.3 channel mapping, both directions`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const [B, h, w, c] of [[1, 1, 1, 14], [2, 3, 5, 14], [1, 4, 2, 3]]) {
        // Bits [B, h, w, 4c] -> [B, 2h, 2w, c]: out[b, 2r+dy, 2q+dx, ch] = in[b, r, q, ch*4 + dy*2 + dx].
        const bits = Uint8Array.from({ length: B * h * w * 4 * c }, () => rng.int(0, 1));
        const shuffled = e.empty([B, 2 * h, 2 * w, c], 'u8', { fillByte: 0xff });
        e.ops.pixelShuffle2x({ input: e.tensor(bits, [B, h, w, 4 * c], 'u8'), out: shuffled });
        const want = new Uint8Array(bits.length);
        for (let b = 0; b < B; b++)
          for (let r = 0; r < h; r++)
            for (let q = 0; q < w; q++)
              for (let ch = 0; ch < c; ch++)
                for (let dy = 0; dy < 2; dy++)
                  for (let dx = 0; dx < 2; dx++)
                    want[((b * 2 * h + 2 * r + dy) * 2 * w + 2 * q + dx) * c + ch] = bits[((b * h + r) * w + q) * 4 * c + ch * 4 + dy * 2 + dx];
        t.is(mismatches(await shuffled.read(), want), 0, `shuffle ${[B, h, w, c]}`);

        // Latent [B, c, 2h, 2w] -> tokens [B, h*w, 4c]: token r*w+q, channel ch*4 + dy*2 + dx = latent[ch, 2r+dy, 2q+dx].
        const latent = rng.normals(B * c * 4 * h * w);
        const tokens = e.empty([B, h * w, 4 * c], 'f32', { fillByte: 0xff });
        e.ops.pixelUnshuffle2x({ input: e.tensor(latent, [B, c, 2 * h, 2 * w], 'f32'), out: tokens });
        const wantTokens = new Float32Array(latent.length);
        for (let b = 0; b < B; b++)
          for (let r = 0; r < h; r++)
            for (let q = 0; q < w; q++)
              for (let ch = 0; ch < c; ch++)
                for (let dy = 0; dy < 2; dy++)
                  for (let dx = 0; dx < 2; dx++)
                    wantTokens[((b * h + r) * w + q) * 4 * c + ch * 4 + dy * 2 + dx] = latent[((b * c + ch) * 2 * h + 2 * r + dy) * 2 * w + 2 * q + dx];
        t.is(mismatches(await f32(tokens), wantTokens), 0, `unshuffle ${[B, h, w, c]}`);
      }
    });
  });

  test(`add ${backend}: out = a + b, also in place, f32 and bf16`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      for (const n of [1, 7, 100003]) {
        const a = rng.normals(n), b = rng.normals(n);
        const at = e.tensor(a, [n], 'f32'), bt = e.tensor(b, [n], 'f32');
        const out = e.empty([n], 'f32', { fillByte: 0xff });
        e.ops.add({ a: at, b: bt, out });
        const want = a.map((v, i) => v + b[i]);
        t.is(mismatches(await f32(out), want), 0);
        e.ops.add({ a: at, b: bt, out: bt });
        t.is(mismatches(await f32(bt), want), 0);
        const a16 = e.tensor(a, [n], 'bf16');
        e.ops.add({ a: a16, b: e.tensor(b, [n], 'bf16'), out: a16 });
        const a16r = bf16Round(a), b16r = bf16Round(b);
        t.is(mismatches(await f32(a16), bf16Round(a16r.map((v, i) => v + b16r[i]))), 0);
      }
    });
  });

  test(`imageToU8 ${backend}: clamp, (x+1)/2*255 truncated, NHWC RGB or BGR`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const [B, H, W] = [2, 5, 7];
      const img = rng.normals(B * 3 * H * W, 0.7);
      img.set([-1, 1, -3, 3, 0, 1 / 255, -1 + 2 / 255, NaN]);
      for (const bgr of [false, true]) {
        const out = e.empty([B, H, W, 3], 'u8', { fillByte: 0x77 });
        e.ops.imageToU8({ image: e.tensor(img, [B, 3, H, W], 'f32'), out, bgr });
        t.is(mismatches(await out.read(), imageToU8Ref(img, B, H, W, bgr)), 0, `bgr=${bgr}`);
      }
    });
  });

  test(`latent ops ${backend}: bad inputs throw coded errors at the call`, async (t) => {
    await withEngine(backend, async (e) => {
      const x = e.empty([1, 4, 3, 3], 'f32');
      const w3 = e.empty([2, 4, 3, 3], 'f32');
      const check = (fn: () => void, code: string, what: string) => t.throws(fn, { code }, what);
      check(() => e.ops.bitsToCodes({ bits: e.empty([1, 2, 2, 4], 'f32'), out: e.empty([1, 4, 2, 2], 'f32') }), 'ERR_DTYPE', 'float bits');
      check(() => e.ops.bitsToCodes({ bits: e.empty([1, 2, 2, 4], 'u8'), out: e.empty([1, 2, 2, 4], 'f32') }), 'ERR_SHAPE', 'codes not channels-first');
      check(() => e.ops.resizeBilinear({ input: x, out: e.empty([1, 3, 5, 5], 'f32') }), 'ERR_SHAPE', 'resize channel mismatch');
      check(() => e.ops.resizeBilinear({ input: x, out: e.empty([1, 4, 5, 5], 'bf16') }), 'ERR_DTYPE', 'resize bf16');
      check(() => e.ops.resizeBilinear({ input: x, out: x }), 'ERR_INVALID_ARG', 'resize in place');
      check(() => e.ops.conv2d({ input: x, weight: e.empty([2, 4, 5, 5], 'f32'), out: e.empty([1, 2, 3, 3], 'f32') }), 'ERR_SHAPE', 'conv 5x5');
      check(() => e.ops.conv2d({ input: x, weight: e.empty([2, 3, 3, 3], 'f32'), out: e.empty([1, 2, 3, 3], 'f32') }), 'ERR_SHAPE', 'conv in channels');
      check(() => e.ops.conv2d({ input: x, weight: w3, out: e.empty([1, 2, 3, 3], 'bf16') }), 'ERR_DTYPE', 'conv out dtype');
      check(() => e.ops.conv2d({ input: x, weight: w3, bias: e.empty([3], 'f32'), out: e.empty([1, 2, 3, 3], 'f32') }), 'ERR_SHAPE', 'conv bias');
      check(() => e.ops.conv2d({ input: x, weight: e.empty([4, 4, 3, 3], 'f32'), out: x }), 'ERR_INVALID_ARG', 'conv in place');
      check(() => e.ops.conv2d({ input: x, weight: w3 } as never), 'ERR_INVALID_ARG', 'conv without out');
      const gw = e.empty([4], 'f32'), gb = e.empty([4], 'f32');
      check(() => e.ops.groupNorm({ input: x, weight: gw, bias: gb, out: x, groups: 3 }), 'ERR_SHAPE', 'groups do not divide');
      check(() => e.ops.groupNorm({ input: x, weight: e.empty([3], 'f32'), bias: gb, out: x, groups: 2 }), 'ERR_SHAPE', 'gn weight');
      check(() => e.ops.groupNorm({ input: x, weight: gw, bias: e.empty([4], 'bf16'), out: x, groups: 2 }), 'ERR_DTYPE', 'gn bias dtype');
      check(() => e.ops.groupNorm({ input: x, weight: gw, bias: gb, out: x, groups: 2, eps: 0 }), 'ERR_INVALID_ARG', 'gn eps');
      check(() => e.ops.upsampleNearest2x({ input: x, out: e.empty([1, 4, 6, 5], 'f32') }), 'ERR_SHAPE', 'upsample shape');
      check(() => e.ops.pixelShuffle2x({ input: e.empty([1, 2, 2, 6], 'u8'), out: e.empty([1, 4, 4, 1], 'u8') }), 'ERR_SHAPE', 'shuffle channels');
      check(() => e.ops.pixelUnshuffle2x({ input: x, out: e.empty([1, 1, 16], 'f32') }), 'ERR_SHAPE', 'unshuffle odd size');
      check(() => e.ops.add({ a: x, b: e.empty([1, 4, 3, 2], 'f32'), out: x }), 'ERR_SHAPE', 'add shapes');
      check(() => e.ops.add({ a: e.empty([3], 'i32'), b: e.empty([3], 'i32'), out: e.empty([3], 'i32') }), 'ERR_DTYPE', 'add i32');
      check(() => e.ops.imageToU8({ image: x, out: e.empty([1, 3, 3, 3], 'u8') }), 'ERR_SHAPE', 'image with 4 channels');
      check(() => e.ops.imageToU8({ image: e.empty([1, 3, 2, 2], 'f32'), out: e.empty([1, 2, 2, 3], 'f32') }), 'ERR_DTYPE', 'image out dtype');
      await t.notThrowsAsync(e.sync());
    });
  });
}

