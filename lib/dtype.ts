/** Element types of tensors, and host-side conversions for the 16-bit float formats. */
export type DType = 'f32' | 'bf16' | 'f16' | 'i32' | 'u8';
export const DTYPES: readonly DType[] = ['f32', 'bf16', 'f16', 'i32', 'u8'];

export function dtypeSize(dtype: DType): number {
  return dtype === 'u8' ? 1 : dtype === 'bf16' || dtype === 'f16' ? 2 : 4;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** Round-to-nearest-even f32 -> bf16 bits, NaN preserved (as torch and __float2bfloat16_rn). */
export function f32ToBf16Bits(x: number): number {
  f32[0] = x;
  const bits = u32[0];
  if ((bits & 0x7fffffff) > 0x7f800000) return ((bits >>> 16) | 0x40) & 0xffff;
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16BitsToF32(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0];
}

export function f16BitsToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** Values as bf16 would store them (f32 -> bf16 -> f32), for references computed on rounded inputs. */
export function roundToBf16(values: Float32Array): Float32Array {
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = bf16BitsToF32(f32ToBf16Bits(values[i]));
  return out;
}

export function bf16ToF32Array(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  const view = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) view[i] = bits[i] << 16;
  return out;
}

export function f16ToF32Array(bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  for (let i = 0; i < bits.length; i++) out[i] = f16BitsToF32(bits[i]);
  return out;
}
