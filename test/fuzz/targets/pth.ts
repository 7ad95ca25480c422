/**
 * torch.save archives (.pth: the zip reader and the safe unpickler together). Structure-aware mutations of the
 * data.pkl opcode stream, each with a known outcome: semantic no-ops (equivalent re-encodings of an opcode, no-op
 * opcode pairs, nesting 10^5 deep that is then popped) must load to exactly the tensors written; unsafe globals and
 * opcodes must fail with ERR_UNSAFE_PICKLE; truncations and forged lengths with a coded error. Opcode-level edits
 * (delete, duplicate, swap, replace) and field edits of the zip records, plus byte-level mutations of the whole
 * archive, may load or fail, but only with a coded error and within the bounds.
 */
import fc from 'fast-check';
import { openCheckpoint } from '../../../lib/checkpoint/index.js';
import { PthTensor, rowMajor, torchArchive, torchPickle, TorchDType } from '../../checkpoint-writers.js';
import { ExpectedTensor, FuzzCase, FuzzTarget, FuzzViolation, scratchFile } from '../harness.js';
import { byteMutations } from '../mutate.js';

const ELEM: Record<TorchDType, number> = { f32: 4, f64: 8, bf16: 2, f16: 2, i64: 8, i32: 4, u8: 1, bool: 1 };

/** Argument bytes after an opcode (excluding variable-length payloads, handled in `opLength`). */
const FIXED: Record<number, number> = {
  0x80: 1, 0x95: 8, 0x4a: 4, 0x4b: 1, 0x4d: 2, 0x47: 8, 0x71: 1, 0x72: 4, 0x68: 1, 0x6a: 4,
};
const ZERO = new Set([0x2e, 0x28, 0x30, 0x31, 0x32, 0x4e, 0x88, 0x89, 0x7d, 0x64, 0x73, 0x75, 0x5d, 0x6c, 0x61, 0x65, 0x29, 0x74, 0x85, 0x86, 0x87, 0x94, 0x93, 0x52, 0x81, 0x92, 0x62, 0x51]);

/** Length of the opcode at `at` (with its argument) in a pickle the writers produced. */
function opLength(p: Buffer, at: number): number {
  const op = p[at];
  if (ZERO.has(op)) return 1;
  if (op in FIXED) return 1 + FIXED[op];
  switch (op) {
    case 0x8a:
    case 0x8c:
      return 2 + p[at + 1];
    case 0x58:
      return 5 + p.readUInt32LE(at + 1);
    case 0x63:
      return p.indexOf(0x0a, p.indexOf(0x0a, at) + 1) + 1 - at;
  }
  throw new Error(`writer pickle holds opcode 0x${op.toString(16)}, which this tokenizer does not know`);
}

/** The opcode boundaries of a pickle: [start, end) of each opcode. */
function opcodes(p: Buffer): [number, number][] {
  const out: [number, number][] = [];
  for (let at = 0; at < p.length; ) {
    const end = at + opLength(p, at);
    out.push([at, end]);
    at = end;
  }
  return out;
}

function u32(op: number, v: number): Buffer {
  const b = Buffer.alloc(5);
  b[0] = op;
  b.writeUInt32LE(v, 1);
  return b;
}

/** An equivalent encoding of one opcode (same stack and memo effect), or undefined when it has none. */
function reencode(op: Buffer): Buffer | undefined {
  switch (op[0]) {
    case 0x4b: // BININT1 -> BININT
      return Buffer.concat([Buffer.from([0x4a]), Buffer.from(new Int32Array([op[1]]).buffer)]);
    case 0x4d: // BININT2 -> BININT
      return Buffer.concat([Buffer.from([0x4a]), Buffer.from(new Int32Array([op.readUInt16LE(1)]).buffer)]);
    case 0x71: // BINPUT -> LONG_BINPUT
      return u32(0x72, op[1]);
    case 0x68: // BINGET -> LONG_BINGET
      return u32(0x6a, op[1]);
    case 0x8c: // SHORT_BINUNICODE -> BINUNICODE
      return Buffer.concat([u32(0x58, op[1]), op.subarray(2)]);
    case 0x63: { // GLOBAL -> two strings and STACK_GLOBAL
      const [module, name] = op.toString('utf8', 1).split('\n');
      const str = (s: string) => Buffer.concat([u32(0x58, Buffer.byteLength(s)), Buffer.from(s)]);
      return Buffer.concat([str(module), str(name), Buffer.from([0x93])]);
    }
  }
  return undefined;
}

/** Opcode runs with no net effect, inserted between two opcodes. */
function noOp(kind: number, depth: number): Buffer {
  switch (kind) {
    case 0:
      return Buffer.from([0x4e, 0x30]); // NONE POP
    case 1:
      return Buffer.from([0x28, 0x31]); // MARK POP_MARK
    case 2:
      return Buffer.concat([Buffer.from([0x95]), Buffer.alloc(8)]); // FRAME of 0 bytes
    case 3: // EMPTY_TUPLE, TUPLE1 x depth: a tuple nested `depth` deep, then POP
      return Buffer.concat([Buffer.from([0x29]), Buffer.alloc(depth, 0x85), Buffer.from([0x30])]);
    default: // EMPTY_LIST x depth, APPEND x (depth - 1): a list nested `depth` deep, then POP
      return Buffer.concat([Buffer.alloc(depth, 0x5d), Buffer.alloc(depth - 1, 0x61), Buffer.from([0x30])]);
  }
}

const UNSAFE_GLOBALS = ['os\nsystem', 'builtins\neval', 'posix\nsystem', 'subprocess\nPopen', 'torch\nload', 'collections\nOrderedDict.__init__', 'torch._utils\n_rebuild_tensor', '\n', 'nt\nsystem'];

type PickleEdit =
  | { edit: 'reencode'; at: number }
  | { edit: 'noop'; at: number; kind: number; depth: number }
  | { edit: 'nest'; at: number; kind: number; depth: number }
  | { edit: 'unsafe-global'; at: number; global: string }
  | { edit: 'unsafe-opcode'; at: number; op: number }
  | { edit: 'truncate'; at: number }
  | { edit: 'huge-length'; at: number; length: number }
  | { edit: 'delete' | 'duplicate' | 'swap'; at: number }
  | { edit: 'replace'; at: number; op: number };

const pickleEdit: fc.Arbitrary<PickleEdit> = fc.oneof(
  fc.record({ edit: fc.constant('reencode' as const), at: fc.nat() }),
  fc.record({ edit: fc.constant('noop' as const), at: fc.nat(), kind: fc.integer({ min: 0, max: 4 }), depth: fc.integer({ min: 1, max: 100_000 }) }),
  fc.record({ edit: fc.constant('nest' as const), at: fc.nat(), kind: fc.integer({ min: 3, max: 4 }), depth: fc.integer({ min: 1, max: 100_000 }) }),
  fc.record({ edit: fc.constant('unsafe-global' as const), at: fc.nat(), global: fc.constantFrom(...UNSAFE_GLOBALS) }),
  fc.record({ edit: fc.constant('unsafe-opcode' as const), at: fc.nat(), op: fc.constantFrom(0x69, 0x6f, 0x82, 0x83, 0x84, 0x50) }),
  fc.record({ edit: fc.constant('truncate' as const), at: fc.nat() }),
  fc.record({ edit: fc.constant('huge-length' as const), at: fc.nat(), length: fc.constantFrom(0xffffffff, 0x7fffffff, 1 << 30, 1 << 20) }),
  fc.record({ edit: fc.constantFrom('delete' as const, 'duplicate' as const, 'swap' as const), at: fc.nat() }),
  fc.record({ edit: fc.constant('replace' as const), at: fc.nat(), op: fc.integer({ min: 0, max: 255 }) }),
);

/** A mutated pickle and what it must do. */
function editPickle(pkl: Buffer, e: PickleEdit, tensors: Map<string, ExpectedTensor>): { pickle: Buffer; expect?: FuzzCase['expect'] } {
  const ops = opcodes(pkl);
  // Edits go between PROTO (first) and STOP (last).
  const i = 1 + (e.at % (ops.length - 2));
  const [s, t] = ops[i];
  const splice = (insert: Buffer, from = s, to = s) => Buffer.concat([pkl.subarray(0, from), insert, pkl.subarray(to)]);
  switch (e.edit) {
    case 'reencode': {
      const r = reencode(pkl.subarray(s, t));
      return r ? { pickle: splice(r, s, t), expect: { kind: 'same', tensors } } : { pickle: pkl, expect: { kind: 'same', tensors } };
    }
    case 'noop':
      return { pickle: splice(noOp(e.kind, e.depth)), expect: { kind: 'same', tensors } };
    case 'nest': // the nested value left on the stack, for whatever opcode comes next to consume (or describe)
      return { pickle: splice(noOp(e.kind, e.depth).subarray(0, -1)) };
    case 'unsafe-global':
      return { pickle: splice(Buffer.from(`c${e.global}\n`)), expect: { kind: 'error', code: 'ERR_UNSAFE_PICKLE' } };
    case 'unsafe-opcode':
      return { pickle: splice(Buffer.from([e.op])), expect: { kind: 'error', code: 'ERR_UNSAFE_PICKLE' } };
    case 'truncate':
      return { pickle: pkl.subarray(0, s), expect: { kind: 'error' } };
    case 'huge-length':
      return { pickle: splice(u32(0x58, e.length)), expect: { kind: 'error' } };
    case 'delete':
      return { pickle: splice(Buffer.alloc(0), s, t) };
    case 'duplicate':
      return { pickle: splice(pkl.subarray(s, t)) };
    case 'swap': {
      const [, u] = ops[Math.min(i + 1, ops.length - 1)];
      return { pickle: Buffer.concat([pkl.subarray(0, s), pkl.subarray(t, u), pkl.subarray(s, t), pkl.subarray(u)]) };
    }
    case 'replace':
      return { pickle: splice(Buffer.from([e.op]), s, s + 1) };
  }
}

const dtype = fc.constantFrom<TorchDType>('f32', 'f64', 'bf16', 'f16', 'i64', 'i32', 'u8', 'bool');

/** A small random state dict: every dtype, scalars and empty tensors, Parameters, views sharing a storage. */
const stateDict: fc.Arbitrary<PthTensor[]> = fc
  .array(
    fc.record({
      dtype,
      shape: fc.array(fc.integer({ min: 0, max: 4 }), { maxLength: 3 }),
      parameter: fc.boolean(),
      offset: fc.integer({ min: 0, max: 3 }),
      fill: fc.integer({ min: 0, max: 255 }),
    }),
    { minLength: 1, maxLength: 5 },
  )
  .map((specs) =>
    specs.map(({ dtype, shape, parameter, offset, fill }, i) => {
      const n = shape.reduce((a, d) => a * d, 1);
      const storage = Uint8Array.from({ length: (n + offset) * ELEM[dtype] }, (_, k) => (fill + k * 37) & 0xff);
      return { name: `layers.${i}.weight`, dtype, shape, key: String(i), storage, offset, stride: rowMajor(shape), parameter };
    }),
  );

function expected(sd: PthTensor[], wrap: string | undefined): Map<string, ExpectedTensor> {
  return new Map(
    sd.map((t) => {
      const e = ELEM[t.dtype];
      const n = t.shape.reduce((a, d) => a * d, 1);
      const at = (t.offset ?? 0) * e;
      return [`${wrap ? wrap + '.' : ''}${t.name}`, { dtype: t.dtype, shape: t.shape, bytes: t.storage.subarray(at, at + n * e) }];
    }),
  );
}

const written = fc.record({ sd: stateDict, protocol: fc.constantFrom(2, 4), zip64: fc.boolean(), wrap: fc.constantFrom(undefined, 'vae') });

const pickleCases: fc.Arbitrary<FuzzCase> = fc.tuple(written, pickleEdit).map(([{ sd, protocol, zip64, wrap }, edit]) => {
  const { pickle, expect } = editPickle(torchPickle(sd, { protocol, wrap }), edit, expected(sd, wrap));
  return { bytes: torchArchive(sd, { protocol, wrap, pickle, zip: { zip64 } }), expect };
});

/** Signatures of the zip records whose fields are forged: local header, central entry, end records. */
const RECORDS = [0x04034b50, 0x02014b50, 0x06054b50, 0x06064b50, 0x07064b50];

const zipCases: fc.Arbitrary<FuzzCase> = fc
  .tuple(written, fc.constantFrom(...RECORDS), fc.nat(), fc.integer({ min: 4, max: 52 }), fc.constantFrom(2, 4, 8), fc.constantFrom(0n, 1n, 0xffffn, 0xffffffffn, 1n << 40n, (1n << 64n) - 1n))
  .map(([{ sd, protocol, zip64, wrap }, sig, nth, field, width, value]) => {
    const bytes = Buffer.from(torchArchive(sd, { protocol, wrap, zip: { zip64 } }));
    const hits: number[] = [];
    for (let at = bytes.indexOf(Buffer.from(new Uint32Array([sig]).buffer)); at >= 0; at = bytes.indexOf(Buffer.from(new Uint32Array([sig]).buffer), at + 1)) hits.push(at);
    if (hits.length) {
      const at = hits[nth % hits.length] + field;
      for (let k = 0; k < width && at + k < bytes.length; k++) bytes[at + k] = Number((value >> BigInt(8 * k)) & 0xffn);
    }
    return { bytes };
  });

/** Opens the archive and reads every tensor; a loaded tensor's bytes must match its dtype and shape. */
async function check(input: Uint8Array): Promise<Map<string, ExpectedTensor>> {
  const ckpt = openCheckpoint(scratchFile('fuzz.pth', input));
  try {
    const out = new Map<string, ExpectedTensor>();
    for (const name of ckpt.names) {
      const t = await ckpt.read(name);
      if (t.data.length !== t.shape.reduce((a, d) => a * d, 1) * ELEM[t.dtype as TorchDType])
        throw new FuzzViolation(`${name}: ${t.data.length} bytes for ${t.dtype} [${t.shape}]`);
      out.set(name, { dtype: t.dtype, shape: t.shape, bytes: t.data });
    }
    return out;
  } finally {
    ckpt.close();
  }
}

export const pthTarget: FuzzTarget = {
  name: 'pth',
  codes: ['ERR_FORMAT', 'ERR_UNSAFE_PICKLE'],
  inputs: fc.oneof(pickleCases, zipCases, byteMutations(written.map(({ sd, protocol, zip64, wrap }) => torchArchive(sd, { protocol, wrap, zip: { zip64 } }))).map((bytes) => ({ bytes }))),
  check,
  allocationBound: (input) => input.length + 4096,
};
