/**
 * Writers for the checkpoint tests: a STORED zip (optionally ZIP64, with torch's 64-byte data alignment), a pickle
 * opcode emitter, a torch.save-style archive built from both, and a safetensors writer. Kept small and explicit so
 * tests can also forge broken files byte by byte.
 */

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from '../lib/image/png.js';
import { createEngine } from '../lib/engine.js';
import { tinyTokenizerJson, type TinyModel } from '../lib/model/tiny.js';
import { t5EncoderShapes } from '../lib/text/t5-checkpoint.js';
import { T5TextEncoder } from '../lib/text/t5-encoder.js';

export { crc32 };

export interface ZipOptions {
  /** Write ZIP64 end records and extra fields even though the sizes are small (as torch does for big files). */
  zip64?: boolean;
  /** Pad each entry's data start to this many bytes with a local extra field (torch uses 64). */
  align?: number;
  /** Compression method recorded in the headers (data is still stored raw): for refusing non-stored entries. */
  method?: number;
}

export function zipStored(entries: { name: string; data: Uint8Array }[], opts: ZipOptions = {}): Buffer {
  const chunks: Buffer[] = [];
  let pos = 0;
  const central: Buffer[] = [];
  const align = opts.align ?? 64;
  for (const e of entries) {
    const name = Buffer.from(e.name, 'utf8');
    const crc = crc32(e.data);
    const local = Buffer.alloc(30);
    const base = pos + 30 + name.length;
    let pad = align > 1 ? (align - ((base + 4) % align)) % align : 0;
    const extra = align > 1 ? Buffer.alloc(4 + pad) : Buffer.alloc(0);
    if (align > 1) {
      extra.writeUInt16LE(0x4246, 0); // 'FB', torch's padding record id
      extra.writeUInt16LE(pad, 2);
    } else pad = 0;
    local.writeUInt32LE(0x04034b50, 0);
    local.writeUInt16LE(opts.zip64 ? 45 : 20, 4);
    local.writeUInt16LE(opts.method ?? 0, 8);
    local.writeUInt32LE(crc, 14);
    local.writeUInt32LE(e.data.length, 18);
    local.writeUInt32LE(e.data.length, 22);
    local.writeUInt16LE(name.length, 26);
    local.writeUInt16LE(extra.length, 28);
    const offset = pos;
    for (const b of [local, name, extra, Buffer.from(e.data)]) {
      chunks.push(b);
      pos += b.length;
    }
    const z64 = opts.zip64 ? Buffer.alloc(4 + 24) : Buffer.alloc(0);
    if (opts.zip64) {
      z64.writeUInt16LE(1, 0);
      z64.writeUInt16LE(24, 2);
      z64.writeBigUInt64LE(BigInt(e.data.length), 4);
      z64.writeBigUInt64LE(BigInt(e.data.length), 12);
      z64.writeBigUInt64LE(BigInt(offset), 20);
    }
    const c = Buffer.alloc(46);
    c.writeUInt32LE(0x02014b50, 0);
    c.writeUInt16LE(opts.zip64 ? 45 : 20, 4);
    c.writeUInt16LE(opts.zip64 ? 45 : 20, 6);
    c.writeUInt16LE(opts.method ?? 0, 10);
    c.writeUInt32LE(crc, 16);
    c.writeUInt32LE(opts.zip64 ? 0xffffffff : e.data.length, 20);
    c.writeUInt32LE(opts.zip64 ? 0xffffffff : e.data.length, 24);
    c.writeUInt16LE(name.length, 28);
    c.writeUInt16LE(z64.length, 30);
    c.writeUInt32LE(opts.zip64 ? 0xffffffff : offset, 42);
    central.push(c, name, z64);
  }
  const cd = Buffer.concat(central);
  const cdOffset = pos;
  chunks.push(cd);
  pos += cd.length;
  if (opts.zip64) {
    const z = Buffer.alloc(56);
    z.writeUInt32LE(0x06064b50, 0);
    z.writeBigUInt64LE(44n, 4);
    z.writeUInt16LE(45, 12);
    z.writeUInt16LE(45, 14);
    z.writeBigUInt64LE(BigInt(entries.length), 24);
    z.writeBigUInt64LE(BigInt(entries.length), 32);
    z.writeBigUInt64LE(BigInt(cd.length), 40);
    z.writeBigUInt64LE(BigInt(cdOffset), 48);
    const loc = Buffer.alloc(20);
    loc.writeUInt32LE(0x07064b50, 0);
    loc.writeBigUInt64LE(BigInt(pos), 8);
    loc.writeUInt32LE(1, 16);
    chunks.push(z, loc);
    pos += 76;
  }
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(opts.zip64 ? 0xffff : entries.length, 8);
  end.writeUInt16LE(opts.zip64 ? 0xffff : entries.length, 10);
  end.writeUInt32LE(opts.zip64 ? 0xffffffff : cd.length, 12);
  end.writeUInt32LE(opts.zip64 ? 0xffffffff : cdOffset, 16);
  chunks.push(end);
  return Buffer.concat(chunks);
}

/** Emits pickle opcodes; each method appends one opcode (with its argument) and returns `this`. */
export class Pickler {
  readonly #parts: Buffer[] = [];
  #memo = 0;
  constructor(readonly protocol = 2) {
    this.op(0x80, [protocol]);
  }
  op(code: number, arg: ArrayLike<number> | Buffer = []): this {
    this.#parts.push(Buffer.from([code]), Buffer.from(arg as ArrayLike<number>));
    return this;
  }
  mark(): this {
    return this.op(0x28);
  }
  str(s: string): this {
    const b = Buffer.from(s, 'utf8');
    if (this.protocol >= 4 && b.length < 256) return this.op(0x8c, Buffer.concat([Buffer.from([b.length]), b]));
    const n = Buffer.alloc(4);
    n.writeUInt32LE(b.length);
    return this.op(0x58, Buffer.concat([n, b]));
  }
  int(v: number): this {
    if (v >= 0 && v < 256) return this.op(0x4b, [v]);
    if (v >= 0 && v < 65536) return this.op(0x4d, [v & 0xff, v >> 8]);
    if (v >= -(2 ** 31) && v < 2 ** 31) {
      const b = Buffer.alloc(4);
      b.writeInt32LE(v);
      return this.op(0x4a, b);
    }
    const b = Buffer.alloc(8);
    b.writeBigInt64LE(BigInt(v));
    return this.op(0x8a, Buffer.concat([Buffer.from([8]), b]));
  }
  bool(v: boolean): this {
    return this.op(v ? 0x88 : 0x89);
  }
  none(): this {
    return this.op(0x4e);
  }
  global(module: string, name: string): this {
    if (this.protocol >= 4) return this.str(module).str(name).op(0x93);
    return this.op(0x63, Buffer.from(`${module}\n${name}\n`, 'utf8'));
  }
  /** Memoizes the top of the stack and returns its memo index through `out`. */
  put(out?: { id: number }): this {
    const id = this.#memo++;
    if (out) out.id = id;
    if (this.protocol >= 4) return this.op(0x94);
    if (id < 256) return this.op(0x71, [id]);
    const b = Buffer.alloc(4);
    b.writeUInt32LE(id);
    return this.op(0x72, b);
  }
  get(id: number): this {
    if (id < 256) return this.op(0x68, [id]);
    const b = Buffer.alloc(4);
    b.writeUInt32LE(id);
    return this.op(0x6a, b);
  }
  tuple(n: number): this {
    return n === 0 ? this.op(0x29) : n <= 3 ? this.op(0x84 + n) : this.op(0x74);
  }
  emptyDict(): this {
    return this.op(0x7d);
  }
  setitems(): this {
    return this.op(0x75);
  }
  setitem(): this {
    return this.op(0x73);
  }
  reduce(): this {
    return this.op(0x52);
  }
  persid(): this {
    return this.op(0x51);
  }
  stop(): Buffer {
    this.op(0x2e);
    return Buffer.concat(this.#parts);
  }
}

export type TorchDType = 'f32' | 'f64' | 'bf16' | 'f16' | 'i64' | 'i32' | 'u8' | 'bool';

export const STORAGE_NAMES: Record<TorchDType, string> = {
  f32: 'FloatStorage',
  f64: 'DoubleStorage',
  bf16: 'BFloat16Storage',
  f16: 'HalfStorage',
  i64: 'LongStorage',
  i32: 'IntStorage',
  u8: 'ByteStorage',
  bool: 'BoolStorage',
};

export interface PthTensor {
  name: string;
  dtype: TorchDType;
  shape: number[];
  /** Storage key; tensors sharing a key share the storage (its data is that of the first such tensor). */
  key: string;
  /** Storage contents (little-endian); only read for the first tensor of each key. */
  storage: Uint8Array;
  /** Elements the persistent id claims (default: storage bytes / element size). */
  storageNumel?: number;
  offset?: number;
  stride?: number[];
  /** Wrap in torch._utils._rebuild_parameter, as state dicts of nn.Parameters do. */
  parameter?: boolean;
}

export interface PthOptions {
  protocol?: number;
  /** Nest the state dict one level: `{wrap: OrderedDict(...)}`, as torch.save({"vae": sd}). */
  wrap?: string;
  zip?: ZipOptions;
  /** Storage entries to leave out of the archive. */
  omitStorage?: string[];
  /** Replace the data of a storage entry in the archive (the pickle still claims the original size). */
  storageOverride?: Record<string, Uint8Array>;
}

const ELEM: Record<TorchDType, number> = { f32: 4, f64: 8, bf16: 2, f16: 2, i64: 8, i32: 4, u8: 1, bool: 1 };

export function rowMajor(shape: readonly number[]): number[] {
  const s = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc;
    acc *= shape[i];
  }
  return s;
}

function intTuple(p: Pickler, values: readonly number[]): void {
  if (values.length > 3) p.mark();
  for (const v of values) p.int(v);
  p.tuple(values.length).put();
}

/** The data.pkl torch.save writes for an OrderedDict of tensors (same opcode pattern as torch 1.13). */
export function torchPickle(tensors: PthTensor[], opts: PthOptions = {}): Buffer {
  const p = new Pickler(opts.protocol ?? 2);
  const memo = new Map<string, number>();
  const memoized = (key: string, emit: () => void): void => {
    const id = memo.get(key);
    if (id !== undefined) p.get(id);
    else {
      emit();
      const o = { id: 0 };
      p.put(o);
      memo.set(key, o.id);
    }
  };
  if (opts.wrap !== undefined) p.emptyDict().put().str(opts.wrap).put();
  memoized('OrderedDict', () => p.global('collections', 'OrderedDict'));
  p.tuple(0).reduce().put().mark();
  for (const t of tensors) {
    p.str(t.name).put();
    if (t.parameter) memoized('_rebuild_parameter', () => p.global('torch._utils', '_rebuild_parameter'));
    memoized('_rebuild_tensor_v2', () => p.global('torch._utils', '_rebuild_tensor_v2'));
    p.mark().mark();
    memoized('s:storage', () => p.str('storage'));
    memoized(`g:${t.dtype}`, () => p.global('torch', STORAGE_NAMES[t.dtype]));
    p.str(t.key).put();
    memoized('s:cpu', () => p.str('cpu'));
    p.int(t.storageNumel ?? t.storage.length / ELEM[t.dtype]).tuple(5).put().persid();
    p.int(t.offset ?? 0);
    intTuple(p, t.shape);
    intTuple(p, t.stride ?? rowMajor(t.shape));
    p.bool(false);
    memoized('OrderedDict', () => p.global('collections', 'OrderedDict'));
    p.tuple(0).reduce().put().tuple(6).put().reduce().put();
    if (t.parameter) p.bool(true).get(memo.get('OrderedDict')!).tuple(0).reduce().tuple(3).reduce().put();
  }
  p.setitems();
  if (opts.wrap !== undefined) p.setitem();
  return p.stop();
}

/** A torch.save-style zip: `<root>/data.pkl`, `<root>/data/<key>` per storage, `<root>/version`. */
export function torchArchive(tensors: PthTensor[], opts: PthOptions & { root?: string; pickle?: Buffer } = {}): Buffer {
  const root = opts.root ?? 'archive';
  const entries: { name: string; data: Uint8Array }[] = [{ name: `${root}/data.pkl`, data: opts.pickle ?? torchPickle(tensors, opts) }];
  const seen = new Set<string>();
  for (const t of tensors) {
    if (seen.has(t.key) || opts.omitStorage?.includes(t.key)) continue;
    seen.add(t.key);
    entries.push({ name: `${root}/data/${t.key}`, data: opts.storageOverride?.[t.key] ?? t.storage });
  }
  entries.push({ name: `${root}/version`, data: Buffer.from('3\n') });
  return zipStored(entries, opts.zip);
}

export type StDType = 'F32' | 'F64' | 'BF16' | 'F16' | 'I64' | 'I32' | 'U8' | 'BOOL' | 'I8';

export interface StTensor {
  name: string;
  dtype: StDType;
  shape: number[];
  data: Uint8Array;
  /** Forge the recorded offsets (relative to the data section). */
  offsets?: [number, number];
}

/** A safetensors file; the header is padded with spaces to a multiple of 8 as the reference writer does. */
export function safetensors(tensors: StTensor[], metadata: Record<string, string> = { format: 'pt' }): Buffer {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let off = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: t.offsets ?? [off, off + t.data.length] };
    off += t.data.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const n = Buffer.alloc(8);
  n.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  return Buffer.concat([n, Buffer.from(json, 'utf8'), ...tensors.map((t) => Buffer.from(t.data))]);
}

/**
 * Writes a tiny model as files the CLI reads: weights.safetensors, vae.safetensors, its T5 as a Hugging Face
 * directory (t5/: config.json, model.safetensors, tokenizer.json) and text.safetensors, the T5 features of `prompts`
 * (concatenated, with their lengths) as the tiny T5 computes them on the CPU. Returns the paths.
 */
export async function writeTinyModelFiles(dir: string, tiny: TinyModel, prompts: string[]): Promise<{ weights: string; vae: string; text: string; t5: string }> {
  const dump = (ckpt: TinyModel['weights'], path: string) => {
    writeFileSync(path, safetensors(ckpt.names.map((name) => {
      const e = ckpt.entry(name);
      return { name, dtype: e.dtype === 'i64' ? 'I64' : 'F32', shape: [...e.shape], data: ckpt.bytes(name) };
    })));
    return path;
  };
  const t5 = join(dir, 't5');
  mkdirSync(t5, { recursive: true });
  const c = tiny.t5.config;
  writeFileSync(join(t5, 'config.json'), JSON.stringify({
    model_type: 't5', d_model: c.dModel, d_kv: c.dKv, num_heads: c.heads, num_layers: c.layers, d_ff: c.dFf, feed_forward_proj: 'gated-gelu',
    relative_attention_num_buckets: c.buckets, relative_attention_max_distance: c.maxDistance, layer_norm_epsilon: c.eps, vocab_size: c.vocab,
  }));
  writeFileSync(join(t5, 'tokenizer.json'), JSON.stringify(tinyTokenizerJson()));
  const t5Tensors: StTensor[] = [];
  for (const name of t5EncoderShapes(c).keys()) {
    const t = await tiny.t5.read(name);
    t5Tensors.push({ name, dtype: 'F32', shape: [...t.shape], data: t.data });
  }
  writeFileSync(join(t5, 'model.safetensors'), safetensors(t5Tensors));
  const engine = await createEngine({ backend: 'cpu', threads: 2 });
  let features;
  try {
    const encoder = await T5TextEncoder.load(engine, tiny.t5, tiny.tokenizer, { dtype: 'f32' });
    features = await encoder.encode(prompts);
    encoder.dispose();
  } finally {
    engine.dispose();
  }
  const lens = Int32Array.from(features.lens);
  const text = join(dir, 'text.safetensors');
  writeFileSync(text, safetensors([
    { name: 'kv', dtype: 'F32', shape: [features.kv.length / c.dModel, c.dModel], data: new Uint8Array(features.kv.buffer) },
    { name: 'lens', dtype: 'I32', shape: [lens.length], data: new Uint8Array(lens.buffer) },
  ]));
  return { weights: dump(tiny.weights, join(dir, 'weights.safetensors')), vae: dump(tiny.vae, join(dir, 'vae.safetensors')), text, t5 };
}
