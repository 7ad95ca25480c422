import { closeSync, existsSync, openSync, readdirSync, readFileSync, readSync, realpathSync, statSync } from 'node:fs';
import { dirname, isAbsolute, join, normalize, relative, sep } from 'node:path';
import { fail } from '../errors.js';
import { SafetensorsDType, SafetensorsFile } from '../safetensors.js';
import { DTYPE_BYTES, PyDict, TensorDType, TensorRef, unpickle } from './unpickle.js';
import { ZipReader } from './zip.js';

/**
 * One read-only interface over the checkpoint formats of the official Infinity releases: a single safetensors file,
 * a sharded safetensors set (`model.safetensors.index.json`, the 8B format) and torch.save zip archives (`.pth`, the
 * 2B model and the VAEs) read through a safe unpickler. Opening parses only headers and directories; tensor bytes
 * are read one tensor at a time by `read`.
 */

export type CheckpointDType = TensorDType;
export { DTYPE_BYTES };

export interface TensorInfo {
  dtype: CheckpointDType;
  shape: number[];
  bytes: number;
}

export interface TensorData {
  dtype: CheckpointDType;
  shape: number[];
  /** Little-endian, contiguous (row-major). */
  data: Buffer;
}

export type CheckpointFormat = 'safetensors' | 'safetensors-sharded' | 'pth' | 'pth-sharded' | 'memory';

export interface Checkpoint {
  readonly path: string;
  readonly format: CheckpointFormat;
  /** Tensor names, flattened with '.' through nested dicts (a `.pth` of `{"vae": sd}` gives `vae.decoder...`). */
  readonly names: string[];
  /** A single safetensors file's `__metadata__` (a string → string map); undefined for the other formats. */
  readonly metadata?: Readonly<Record<string, string>>;
  has(name: string): boolean;
  entry(name: string): TensorInfo;
  read(name: string): Promise<TensorData>;
  close(): void;
}

export interface OpenOptions {
  /** Keep only the tensors under this prefix (e.g. 'vae.'), with the prefix stripped from their names. */
  prefix?: string;
}

const INDEX_NAME = 'model.safetensors.index.json';
const SINGLE_NAME = 'model.safetensors';
const BIN_INDEX_NAME = 'pytorch_model.bin.index.json';
const BIN_NAME = 'pytorch_model.bin';
const MAX_INDEX_JSON = 64 << 20;
const MAX_PICKLE = 256 << 20;
const MAX_NESTING = 32;
const MAX_DICT_VISITS = 1 << 22;

export function openCheckpoint(path: string, opts: OpenOptions = {}): Checkpoint {
  const inner = openRaw(path);
  if (!opts.prefix) return inner;
  try {
    return new Prefixed(inner, opts.prefix);
  } catch (e) {
    inner.close();
    throw e;
  }
}

function openRaw(path: string): Checkpoint {
  let st;
  try {
    st = statSync(path);
  } catch {
    fail('ERR_INVALID_ARG', `${path}: no such checkpoint file or directory`);
  }
  if (st.isDirectory()) {
    // Hugging Face layouts, safetensors first: model.safetensors(.index.json), then pytorch_model.bin(.index.json).
    if (existsSync(join(path, INDEX_NAME))) return new ShardedCheckpoint(join(path, INDEX_NAME));
    const files = readdirSync(path);
    const indexes = files.filter((f) => f.endsWith('.safetensors.index.json'));
    if (indexes.length === 1) return new ShardedCheckpoint(join(path, indexes[0]));
    if (indexes.length === 0 && files.includes(SINGLE_NAME)) return new SafetensorsCheckpoint(join(path, SINGLE_NAME));
    const singles = files.filter((f) => f.endsWith('.safetensors'));
    if (indexes.length === 0 && singles.length === 1) return new SafetensorsCheckpoint(join(path, singles[0]));
    if (indexes.length === 0 && singles.length === 0) {
      if (existsSync(join(path, BIN_INDEX_NAME))) return new ShardedCheckpoint(join(path, BIN_INDEX_NAME));
      if (existsSync(join(path, BIN_NAME))) return openRaw(join(path, BIN_NAME));
    }
    fail('ERR_FORMAT', `${path}: a checkpoint directory needs ${INDEX_NAME}, ${SINGLE_NAME} (or exactly one .safetensors file), ${BIN_INDEX_NAME} or ${BIN_NAME}`);
  }
  if (path.endsWith('.json')) return new ShardedCheckpoint(path);
  const head = Buffer.alloc(16);
  const fd = openSync(path, 'r');
  let n: number;
  try {
    n = readSync(fd, head, 0, 16, 0);
  } finally {
    closeSync(fd);
  }
  // Sniffed by content, not extension: '.pth', '.pt' and '.bin' are all used for torch.save archives.
  if (n >= 4 && head.readUInt32LE(0) === 0x04034b50) return new PthCheckpoint(path);
  if (path.endsWith('.safetensors') || (n >= 9 && head[8] === 0x7b) /* '{' opens the JSON header */) return new SafetensorsCheckpoint(path);
  if (n >= 2 && head[0] === 0x80 && head[1] <= 5)
    fail('ERR_FORMAT', `${path}: legacy (pre-1.6, non-zip) torch.save format is not supported; re-save it with a current torch or convert it to safetensors`);
  fail('ERR_FORMAT', `${path}: neither a safetensors file nor a torch.save zip archive`);
}

const ST_DTYPES: Record<SafetensorsDType, CheckpointDType> = {
  F32: 'f32',
  F64: 'f64',
  F16: 'f16',
  BF16: 'bf16',
  I64: 'i64',
  I32: 'i32',
  I8: 'i8',
  U8: 'u8',
  BOOL: 'bool',
};

function stInfo(file: SafetensorsFile, name: string): TensorInfo {
  const e = file.entry(name);
  return { dtype: ST_DTYPES[e.dtype], shape: [...e.shape], bytes: e.end - e.begin };
}

class SafetensorsCheckpoint implements Checkpoint {
  readonly format = 'safetensors';
  readonly #file: SafetensorsFile;
  constructor(readonly path: string) {
    this.#file = new SafetensorsFile(path);
  }
  get names(): string[] {
    return this.#file.names;
  }
  get metadata(): Readonly<Record<string, string>> {
    return this.#file.metadata;
  }
  has(name: string): boolean {
    return this.#file.has(name);
  }
  entry(name: string): TensorInfo {
    return stInfo(this.#file, name);
  }
  async read(name: string): Promise<TensorData> {
    const info = this.entry(name);
    return { dtype: info.dtype, shape: info.shape, data: await this.#file.bytesAsync(name) };
  }
  close(): void {
    this.#file.close();
  }
}

/**
 * `weight_map` name → shard file (safetensors, or torch.save archives as in pytorch_model.bin.index.json); shards
 * are opened (headers or pickles parsed) on first use only.
 */
class ShardedCheckpoint implements Checkpoint {
  readonly format: 'safetensors-sharded' | 'pth-sharded';
  readonly #map = new Map<string, string>();
  readonly #open = new Map<string, Checkpoint>();
  /** Each shard's real path, checked to lie inside the directory; opened by it, not by the name in the index. */
  readonly #resolved = new Map<string, string>();
  readonly #dir: string;

  constructor(readonly path: string) {
    this.#dir = dirname(path);
    const size = statSync(path).size;
    if (size > MAX_INDEX_JSON) fail('ERR_FORMAT', `${path}: index of ${size} bytes is implausibly large`);
    let index: unknown;
    try {
      index = JSON.parse(readFileSync(path, 'utf8'));
    } catch (e) {
      fail('ERR_FORMAT', `${path}: index is not JSON (${(e as Error).message})`);
    }
    const wm = (index as { weight_map?: unknown } | null)?.weight_map;
    if (wm === null || typeof wm !== 'object' || Array.isArray(wm)) fail('ERR_FORMAT', `${path}: index has no weight_map object`);
    const examples = new Map<string, string>();
    for (const [name, shard] of Object.entries(wm as Record<string, unknown>)) {
      if (typeof shard !== 'string' || shard === '' || isAbsolute(shard) || normalize(shard).split(/[\\/]/).includes('..'))
        fail('ERR_FORMAT', `${path}: weight_map entry ${JSON.stringify(name)} names an invalid shard ${JSON.stringify(shard)?.slice(0, 200)}`);
      this.#map.set(name, shard);
      if (!examples.has(shard)) examples.set(shard, name);
    }
    // Existence is checked up front (cheap) so a broken set fails at open, not midway through loading a model. A
    // shard is read only where it really lies inside the index's directory: a symlink (of the shard or of a folder
    // on its way) pointing elsewhere would hand an attacker's index any file the user can read.
    const root = realpathSync(this.#dir);
    for (const [shard, example] of examples) {
      const full = join(this.#dir, shard);
      if (!existsSync(full) || !statSync(full).isFile())
        fail('ERR_FORMAT', `${path}: shard ${JSON.stringify(shard)} (holding e.g. ${JSON.stringify(example)}) is missing from ${this.#dir}`);
      const real = realpathSync(full);
      const rel = relative(root, real);
      if (rel === '..' || rel.startsWith('..' + sep) || isAbsolute(rel))
        fail('ERR_FORMAT', `${path}: shard ${JSON.stringify(shard)} resolves to ${real}, outside the checkpoint directory ${root} (a symlink out of it is refused)`);
      this.#resolved.set(shard, real);
    }
    // `metadata.total_size` is not checked: the official 8B index disagrees with its own shards by 1,728 bytes.
    this.format = [...examples.keys()].every((shard) => shard.endsWith('.safetensors')) ? 'safetensors-sharded' : 'pth-sharded';
  }

  get names(): string[] {
    return [...this.#map.keys()];
  }
  has(name: string): boolean {
    return this.#map.has(name);
  }
  #shardFor(name: string): Checkpoint {
    const shard = this.#map.get(name);
    if (shard === undefined) fail('ERR_FORMAT', `${this.path}: no tensor named ${name}`);
    let f = this.#open.get(shard);
    if (!f) {
      f = openRaw(this.#resolved.get(shard)!);
      if (f.format !== 'safetensors' && f.format !== 'pth') {
        f.close();
        fail('ERR_FORMAT', `${this.path}: shard ${shard} is itself an index or a directory`);
      }
      this.#open.set(shard, f);
    }
    if (!f.has(name)) fail('ERR_FORMAT', `${this.path}: the index puts ${JSON.stringify(name)} in ${JSON.stringify(shard)}, which has no such tensor`);
    return f;
  }
  entry(name: string): TensorInfo {
    return this.#shardFor(name).entry(name);
  }
  async read(name: string): Promise<TensorData> {
    return this.#shardFor(name).read(name);
  }
  close(): void {
    for (const f of this.#open.values()) f.close();
    this.#open.clear();
  }
}

/** A torch.save archive: `<root>/data.pkl` (the pickled object) and `<root>/data/<key>` (one entry per storage). */
class PthCheckpoint implements Checkpoint {
  readonly format = 'pth';
  readonly #zip: ZipReader;
  readonly #tensors = new Map<string, { ref: TensorRef; entry: string }>();

  constructor(readonly path: string) {
    this.#zip = new ZipReader(path);
    try {
      this.#load();
    } catch (e) {
      this.#zip.close();
      throw e;
    }
  }

  #load(): void {
    const z = this.#zip;
    const pkls = z.names.filter((n) => /^[^/]+\/data\.pkl$/.test(n));
    if (pkls.length !== 1) fail('ERR_FORMAT', `${this.path}: expected one <archive>/data.pkl, found ${pkls.length} (not a torch.save archive?)`);
    const root = pkls[0].slice(0, -'data.pkl'.length);
    const order = z.entry(root + 'byteorder');
    if (order) {
      const v = z.readSync(root + 'byteorder', 0, Math.min(order.size, 16)).toString('latin1').trim();
      if (v !== 'little') fail('ERR_FORMAT', `${this.path}: byte order '${v}' is not supported (only little-endian)`);
    }
    const pkl = z.entry(pkls[0])!;
    if (pkl.size > MAX_PICKLE) fail('ERR_FORMAT', `${this.path}: data.pkl of ${pkl.size} bytes exceeds the ${MAX_PICKLE}-byte cap`);
    const obj = unpickle(z.readSync(pkls[0]), `${this.path}:${pkls[0]}`, { maxBytes: MAX_PICKLE });
    if (!(obj instanceof PyDict)) fail('ERR_FORMAT', `${this.path}: the pickled object is not a dict (state dict)`);
    for (const [name, ref] of flatten(obj, this.path)) {
      const entry = `${root}data/${ref.storage.key}`;
      const e = z.entry(entry);
      if (!e) fail('ERR_FORMAT', `${this.path}: tensor ${name} refers to storage ${ref.storage.key}, but ${entry} is missing`);
      const item = DTYPE_BYTES[ref.dtype];
      if (e.size < ref.storage.numel * item)
        fail('ERR_FORMAT', `${this.path}: storage ${entry} holds ${e.size} bytes, too short for ${ref.storage.numel} ${ref.dtype} elements (tensor ${name})`);
      this.#tensors.set(name, { ref, entry });
    }
  }

  get names(): string[] {
    return [...this.#tensors.keys()];
  }
  has(name: string): boolean {
    return this.#tensors.has(name);
  }
  #get(name: string): { ref: TensorRef; entry: string } {
    const t = this.#tensors.get(name);
    if (!t) fail('ERR_FORMAT', `${this.path}: no tensor named ${name}`);
    return t;
  }
  entry(name: string): TensorInfo {
    const { ref } = this.#get(name);
    return { dtype: ref.dtype, shape: [...ref.shape], bytes: ref.numel * DTYPE_BYTES[ref.dtype] };
  }
  async read(name: string): Promise<TensorData> {
    const { ref, entry } = this.#get(name);
    const item = DTYPE_BYTES[ref.dtype];
    const data = await this.#zip.read(entry, ref.storageOffset * item, ref.numel * item);
    return { dtype: ref.dtype, shape: [...ref.shape], data };
  }
  close(): void {
    this.#zip.close();
  }
}

/** Tensor leaves of nested dicts, named by their '.'-joined key paths; other leaves (ints, strings, lists) are skipped. */
function flatten(root: PyDict, path: string): Map<string, TensorRef> {
  const out = new Map<string, TensorRef>();
  const onPath = new Set<PyDict>();
  let visits = 0;
  const walk = (d: PyDict, prefix: string, depth: number): void => {
    if (depth > MAX_NESTING) fail('ERR_FORMAT', `${path}: dicts nested deeper than ${MAX_NESTING} levels at ${prefix || '<root>'}`);
    if (onPath.has(d)) fail('ERR_FORMAT', `${path}: the dict at ${prefix || '<root>'} contains itself`);
    if (++visits > MAX_DICT_VISITS) fail('ERR_FORMAT', `${path}: too many nested dicts`);
    onPath.add(d);
    for (const [k, v] of d.map) {
      const name = prefix + String(k);
      if (v instanceof TensorRef) {
        if (out.has(name)) fail('ERR_FORMAT', `${path}: two tensors flatten to the name ${name}`);
        out.set(name, v);
      } else if (v instanceof PyDict) walk(v, name + '.', depth + 1);
    }
    onPath.delete(d);
  };
  walk(root, '', 0);
  return out;
}

class Prefixed implements Checkpoint {
  readonly #inner: Checkpoint;
  readonly #prefix: string;
  readonly names: string[];
  constructor(inner: Checkpoint, prefix: string) {
    this.#inner = inner;
    this.#prefix = prefix;
    this.names = inner.names.filter((n) => n.startsWith(prefix)).map((n) => n.slice(prefix.length));
    if (this.names.length === 0) {
      const tops = [...new Set(inner.names.map((n) => n.split('.')[0]))].slice(0, 8);
      fail('ERR_FORMAT', `${inner.path}: no tensors under prefix '${prefix}' (top-level names: ${tops.join(', ') || 'none'})`);
    }
  }
  get path(): string {
    return this.#inner.path;
  }
  get format(): CheckpointFormat {
    return this.#inner.format;
  }
  get metadata(): Readonly<Record<string, string>> | undefined {
    return this.#inner.metadata;
  }
  has(name: string): boolean {
    return this.#inner.has(this.#prefix + name);
  }
  entry(name: string): TensorInfo {
    return this.#inner.entry(this.#prefix + name);
  }
  read(name: string): Promise<TensorData> {
    return this.#inner.read(this.#prefix + name);
  }
  close(): void {
    this.#inner.close();
  }
}

/** Key prefix of transformer block `layer`: blocks are stored in chunks of `blocksPerChunk` (4 for 2B, 5 for 8B). */
export function infinityBlockKey(layer: number, blocksPerChunk: number): string {
  if (!Number.isSafeInteger(layer) || layer < 0 || !Number.isSafeInteger(blocksPerChunk) || blocksPerChunk < 1)
    fail('ERR_INVALID_ARG', `infinityBlockKey(${layer}, ${blocksPerChunk}): need a layer >= 0 and blocksPerChunk >= 1`);
  return `block_chunks.${Math.floor(layer / blocksPerChunk)}.module.${layer % blocksPerChunk}`;
}

/** Modules the official VAE wraps as `Conv` (parameters under `.conv`) and `Normalize` (under `.norm`). */
const CONV_OWNERS = new Set(['conv_in', 'conv_out', 'conv1', 'conv2', 'nin_shortcut', 'q', 'k', 'v', 'proj_out']);
const NORM_OWNERS = new Set(['norm1', 'norm2', 'norm_out']);

/**
 * Canonical VAE parameter name. The canonical form is the one WITH the wrapper level, as the official model's own
 * state_dict and the released checkpoints spell it (`decoder.conv_in.conv.weight`, `...norm1.norm.weight`,
 * `...upsample.conv.conv.weight`, attention `...q.conv.weight` / `...norm.norm.weight`). Names without it
 * (`decoder.conv_in.weight`), which the official `load_cnn` also accepts, get the level inserted; everything else
 * (e.g. `quantizer.lfq.mask`) is returned unchanged. Apply to names without a `vae.` prefix.
 */
export function normalizeVaeKey(name: string): string {
  const parts = name.split('.');
  const leaf = parts[parts.length - 1];
  if (parts.length < 2 || (leaf !== 'weight' && leaf !== 'bias')) return name;
  const owner = parts[parts.length - 2];
  const parent = parts.length >= 3 ? parts[parts.length - 3] : '';
  let wrapper: string | undefined;
  if (CONV_OWNERS.has(owner)) wrapper = 'conv';
  else if (NORM_OWNERS.has(owner)) wrapper = 'norm';
  // A bare `.conv`/`.norm` owner is either the wrapper itself (its parent is a wrapped module or, for
  // up/down-sample convs and attention norms, another `.conv`/`.norm`), or an unwrapped up/down-sample conv
  // (`upsample.conv.weight`) or attention norm (`attn_1.norm.weight`).
  else if (owner === 'conv' && !CONV_OWNERS.has(parent) && parent !== 'conv') wrapper = 'conv';
  else if (owner === 'norm' && !NORM_OWNERS.has(parent) && parent !== 'norm') wrapper = 'norm';
  if (!wrapper) return name;
  return [...parts.slice(0, -1), wrapper, leaf].join('.');
}
