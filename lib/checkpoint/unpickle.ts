import { fail } from '../errors.js';

/**
 * A safe pickle VM for the data.pkl of torch.save archives. Nothing in a pickle is ever executed: GLOBAL resolves only
 * the handful of names a state dict needs, and REDUCE/NEWOBJ dispatch to built-in re-implementations of those. Tensors
 * come back as lazy descriptors pointing into the archive; their bytes are read later, one tensor at a time.
 */

/** Element types torch storages can hold here (names shared with the checkpoint layer). */
export type TensorDType = 'f32' | 'f64' | 'bf16' | 'f16' | 'i64' | 'i32' | 'i8' | 'u8' | 'bool';

export const DTYPE_BYTES: Record<TensorDType, number> = { f32: 4, f64: 8, bf16: 2, f16: 2, i64: 8, i32: 4, i8: 1, u8: 1, bool: 1 };

/** A storage named by a persistent id: the archive entry `data/<key>` holds `numel` elements of `dtype`. */
export class StorageRef {
  constructor(
    readonly key: string,
    readonly dtype: TensorDType,
    readonly numel: number,
    readonly location: string,
  ) {}
}

/** A row-major tensor view `[storageOffset, storageOffset + numel)` of a storage (in elements). */
export class TensorRef {
  constructor(
    readonly storage: StorageRef,
    readonly storageOffset: number,
    readonly shape: readonly number[],
    readonly stride: readonly number[],
  ) {}
  get dtype(): TensorDType {
    return this.storage.dtype;
  }
  get numel(): number {
    return this.shape.reduce((a, b) => a * b, 1);
  }
}

/** A dict or OrderedDict; `attrs` keeps what BUILD set on it (torch's `_metadata`), which nothing here uses. */
export class PyDict {
  readonly map = new Map<PyKey, unknown>();
  attrs: unknown = undefined;
}

export class PyList {
  readonly items: unknown[] = [];
}

/** A whitelisted global; only `callable` ones may be applied, storage/type markers are data. */
export class PyGlobal {
  constructor(
    readonly module: string,
    readonly name: string,
    readonly kind: 'callable' | 'storage' | 'type',
  ) {}
  get qualified(): string {
    return `${this.module}.${this.name}`;
  }
}

/** Tuples are frozen JS arrays; lists are PyList, so the two stay distinguishable. */
export type PyKey = string | number | bigint | boolean | null;

const STORAGES: Record<string, TensorDType> = {
  FloatStorage: 'f32',
  DoubleStorage: 'f64',
  HalfStorage: 'f16',
  BFloat16Storage: 'bf16',
  LongStorage: 'i64',
  IntStorage: 'i32',
  CharStorage: 'i8',
  ByteStorage: 'u8',
  BoolStorage: 'bool',
};

const WHITELIST = new Map<string, PyGlobal['kind']>([
  ['collections.OrderedDict', 'callable'],
  ['torch._utils._rebuild_tensor_v2', 'callable'],
  ['torch._utils._rebuild_parameter', 'callable'],
  ['torch._utils._rebuild_parameter_with_state', 'callable'],
  // torch >= 2 wraps tensors that carry Python attributes (or subclasses) in this; `new_type` is a marker below.
  ['torch._tensor._rebuild_from_type_v2', 'callable'],
  ['torch.Tensor', 'type'],
  ['torch._tensor.Tensor', 'type'],
  ['torch.nn.parameter.Parameter', 'type'],
  ...Object.keys(STORAGES).map((s) => [`torch.${s}`, 'storage'] as [string, PyGlobal['kind']]),
]);

export interface UnpickleLimits {
  maxBytes?: number;
  maxStack?: number;
  maxMemo?: number;
}

const DEFAULTS: Required<UnpickleLimits> = { maxBytes: 256 << 20, maxStack: 1 << 20, maxMemo: 1 << 22 };

/** Runs `data` (a pickle) and returns the object it builds; `where` names it in errors. */
export function unpickle(data: Uint8Array, where: string, limits: UnpickleLimits = {}): unknown {
  const lim = { ...DEFAULTS, ...limits };
  if (data.length > lim.maxBytes) fail('ERR_FORMAT', `${where}: pickle of ${data.length} bytes exceeds the ${lim.maxBytes}-byte cap`);
  const buf = Buffer.from(data.buffer, data.byteOffset, data.length);
  const stack: unknown[] = [];
  const marks: number[] = [];
  const memo = new Map<number, unknown>();
  const storages = new Map<string, StorageRef>();
  let pos = 0;
  let opAt = 0;

  const bad: (msg: string) => never = (msg) => fail('ERR_FORMAT', `${where}: ${msg} (pickle offset ${opAt})`);
  const need = (n: number): number => {
    if (n < 0 || pos + n > buf.length) bad(`truncated: needs ${n} more bytes`);
    const at = pos;
    pos += n;
    return at;
  };
  const push = (v: unknown): void => {
    if (stack.length >= lim.maxStack) bad(`stack exceeds ${lim.maxStack} items`);
    stack.push(v);
  };
  const pop = (): unknown => {
    if (stack.length === 0 || (marks.length && stack.length <= marks[marks.length - 1])) bad('stack underflow');
    return stack.pop();
  };
  const top = (): unknown => {
    if (stack.length === 0 || (marks.length && stack.length <= marks[marks.length - 1])) bad('stack underflow');
    return stack[stack.length - 1];
  };
  const popMark = (): unknown[] => {
    const m = marks.pop();
    if (m === undefined) bad('no MARK to pop');
    return stack.splice(m!);
  };
  const put = (i: number): void => {
    if (!memo.has(i) && memo.size >= lim.maxMemo) bad(`memo exceeds ${lim.maxMemo} entries`);
    memo.set(i, top());
  };
  const get = (i: number): void => {
    if (!memo.has(i)) bad(`memo key ${i} is not set`);
    push(memo.get(i));
  };
  const bytes = (n: number): Uint8Array => {
    const at = need(n);
    return new Uint8Array(buf.subarray(at, at + n));
  };
  const str = (n: number, enc: BufferEncoding): string => {
    const at = need(n);
    return buf.toString(enc, at, at + n);
  };
  const line = (): string => {
    const end = buf.indexOf(0x0a, pos);
    if (end < 0 || end - pos > 1024) bad('unterminated or overlong GLOBAL name');
    const s = buf.toString('utf8', pos, end);
    pos = end + 1;
    return s;
  };
  const setItems = (d: unknown, kv: unknown[]): void => {
    if (!(d instanceof PyDict)) bad('SETITEM(S) on something that is not a dict');
    if (kv.length % 2) bad('SETITEMS with an odd number of items');
    for (let i = 0; i < kv.length; i += 2) (d as PyDict).map.set(hashable(kv[i], bad), kv[i + 1]);
  };
  const append = (l: unknown, items: unknown[]): void => {
    if (!(l instanceof PyList)) bad('APPEND(S) on something that is not a list');
    for (const x of items) (l as PyList).items.push(x);
  };
  const persistent = (pid: unknown): StorageRef => {
    if (!Array.isArray(pid) || pid.length !== 5 || pid[0] !== 'storage') bad(`unsupported persistent id ${describe(pid)}`);
    const [, type, key, location, numel] = pid as unknown[];
    if (!(type instanceof PyGlobal) || type.kind !== 'storage') bad(`persistent id names ${describe(type)}, not a storage type`);
    if (typeof key !== 'string' || !/^[A-Za-z0-9_.-]{1,64}$/.test(key) || key.includes('..')) bad(`storage key ${describe(key)} is malformed`);
    if (typeof location !== 'string') bad('storage location is not a string');
    if (typeof numel !== 'number' || !Number.isSafeInteger(numel) || numel < 0) bad(`storage size ${describe(numel)} is malformed`);
    const dtype = STORAGES[(type as PyGlobal).name];
    const prev = storages.get(key as string);
    if (prev) {
      if (prev.dtype !== dtype || prev.numel !== numel) bad(`storage ${key} is described twice, differently`);
      return prev;
    }
    const s = new StorageRef(key as string, dtype, numel as number, location as string);
    storages.set(s.key, s);
    return s;
  };
  const call = (fn: unknown, args: unknown, depth = 0): unknown => {
    if (!(fn instanceof PyGlobal)) bad(`REDUCE of ${describe(fn)}, which is not a whitelisted callable`);
    const g = fn as PyGlobal;
    if (g.kind !== 'callable') fail('ERR_UNSAFE_PICKLE', `${where}: refused call of ${g.qualified} (only state-dict constructors may be called)`);
    if (!Array.isArray(args)) bad(`${g.qualified} called with ${describe(args)} instead of an argument tuple`);
    const a = args as unknown[];
    switch (g.qualified) {
      case 'collections.OrderedDict': {
        const d = new PyDict();
        if (a.length === 0) return d;
        const pairs = a.length === 1 ? (a[0] instanceof PyList ? a[0].items : Array.isArray(a[0]) ? a[0] : undefined) : undefined;
        if (!pairs) bad('OrderedDict called with unsupported arguments');
        for (const p of pairs!) {
          if (!Array.isArray(p) || p.length !== 2) bad('OrderedDict item is not a pair');
          d.map.set(hashable(p[0], bad), p[1]);
        }
        return d;
      }
      case 'torch._utils._rebuild_tensor_v2':
        if (a.length < 6 || a.length > 7) bad(`_rebuild_tensor_v2 takes 6 or 7 arguments, got ${a.length}`);
        return rebuildTensor(a[0], a[1], a[2], a[3], bad);
      case 'torch._utils._rebuild_parameter':
      case 'torch._utils._rebuild_parameter_with_state':
        if (a.length !== (g.name === '_rebuild_parameter' ? 3 : 4) || !(a[0] instanceof TensorRef)) bad(`${g.name} with unexpected arguments`);
        return a[0];
      case 'torch._tensor._rebuild_from_type_v2': {
        if (a.length !== 4) bad(`_rebuild_from_type_v2 takes 4 arguments, got ${a.length}`);
        if (!(a[1] instanceof PyGlobal) || a[1].kind !== 'type') bad(`_rebuild_from_type_v2 to ${describe(a[1])} is not supported`);
        // One level only: the inner function rebuilds the plain tensor; nesting this wrapper has no use in a state dict.
        if (depth > 0 || (a[0] instanceof PyGlobal && a[0].qualified === g.qualified)) bad('nested _rebuild_from_type_v2');
        const t = call(a[0], a[2], depth + 1);
        if (!(t instanceof TensorRef)) bad('_rebuild_from_type_v2 did not rebuild a tensor');
        return t;
      }
    }
    return bad(`no implementation for ${g.qualified}`);
  };

  for (;;) {
    opAt = pos;
    const op = buf[need(1)];
    switch (op) {
      case 0x80: // PROTO
        if (buf[need(1)] > 5) bad(`pickle protocol ${buf[pos - 1]} is newer than 5`);
        break;
      case 0x95: { // FRAME: framing is only a read-ahead hint
        const n = buf.readBigUInt64LE(need(8));
        if (n > BigInt(buf.length - pos)) bad('frame longer than the pickle');
        break;
      }
      case 0x2e: // STOP
        if (marks.length) bad('STOP inside an open MARK');
        return pop();
      case 0x28: // MARK
        if (marks.length >= lim.maxStack) bad('too many MARKs');
        marks.push(stack.length);
        break;
      case 0x30: // POP
        if (stack.length && (!marks.length || stack.length > marks[marks.length - 1])) stack.pop();
        else if (marks.length && stack.length === marks[marks.length - 1]) marks.pop();
        else bad('stack underflow');
        break;
      case 0x31: // POP_MARK
        popMark();
        break;
      case 0x32: // DUP
        push(top());
        break;
      case 0x4e: // NONE
        push(null);
        break;
      case 0x88: // NEWTRUE
        push(true);
        break;
      case 0x89: // NEWFALSE
        push(false);
        break;
      case 0x4a: // BININT
        push(buf.readInt32LE(need(4)));
        break;
      case 0x4b: // BININT1
        push(buf[need(1)]);
        break;
      case 0x4d: // BININT2
        push(buf.readUInt16LE(need(2)));
        break;
      case 0x8a: { // LONG1
        const at = need(buf[need(1)]);
        push(longLE(buf, at, pos, bad));
        break;
      }
      case 0x8b: { // LONG4
        const n = buf.readInt32LE(need(4));
        if (n < 0 || n > 64) bad(`LONG4 of ${n} bytes is not a plausible state-dict integer`);
        const at = need(n);
        push(longLE(buf, at, pos, bad));
        break;
      }
      case 0x47: // BINFLOAT
        push(buf.readDoubleBE(need(8)));
        break;
      case 0x8c: // SHORT_BINUNICODE
        push(str(buf[need(1)], 'utf8'));
        break;
      case 0x58: // BINUNICODE
        push(str(buf.readUInt32LE(need(4)), 'utf8'));
        break;
      case 0x8d: // BINUNICODE8
        push(str(size64(buf.readBigUInt64LE(need(8)), bad), 'utf8'));
        break;
      case 0x55: // SHORT_BINSTRING (Python 2 str)
        push(str(buf[need(1)], 'latin1'));
        break;
      case 0x54: // BINSTRING
        push(str(buf.readInt32LE(need(4)), 'latin1'));
        break;
      case 0x43: // SHORT_BINBYTES
        push(bytes(buf[need(1)]));
        break;
      case 0x42: // BINBYTES
        push(bytes(buf.readUInt32LE(need(4))));
        break;
      case 0x8e: // BINBYTES8
        push(bytes(size64(buf.readBigUInt64LE(need(8)), bad)));
        break;
      case 0x7d: // EMPTY_DICT
        push(new PyDict());
        break;
      case 0x64: { // DICT
        const d = new PyDict();
        setItems(d, popMark());
        push(d);
        break;
      }
      case 0x73: { // SETITEM
        const v = pop();
        const k = pop();
        setItems(top(), [k, v]);
        break;
      }
      case 0x75: { // SETITEMS
        const kv = popMark();
        setItems(top(), kv);
        break;
      }
      case 0x5d: // EMPTY_LIST
        push(new PyList());
        break;
      case 0x6c: { // LIST
        const l = new PyList();
        append(l, popMark());
        push(l);
        break;
      }
      case 0x61: { // APPEND
        const v = pop();
        append(top(), [v]);
        break;
      }
      case 0x65: { // APPENDS
        const items = popMark();
        append(top(), items);
        break;
      }
      case 0x29: // EMPTY_TUPLE
        push(Object.freeze([]));
        break;
      case 0x74: // TUPLE
        push(Object.freeze(popMark()));
        break;
      case 0x85: // TUPLE1
        push(Object.freeze([pop()]));
        break;
      case 0x86: { // TUPLE2
        const b = pop();
        push(Object.freeze([pop(), b]));
        break;
      }
      case 0x87: { // TUPLE3
        const c = pop();
        const b = pop();
        push(Object.freeze([pop(), b, c]));
        break;
      }
      case 0x71: // BINPUT
        put(buf[need(1)]);
        break;
      case 0x72: // LONG_BINPUT
        put(buf.readUInt32LE(need(4)));
        break;
      case 0x94: // MEMOIZE
        put(memo.size);
        break;
      case 0x68: // BINGET
        get(buf[need(1)]);
        break;
      case 0x6a: // LONG_BINGET
        get(buf.readUInt32LE(need(4)));
        break;
      case 0x63: { // GLOBAL
        const module = line();
        push(resolve(module, line(), where));
        break;
      }
      case 0x93: { // STACK_GLOBAL
        const name = pop();
        const module = pop();
        if (typeof module !== 'string' || typeof name !== 'string') bad('STACK_GLOBAL needs two strings');
        push(resolve(module as string, name as string, where));
        break;
      }
      case 0x52: { // REDUCE
        const args = pop();
        const fn = pop();
        push(call(fn, args));
        break;
      }
      case 0x81: // NEWOBJ
      case 0x92: { // NEWOBJ_EX
        if (op === 0x92) pop(); // kwargs
        const args = pop();
        const cls = pop();
        if (!(cls instanceof PyGlobal) || cls.qualified !== 'collections.OrderedDict')
          fail('ERR_UNSAFE_PICKLE', `${where}: refused to instantiate ${describe(cls)}`);
        if (!Array.isArray(args)) bad('NEWOBJ arguments are not a tuple');
        push(new PyDict());
        break;
      }
      case 0x62: { // BUILD
        const state = pop();
        const obj = top();
        if (!(obj instanceof PyDict)) bad(`BUILD on ${describe(obj)} is not supported`);
        (obj as PyDict).attrs = state;
        break;
      }
      case 0x51: // BINPERSID
        push(persistent(pop()));
        break;
      // Opcodes that import or call arbitrary objects by other routes.
      case 0x69: // INST
      case 0x6f: // OBJ
      case 0x82: // EXT1
      case 0x83: // EXT2
      case 0x84: // EXT4
      case 0x50: // PERSID (text form; torch never writes it)
        fail('ERR_UNSAFE_PICKLE', `${where}: refused pickle opcode ${opName(op)} at offset ${opAt}`);
      default:
        bad(`unsupported pickle opcode 0x${op.toString(16).padStart(2, '0')}`);
    }
  }
}

function opName(op: number): string {
  const names: Record<number, string> = { 0x69: 'INST', 0x6f: 'OBJ', 0x82: 'EXT1', 0x83: 'EXT2', 0x84: 'EXT4', 0x50: 'PERSID' };
  return `${names[op] ?? '?'} (0x${op.toString(16)})`;
}

function resolve(module: string, name: string, where: string): PyGlobal {
  const q = `${module}.${name}`;
  const kind = WHITELIST.get(q);
  if (!kind) fail('ERR_UNSAFE_PICKLE', `${where}: refused global ${q} (not on the state-dict whitelist)`);
  return new PyGlobal(module, name, kind);
}

function rebuildTensor(storage: unknown, offset: unknown, size: unknown, stride: unknown, bad: (m: string) => never): TensorRef {
  if (!(storage instanceof StorageRef)) bad(`tensor storage is ${describe(storage)}, not a persistent storage`);
  const s = storage as StorageRef;
  if (!isIndex(offset)) bad(`tensor storage offset ${describe(offset)} is malformed`);
  if (!Array.isArray(size) || !size.every(isIndex)) bad(`tensor size ${describe(size)} is malformed`);
  if (!Array.isArray(stride) || !stride.every(isIndex) || stride.length !== (size as unknown[]).length)
    bad(`tensor stride ${describe(stride)} does not match size ${describe(size)}`);
  const shape = size as number[];
  const st = stride as number[];
  let numel = 1;
  for (const d of shape) {
    numel *= d;
    if (!Number.isSafeInteger(numel)) bad(`tensor size ${describe(size)} overflows`);
  }
  if (numel > 0) {
    let expect = 1;
    for (let i = shape.length - 1; i >= 0; i--) {
      if (shape[i] !== 1 && st[i] !== expect)
        bad(`tensor of size ${describe(size)} has stride ${describe(stride)}; only contiguous (row-major) tensors are supported`);
      expect *= shape[i];
    }
  }
  if ((offset as number) + numel > s.numel)
    bad(`tensor of size ${describe(size)} at offset ${offset} needs ${(offset as number) + numel} elements but storage ${s.key} has ${s.numel}`);
  return new TensorRef(s, offset as number, Object.freeze([...shape]), Object.freeze([...st]));
}

function isIndex(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function hashable(k: unknown, bad: (m: string) => never): PyKey {
  if (k === null || typeof k === 'string' || typeof k === 'number' || typeof k === 'bigint' || typeof k === 'boolean') return k;
  return bad(`dict key ${describe(k)} is not supported`);
}

/** Little-endian two's complement; a number when it is safe, a bigint otherwise. */
function longLE(buf: Buffer, at: number, end: number, bad: (m: string) => never): number | bigint {
  const n = end - at;
  if (n > 64) bad(`integer of ${n} bytes is not a plausible state-dict value`);
  if (n === 0) return 0;
  let v = 0n;
  for (let i = end - 1; i >= at; i--) v = (v << 8n) | BigInt(buf[i]);
  if (buf[end - 1] & 0x80) v -= 1n << BigInt(8 * n);
  return v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
}

function size64(n: bigint, bad: (m: string) => never): number {
  if (n > BigInt(Number.MAX_SAFE_INTEGER)) bad(`length ${n} is out of range`);
  return Number(n);
}

/** Tuples deeper than this or longer than DESCRIBE_ITEMS are elided: a forged pickle nests them 10^5 deep. */
const DESCRIBE_DEPTH = 3;
const DESCRIBE_ITEMS = 8;

function describe(v: unknown, depth = 0): string {
  if (v instanceof PyGlobal) return v.qualified;
  if (v instanceof PyDict) return 'a dict';
  if (v instanceof PyList) return 'a list';
  if (v instanceof StorageRef) return `storage ${v.key}`;
  if (v instanceof TensorRef) return 'a tensor';
  if (Array.isArray(v)) {
    if (depth >= DESCRIBE_DEPTH) return '(…)';
    const items = v.slice(0, DESCRIBE_ITEMS).map((x) => describe(x, depth + 1));
    if (v.length > DESCRIBE_ITEMS) items.push(`… ${v.length - DESCRIBE_ITEMS} more`);
    return `(${items.join(', ')}${v.length === 1 ? ',' : ''})`;
  }
  if (typeof v === 'string') return JSON.stringify(v.length > 60 ? v.slice(0, 60) + '…' : v);
  if (v instanceof Uint8Array) return `bytes[${v.length}]`;
  return String(v);
}
