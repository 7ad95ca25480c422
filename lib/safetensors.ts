import { closeSync, fstatSync, openSync, read, readSync } from 'node:fs';
import { bf16ToF32Array, f16ToF32Array } from './dtype.js';
import { fail } from './errors.js';

/** dtypes of the safetensors format that scalekv reads. */
export type SafetensorsDType = 'F32' | 'F16' | 'BF16' | 'I32' | 'I64' | 'U8' | 'F64' | 'I8' | 'BOOL';

const SIZES: Record<SafetensorsDType, number> = { F32: 4, F16: 2, BF16: 2, I32: 4, I64: 8, U8: 1, F64: 8, I8: 1, BOOL: 1 };

export interface SafetensorsEntry {
  name: string;
  dtype: SafetensorsDType;
  shape: number[];
  /** Byte range inside the data section. */
  begin: number;
  end: number;
}

const MAX_HEADER = 100 << 20;

/**
 * A safetensors file opened lazily: the header is parsed and checked at open; tensor bytes are read on
 * demand, one tensor at a time, so multi-GB files are never read whole.
 */
export class SafetensorsFile {
  readonly path: string;
  readonly metadata: Record<string, string>;
  readonly #entries = new Map<string, SafetensorsEntry>();
  readonly #dataStart: number;
  #fd: number | null;

  constructor(path: string) {
    this.path = path;
    this.#fd = openSync(path, 'r');
    try {
      const size = fstatSync(this.#fd).size;
      const head = Buffer.alloc(8);
      if (size < 8 || readSync(this.#fd, head, 0, 8, 0) !== 8) fail('ERR_FORMAT', `${path}: too short for a safetensors header`);
      const n = head.readBigUInt64LE(0);
      if (n > BigInt(MAX_HEADER) || Number(n) + 8 > size) fail('ERR_FORMAT', `${path}: header length ${n} does not fit the file (${size} bytes)`);
      const headerBytes = Buffer.alloc(Number(n));
      if (readSync(this.#fd, headerBytes, 0, headerBytes.length, 8) !== headerBytes.length) fail('ERR_FORMAT', `${path}: header could not be read`);
      let header: Record<string, unknown>;
      try {
        header = JSON.parse(headerBytes.toString('utf8'));
      } catch (e) {
        fail('ERR_FORMAT', `${path}: header is not JSON (${(e as Error).message})`);
      }
      if (header === null || typeof header !== 'object' || Array.isArray(header)) fail('ERR_FORMAT', `${path}: header is not a JSON object`);
      this.#dataStart = 8 + Number(n);
      const dataBytes = size - this.#dataStart;
      this.metadata = stringMap(header.__metadata__ ?? {}, path);
      for (const [name, raw] of Object.entries(header)) {
        if (name === '__metadata__') continue;
        if (raw === null || typeof raw !== 'object') fail('ERR_FORMAT', `${path}: tensor ${name} has a malformed header entry`);
        const info = raw as { dtype?: string; shape?: unknown; data_offsets?: unknown };
        const dtype = info.dtype as SafetensorsDType;
        if (typeof dtype !== 'string' || !Object.hasOwn(SIZES, dtype)) fail('ERR_FORMAT', `${path}: tensor ${name} has unsupported dtype ${info.dtype}`);
        const shape = info.shape;
        if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0))
          fail('ERR_FORMAT', `${path}: tensor ${name} has a malformed shape`);
        const off = info.data_offsets;
        if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && d >= 0))
          fail('ERR_FORMAT', `${path}: tensor ${name} has malformed data_offsets`);
        const [begin, end] = off as [number, number];
        const numel = (shape as number[]).reduce((a, b) => a * b, 1);
        if (end - begin !== numel * SIZES[dtype] || end > dataBytes || begin > end)
          fail('ERR_FORMAT', `${path}: tensor ${name} (${dtype} ${JSON.stringify(shape)}) has offsets [${begin}, ${end}) that do not match its size or the file`);
        this.#entries.set(name, { name, dtype, shape: shape as number[], begin, end });
      }
      // Overlapping tensors would alias each other's bytes: never written by a correct writer, so a forged file.
      const sorted = [...this.#entries.values()].filter((e) => e.end > e.begin).sort((a, b) => a.begin - b.begin);
      for (let i = 1; i < sorted.length; i++)
        if (sorted[i].begin < sorted[i - 1].end)
          fail('ERR_FORMAT', `${path}: tensors ${sorted[i - 1].name} [${sorted[i - 1].begin}, ${sorted[i - 1].end}) and ${sorted[i].name} [${sorted[i].begin}, ${sorted[i].end}) overlap`);
    } catch (e) {
      this.close();
      throw e;
    }
  }

  get names(): string[] {
    return [...this.#entries.keys()];
  }

  entry(name: string): SafetensorsEntry {
    const e = this.#entries.get(name);
    if (!e) fail('ERR_FORMAT', `${this.path}: no tensor named ${name}`);
    return e;
  }

  has(name: string): boolean {
    return this.#entries.has(name);
  }

  /** The raw little-endian bytes of one tensor. */
  bytes(name: string): Buffer {
    if (this.#fd === null) fail('ERR_DISPOSED', `${this.path}: file was closed`);
    const e = this.entry(name);
    const buf = Buffer.alloc(e.end - e.begin);
    let done = 0;
    while (done < buf.length) {
      const n = readSync(this.#fd, buf, done, buf.length - done, this.#dataStart + e.begin + done);
      if (n <= 0) fail('ERR_FORMAT', `${this.path}: tensor ${name} is truncated`);
      done += n;
    }
    return buf;
  }

  /** The same bytes as `bytes`, read without blocking the event loop (for large tensors). */
  async bytesAsync(name: string): Promise<Buffer> {
    if (this.#fd === null) fail('ERR_DISPOSED', `${this.path}: file was closed`);
    const fd = this.#fd;
    const e = this.entry(name);
    const buf = Buffer.alloc(e.end - e.begin);
    for (let done = 0; done < buf.length; ) {
      const want = Math.min(buf.length - done, 64 << 20);
      const n = await new Promise<number>((res, rej) =>
        read(fd, buf, done, want, this.#dataStart + e.begin + done, (err, bytes) => (err ? rej(err) : res(bytes))),
      );
      if (n <= 0) fail('ERR_FORMAT', `${this.path}: tensor ${name} is truncated`);
      done += n;
    }
    return buf;
  }

  /**
   * A tensor as a typed array: F32 -> Float32Array (F64, BF16, F16 converted), I32 -> Int32Array,
   * I64 -> Int32Array (range-checked).
   */
  f32(name: string): Float32Array {
    const e = this.entry(name);
    const b = this.bytes(name);
    if (e.dtype === 'F32') return new Float32Array(b.buffer, b.byteOffset, b.length / 4).slice();
    if (e.dtype === 'BF16' || e.dtype === 'F16') {
      const bits = new Uint16Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
      return e.dtype === 'BF16' ? bf16ToF32Array(bits) : f16ToF32Array(bits);
    }
    if (e.dtype === 'F64') return Float32Array.from(new Float64Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length)));
    fail('ERR_FORMAT', `${this.path}: tensor ${name} is ${e.dtype}, not a float tensor`);
  }

  i32(name: string): Int32Array {
    const e = this.entry(name);
    const b = this.bytes(name);
    if (e.dtype === 'I32') return new Int32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
    if (e.dtype === 'I64') {
      const wide = new BigInt64Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.length));
      const out = new Int32Array(wide.length);
      for (let i = 0; i < wide.length; i++) {
        if (wide[i] > 2147483647n || wide[i] < -2147483648n) fail('ERR_FORMAT', `${this.path}: ${name}[${i}] does not fit int32`);
        out[i] = Number(wide[i]);
      }
      return out;
    }
    fail('ERR_FORMAT', `${this.path}: tensor ${name} is ${e.dtype}, not an integer tensor`);
  }

  close(): void {
    if (this.#fd !== null) {
      closeSync(this.#fd);
      this.#fd = null;
    }
  }
}

/**
 * The `__metadata__` of a header: the format allows only a string → string map. Anything else (arrays nested
 * 200,000 deep, numbers, objects) is refused rather than handed on to code that prints or trusts it.
 */
function stringMap(v: unknown, path: string): Record<string, string> {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) fail('ERR_FORMAT', `${path}: __metadata__ is not a JSON object`);
  for (const [k, x] of Object.entries(v))
    if (typeof x !== 'string') fail('ERR_FORMAT', `${path}: __metadata__ entry ${JSON.stringify(k)} is ${Array.isArray(x) ? 'an array' : typeof x === 'object' ? (x === null ? 'null' : 'an object') : `a ${typeof x}`}, not a string`);
  return v as Record<string, string>;
}

/** A tensor to write: f32 or int32 data in row-major order. */
export interface SafetensorsTensor {
  name: string;
  shape: readonly number[];
  data: Float32Array | Int32Array;
}

/**
 * The bytes of a safetensors file holding `tensors` (little-endian, the header padded with spaces to a multiple
 * of 8 as the reference writer does): what `scalekv encode-text` writes and `readTextFeatures` reads.
 */
export function encodeSafetensors(tensors: readonly SafetensorsTensor[], metadata: Record<string, string> = {}): Buffer {
  const header: Record<string, unknown> = Object.keys(metadata).length ? { __metadata__: metadata } : {};
  let offset = 0;
  for (const t of tensors) {
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length) fail('ERR_SHAPE', `safetensors: ${t.name} has shape [${t.shape.join(', ')}] but ${t.data.length} values`);
    header[t.name] = { dtype: t.data instanceof Float32Array ? 'F32' : 'I32', shape: [...t.shape], data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  return Buffer.concat([size, Buffer.from(json, 'utf8'), ...tensors.map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength))]);
}
