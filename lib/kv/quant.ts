/**
 * 8-bit K/V rows (kernels/kv_quant.h, the format every backend stores): one byte per element, and one scale byte per
 * (token, head) holding the power-of-two scales of its K row and its V row: bits 7..5 = -e_K (e_K in [-6, 0]; keys
 * are unit vectors), bits 4..0 = e_V + 16 (e_V in [-16, 15]), 0xFF = a token whose K or V row is not finite (both
 * read back as NaN). A row reads back as code x 2^e / code_max (127 for int8, 448 for fp8 e4m3), e the smallest
 * exponent with the row's largest magnitude <= 2^e. These are the same functions in TypeScript: the cache reads 8-bit
 * histories back with them, and the tests use them as the reference the kernels' bytes must equal.
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

export const KV_SCALE_NON_FINITE = 0xff;
const KEY_EXP_MIN = -6, KEY_EXP_MAX = 0, VALUE_EXP_MIN = -16, VALUE_EXP_MAX = 15;

/** The largest magnitude of a row (a NaN counts as infinite), as f32 compares it. */
function rowAmax(row: ArrayLike<number>): number {
  let amax = 0;
  for (let i = 0; i < row.length; i++) {
    const m = Math.abs(f32(row[i]));
    if (!(m <= amax)) amax = Number.isNaN(m) ? Infinity : m;
  }
  return amax;
}

/** The smallest e in [lo, hi] with amax <= 2^e (lo for a zero or subnormal amax). */
function scaleExponent(amax: number, lo: number, hi: number): number {
  if (!(amax >= 2 ** -126)) return lo;
  let e = Math.floor(Math.log2(amax));
  if (2 ** e > amax) e--;           // log2's rounding
  else if (2 ** (e + 1) <= amax) e++;
  if (2 ** e < amax) e++;           // not a power of two: the next one up
  return Math.min(Math.max(e, lo), hi);
}

/** The scale byte of a token whose K and V rows have these largest magnitudes. */
export function kvScaleByte(kAmax: number, vAmax: number): number {
  if (!Number.isFinite(kAmax) || !Number.isFinite(vAmax)) return KV_SCALE_NON_FINITE;
  const ek = scaleExponent(kAmax, KEY_EXP_MIN, KEY_EXP_MAX);
  const ev = scaleExponent(vAmax, VALUE_EXP_MIN, VALUE_EXP_MAX);
  return (-ek << 5) | (ev - VALUE_EXP_MIN);
}

/** The dequantisation factor of the K (values false) or V row of a scale byte: f32(1 / code_max) x 2^e. */
export function kvRowScale(format: QuantisedKvFormat, byte: number, values: boolean): number {
  if (byte === KV_SCALE_NON_FINITE) return NaN;
  const e = values ? (byte & 31) + VALUE_EXP_MIN : -(byte >> 5);
  return f32(f32(1 / kvCodeMax(format)) * 2 ** e);
}

function encodeRow(format: QuantisedKvFormat, row: ArrayLike<number>, inv: number): Uint8Array {
  const codes = new Uint8Array(row.length);
  for (let i = 0; i < row.length; i++) {
    const y = f32(f32(row[i]) * inv);
    codes[i] = format === 'int8' ? Math.min(Math.max(roundHalfEven(y), -127), 127) & 0xff : numberToFp8E4m3(y);
  }
  return codes;
}

/** The K and V codes and the scale byte of one token's f32 rows, as every backend stores them. */
export function quantiseKvToken(format: QuantisedKvFormat, k: ArrayLike<number>, v: ArrayLike<number>): { k: Uint8Array; v: Uint8Array; scale: number } {
  const scale = kvScaleByte(rowAmax(k), rowAmax(v));
  if (scale === KV_SCALE_NON_FINITE) return { k: new Uint8Array(k.length), v: new Uint8Array(v.length), scale };
  const max = kvCodeMax(format);
  return { k: encodeRow(format, k, max * 2 ** (scale >> 5)), v: encodeRow(format, v, max * 2 ** (-VALUE_EXP_MIN - (scale & 31))), scale };
}

/** Rows of `dim` codes times their tokens' K (values false) or V scales, as f32. */
export function dequantiseKvRows(format: QuantisedKvFormat, codes: Uint8Array, scales: Uint8Array, dim: number, values: boolean): Float32Array {
  const out = new Float32Array(codes.length);
  for (let i = 0; i < codes.length; i++) out[i] = decodeKvCode(format, codes[i]) * kvRowScale(format, scales[Math.floor(i / dim)], values);
  return out;
}
