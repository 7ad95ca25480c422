import { endianness } from 'node:os';
import { bf16ToF32Array, f16ToF32Array } from '../dtype.js';
import type { Engine, HostArray, MemoryCategory, Tensor } from '../engine.js';
import { fail } from '../errors.js';
import type { Checkpoint, CheckpointDType, TensorData } from './index.js';

/** Engine dtypes a checkpoint tensor can be loaded as. */
export type LoadDType = 'f32' | 'bf16' | 'f16' | 'i32' | 'u8';

export interface LoadOptions {
  /** Device dtype; default: the file's own for bf16/f16, f32 for f32/f64, i32 for integers, u8 for u8/bool. */
  dtype?: LoadDType;
  /** Memory counter the tensor is charged to (default 'weights'). */
  category?: MemoryCategory;
  /** When given, the tensor must have exactly this shape (ERR_SHAPE otherwise, naming the tensor). */
  shape?: readonly number[];
}

const FLOATS: readonly CheckpointDType[] = ['f32', 'f64', 'bf16', 'f16'];

function defaultDType(src: CheckpointDType): LoadDType {
  if (src === 'bf16' || src === 'f16') return src;
  if (src === 'f32' || src === 'f64') return 'f32';
  if (src === 'u8' || src === 'bool') return 'u8';
  return 'i32';
}

/**
 * Reads one tensor from `checkpoint` and creates it on `engine`. Only this tensor's bytes are held on the host (plus
 * one converted copy where the dtype changes), so a model is streamed to the device tensor by tensor.
 */
export async function loadTensor(engine: Engine, checkpoint: Checkpoint, name: string, opts: LoadOptions = {}): Promise<Tensor> {
  const info = checkpoint.entry(name);
  if (opts.shape && (opts.shape.length !== info.shape.length || opts.shape.some((d, i) => d !== info.shape[i])))
    fail('ERR_SHAPE', `${checkpoint.path}: tensor ${name} has shape [${info.shape}], expected [${opts.shape}]`);
  const target = opts.dtype ?? defaultDType(info.dtype);
  const host = toHostArray(await checkpoint.read(name), target, `${checkpoint.path}: tensor ${name}`);
  return engine.tensor(host, info.shape, target, { category: opts.category ?? 'weights' });
}

/**
 * Converts checkpoint bytes to the array engine.tensor takes for `target`: 16-bit floats stay raw bits (Uint16Array)
 * when the dtype is unchanged, so bf16 weights are copied bit-exactly; a Float32Array is rounded by the engine.
 */
export function toHostArray(t: TensorData, target: LoadDType, what = 'tensor'): HostArray {
  if (endianness() !== 'LE') fail('ERR_INTERNAL', 'checkpoint loading assumes a little-endian host');
  const src = t.dtype;
  const isFloat = FLOATS.includes(src);
  if (target === 'bf16' || target === 'f16') {
    if (src === target) return view(t.data, Uint16Array);
    if (!isFloat) fail('ERR_DTYPE', `${what}: cannot load ${src} as ${target}`);
    return asF32(t);
  }
  if (target === 'f32') return asF32(t);
  if (isFloat) fail('ERR_DTYPE', `${what}: cannot load floating-point ${src} as ${target}`);
  const ints = asInts(t);
  if (target === 'u8') {
    if (src === 'u8' || src === 'bool') return view(t.data, Uint8Array);
    const out = new Uint8Array(ints.length);
    for (let i = 0; i < ints.length; i++) {
      const v = ints[i];
      if (v < 0 || v > 255) fail('ERR_DTYPE', `${what}: element ${i} = ${v} does not fit u8`);
      out[i] = Number(v);
    }
    return out;
  }
  if (src === 'i32') return view(t.data, Int32Array);
  const out = new Int32Array(ints.length);
  for (let i = 0; i < ints.length; i++) {
    const v = ints[i];
    if (v > 2147483647 || v < -2147483648) fail('ERR_DTYPE', `${what}: element ${i} = ${v} does not fit i32`);
    out[i] = Number(v);
  }
  return out;
}

function asF32(t: TensorData): Float32Array {
  switch (t.dtype) {
    case 'f32':
      return view(t.data, Float32Array);
    case 'f64':
      return Float32Array.from(view(t.data, Float64Array));
    case 'bf16':
      return bf16ToF32Array(view(t.data, Uint16Array));
    case 'f16':
      return f16ToF32Array(view(t.data, Uint16Array));
    default: {
      const ints = asInts(t);
      const out = new Float32Array(ints.length);
      for (let i = 0; i < ints.length; i++) out[i] = Number(ints[i]);
      return out;
    }
  }
}

function asInts(t: TensorData): ArrayLike<number | bigint> {
  switch (t.dtype) {
    case 'i64':
      return view(t.data, BigInt64Array);
    case 'i32':
      return view(t.data, Int32Array);
    case 'i8':
      return view(t.data, Int8Array);
    default:
      return view(t.data, Uint8Array);
  }
}

type Ctor<T> = { new (buffer: ArrayBuffer, byteOffset: number, length: number): T; BYTES_PER_ELEMENT: number };

/** A typed view of `buf`, copied only when its offset is misaligned for the element size. */
function view<T>(buf: Buffer, C: Ctor<T>): T {
  const n = C.BYTES_PER_ELEMENT;
  if (buf.length % n) fail('ERR_FORMAT', `tensor data of ${buf.length} bytes is not a whole number of ${n}-byte elements`);
  if (buf.byteOffset % n === 0) return new C(buf.buffer as ArrayBuffer, buf.byteOffset, buf.length / n);
  const copy = new ArrayBuffer(buf.length);
  new Uint8Array(copy).set(buf);
  return new C(copy, 0, buf.length / n);
}
