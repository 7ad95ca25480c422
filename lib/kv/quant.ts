/**
 * 8-bit K/V rows (kernels/kv_quant.h, the format every backend stores): one byte per element and one f32 scale per
 * (token, head) row, the row's largest magnitude over the largest code (127 for int8, 448 for fp8 e4m3). These are
 * the same functions in TypeScript: the cache reads 8-bit histories back with them, and the tests use them as the
 * reference the kernels' bytes must equal.
 */
import type { KvFormat } from '../ops.js';

const f32 = Math.fround;

export type QuantisedKvFormat = Exclude<KvFormat, 'plain'>;

export function kvCodeMax(format: QuantisedKvFormat): number {
  return format === 'int8' ? 127 : 448;
}

/** OCP fp8 e4m3 (bias 7, no infinities) to its value; subnormals are m x 2^-9. */
export function fp8E4m3ToNumber(byte: number): number {
  const e = (byte >> 3) & 15;
  const m = byte & 7;
  const magnitude = e ? (8 + m) * 2 ** (e - 10) : m * 2 ** -9;
  return byte & 0x80 ? -magnitude : magnitude;
}

/** f32 to fp8 e4m3, round to nearest even, saturating at 448; NaN gives 0 (its row's scale carries the NaN). */
export function numberToFp8E4m3(x: number): number {
  const sign = x < 0 || Object.is(x, -0) ? 0x80 : 0;
  const a = Math.abs(x);
  if (!(a > 0)) return Number.isNaN(x) ? 0 : sign;
  if (a >= 448) return sign | 0x7e;
  if (a < 2 ** -6) return sign | roundHalfEven(a * 512);
  const exponent = Math.floor(Math.log2(a));
  const e = a >= 2 ** (exponent + 1) ? exponent + 1 : a < 2 ** exponent ? exponent - 1 : exponent;  // log2's rounding
  const code = ((e + 7) << 3) + roundHalfEven((a / 2 ** e - 1) * 8);
  return sign | Math.min(code, 0x7e);
}

function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export function decodeKvCode(format: QuantisedKvFormat, byte: number): number {
  return format === 'int8' ? (byte << 24) >> 24 : fp8E4m3ToNumber(byte);
}

/** The codes and scale of one f32 row, as every backend stores it. */
export function quantiseKvRow(format: QuantisedKvFormat, row: ArrayLike<number>): { codes: Uint8Array; scale: number } {
  let amax = 0;
  for (let i = 0; i < row.length; i++) {
    const m = Math.abs(row[i]);
    if (!(m <= amax)) amax = Number.isNaN(m) ? Infinity : m;
  }
  const codes = new Uint8Array(row.length);
  if (amax === 0) return { codes, scale: 0 };
  if (!Number.isFinite(amax)) return { codes, scale: NaN };
  const max = kvCodeMax(format);
  const inv = f32(max / amax);
  for (let i = 0; i < row.length; i++) {
    const y = f32(row[i] * inv);
    codes[i] = format === 'int8' ? Math.min(Math.max(roundHalfEven(y), -127), 127) & 0xff : numberToFp8E4m3(y);
  }
  return { codes, scale: f32(amax / max) };
}

/** Rows of `dim` codes times their scales, as f32. */
export function dequantiseKvRows(format: QuantisedKvFormat, codes: Uint8Array, scales: Float32Array, dim: number): Float32Array {
  const out = new Float32Array(codes.length);
  for (let i = 0; i < codes.length; i++) out[i] = decodeKvCode(format, codes[i]) * scales[Math.floor(i / dim)];
  return out;
}
