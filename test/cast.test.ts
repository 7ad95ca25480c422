/**
 * The cast op (f32 <-> bf16) on every backend against the bit-level reference of lib/dtype.ts (round to nearest even,
 * NaN kept a NaN): random values, every rounding boundary kind (exact ties both ways, just above and below a tie),
 * overflow to infinity, subnormals, signed zeros, infinities and NaNs (which stay NaNs); outputs poisoned first.
 */
import test from 'ava';
import { bf16BitsToF32, f32ToBf16Bits } from '../lib/dtype.js';
import { Rng, seedFor, testBackends, withEngine } from './helpers.js';

/** f32 values that exercise every branch of the rounding, then random ones of every magnitude. */
function values(rng: Rng, n: number): Float32Array {
  const bits = new Uint32Array(n);
  const special = [
    0x00000000, 0x80000000, 0x7f800000, 0xff800000, 0x7fc00000, 0xffc00001, 0x7f800001, // zeros, infinities, NaNs
    0x00000001, 0x807fffff, 0x00008000, 0x00018000, // subnormals, ties of subnormals
    0x7f7fffff, 0x7f7f8000, 0x7f7f7fff, 0xff7f8000, // the largest finite: a tie that rounds to infinity, one below it
    0x3f808000, 0x3f818000, 0x3f808001, 0x3f807fff, // ties to even (down, up), just above and below a tie
  ];
  for (let i = 0; i < n; i++) {
    if (i < special.length) bits[i] = special[i];
    else if (i % 4 === 0) bits[i] = ((rng.int(0, 0xffff) << 16) | 0x8000) >>> 0; // an exact tie
    else bits[i] = (rng.int(0, 0xffff) * 0x10000 + rng.int(0, 0xffff)) >>> 0; // any bits, NaNs included
  }
  return new Float32Array(bits.buffer);
}

const sameBits = (a: Uint16Array | Uint32Array, b: Uint16Array | Uint32Array) => a.length === b.length && a.every((x, i) => x === b[i]);

for (const backend of testBackends()) {
  test(`${backend}: cast rounds f32 to bf16 to nearest even and widens bf16 to f32 exactly, across shapes`, async (t) => {
    const seed = seedFor(t);
    const rng = new Rng(seed);
    await withEngine(backend, async (e) => {
      for (const shape of [[1], [5], [3, 7], [2, 3, 33], [4, 1, 1000], [2, 32, 16, 16]]) {
        const n = shape.reduce((a, b) => a * b, 1);
        const x = values(rng, n);
        const input = e.tensor(x, shape, 'f32');
        const narrow = e.empty(shape, 'bf16', { fillByte: 0xff });
        e.ops.cast({ input, out: narrow });
        const got = (await narrow.readRaw()) as Uint16Array;
        const want = Uint16Array.from(x, (v) => f32ToBf16Bits(v));
        // A NaN stays a NaN; its payload and sign are the implementation's (CUDA's __float2bfloat16_rn gives 0x7fff).
        const isNan = (b: number) => (b & 0x7fff) > 0x7f80;
        const bad = [...want].findIndex((w, i) => (isNan(w) ? !isNan(got[i]) : got[i] !== w));
        t.is(bad, -1, `seed ${seed}, [${shape}]: f32 ${x[bad]} (bits ${new Uint32Array(x.buffer)[bad]?.toString(16)}) -> bf16 ${got[bad]?.toString(16)}, want ${want[bad]?.toString(16)}`);
        // bf16 -> f32 is exact: the bits shifted up; bf16 -> bf16 and f32 -> f32 copy.
        const wide = e.empty(shape, 'f32', { fillByte: 0xff });
        e.ops.cast({ input: narrow, out: wide });
        const widened = new Uint32Array(((await wide.readRaw()) as Float32Array).buffer);
        const wantWide = Uint32Array.from(got, (b) => (isNan(b) ? NaN : new Uint32Array(new Float32Array([bf16BitsToF32(b)]).buffer)[0]));
        t.true(widened.every((w, i) => (isNan(got[i]) ? (w & 0x7fffffff) > 0x7f800000 : w === wantWide[i])), `seed ${seed}, [${shape}]: bf16 -> f32`);
        // bf16 -> bf16 copies every bit, NaN payloads and signs included (raw bits, not the rounding's NaNs).
        const raw = Uint16Array.from({ length: n }, (_, i) => (i % 3 === 0 ? [0xffc1, 0x7f81, 0xff80, 0x8000][i % 4] : rng.int(0, 0xffff)));
        const rawT = e.tensor(raw, shape, 'bf16');
        const copy = e.empty(shape, 'bf16', { fillByte: 0xff });
        e.ops.cast({ input: rawT, out: copy });
        t.true(sameBits((await copy.readRaw()) as Uint16Array, raw), `seed ${seed}, [${shape}]: bf16 -> bf16`);
        rawT.dispose();
        const same = e.empty(shape, 'f32', { fillByte: 0xff });
        e.ops.cast({ input, out: same });
        const kept = new Uint32Array(((await same.readRaw()) as Float32Array).buffer);
        const xb = new Uint32Array(x.buffer);
        t.true(sameBits(kept.map((b, i) => ((xb[i] & 0x7fffffff) > 0x7f800000 ? 0 : b)), xb.map((b) => ((b & 0x7fffffff) > 0x7f800000 ? 0 : b))), `seed ${seed}, [${shape}]: f32 -> f32`);
        for (const tensor of [input, narrow, wide, copy, same]) tensor.dispose();
      }
    });
  });

  test(`${backend}: cast refuses other dtypes and mismatched shapes with a coded error`, async (t) => {
    await withEngine(backend, async (e) => {
      const x = e.tensor(new Float32Array([1, 2, 3, 4]), [2, 2], 'f32');
      const wrongShape = e.empty([4], 'bf16');
      const ints = e.empty([2, 2], 'i32');
      t.throws(() => e.ops.cast({ input: x, out: wrongShape }), { code: 'ERR_SHAPE' });
      t.throws(() => e.ops.cast({ input: x, out: ints }), { code: 'ERR_DTYPE' });
      for (const tensor of [x, wrongShape, ints]) tensor.dispose();
    });
  });
}
