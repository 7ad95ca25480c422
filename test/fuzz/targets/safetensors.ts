/**
 * safetensors (single files): structure-aware mutations of a valid header (one field of one tensor, the metadata,
 * names with control characters and Unicode, the header length, non-object headers, deep nesting) and byte-level
 * ones, checked against an independent reference decoder of the format.
 */
import fc from 'fast-check';
import { SafetensorsFile } from '../../../lib/safetensors.js';
import { ExpectedTensor, FuzzCase, FuzzTarget, FuzzViolation, scratchFile } from '../harness.js';
import { byteMutations, hostileJson, hostileNumber, nested } from '../mutate.js';

const SIZES: Record<string, number> = { F32: 4, F16: 2, BF16: 2, I32: 4, I64: 8, U8: 1, F64: 8, I8: 1, BOOL: 1 };
const MAX_HEADER = 100 << 20;

type Reference = { ok: true; metadata: Record<string, string>; tensors: Map<string, ExpectedTensor> } | { ok: false; reason: string };

/** The format as its specification states it, written apart from lib/safetensors.ts so the two can disagree. */
export function referenceSafetensors(file: Uint8Array): Reference {
  const b = Buffer.from(file.buffer, file.byteOffset, file.byteLength);
  if (b.length < 8) return { ok: false, reason: 'no length prefix' };
  const n = b.readBigUInt64LE(0);
  if (n > BigInt(MAX_HEADER) || 8n + n > BigInt(b.length)) return { ok: false, reason: 'header length out of range' };
  const data = b.subarray(8 + Number(n));
  let header: unknown;
  try {
    header = JSON.parse(b.toString('utf8', 8, 8 + Number(n)));
  } catch {
    return { ok: false, reason: 'header not JSON' };
  }
  if (typeof header !== 'object' || header === null || Array.isArray(header)) return { ok: false, reason: 'header not an object' };
  let metadata: Record<string, string> = {};
  const tensors = new Map<string, ExpectedTensor>();
  const ranges: [number, number][] = [];
  for (const [name, v] of Object.entries(header)) {
    if (name === '__metadata__') {
      // null is an absent map, as in the Rust reference (an Option<HashMap<String, String>>).
      if (v === null) continue;
      if (typeof v !== 'object' || v === null || Array.isArray(v) || !Object.values(v).every((x) => typeof x === 'string'))
        return { ok: false, reason: '__metadata__ not a string map' };
      metadata = v as Record<string, string>;
      continue;
    }
    const e = v as { dtype?: unknown; shape?: unknown; data_offsets?: unknown } | null;
    if (typeof e !== 'object' || e === null || Array.isArray(e)) return { ok: false, reason: `${name}: entry not an object` };
    if (typeof e.dtype !== 'string' || !Object.hasOwn(SIZES, e.dtype)) return { ok: false, reason: `${name}: dtype` };
    const index = (x: unknown) => Number.isSafeInteger(x) && (x as number) >= 0;
    if (!Array.isArray(e.shape) || !e.shape.every(index)) return { ok: false, reason: `${name}: shape` };
    const o = e.data_offsets;
    if (!Array.isArray(o) || o.length !== 2 || !o.every(index) || o[0] > o[1] || o[1] > data.length) return { ok: false, reason: `${name}: offsets` };
    const bytes = (e.shape as number[]).reduce((a, d) => a * BigInt(d), BigInt(SIZES[e.dtype]));
    if (bytes !== BigInt(o[1] - o[0])) return { ok: false, reason: `${name}: size` };
    if (o[1] > o[0]) ranges.push([o[0], o[1]]);
    tensors.set(name, { dtype: e.dtype, shape: e.shape as number[], bytes: data.subarray(o[0], o[1]) });
  }
  ranges.sort((x, y) => x[0] - y[0]);
  for (let i = 1; i < ranges.length; i++) if (ranges[i][0] < ranges[i - 1][1]) return { ok: false, reason: 'overlap' };
  return { ok: true, metadata, tensors };
}

/** Loads `input` through SafetensorsFile and compares every tensor and the metadata with the reference. */
function check(input: Uint8Array): Map<string, ExpectedTensor> {
  const ref = referenceSafetensors(input);
  const file = new SafetensorsFile(scratchFile('fuzz.safetensors', input));
  try {
    if (!ref.ok) throw new FuzzViolation(`loaded a file the reference refuses (${ref.reason})`);
    if (JSON.stringify(file.metadata) !== JSON.stringify(ref.metadata)) throw new FuzzViolation('metadata differs from the reference');
    const out = new Map<string, ExpectedTensor>();
    for (const name of file.names) {
      const e = file.entry(name);
      out.set(name, { dtype: e.dtype, shape: e.shape, bytes: file.bytes(name) });
    }
    return out;
  } finally {
    file.close();
  }
}

interface Spec {
  name: string;
  dtype: string;
  shape: number[];
}

const spec: fc.Arbitrary<Spec> = fc.record({
  name: fc.oneof(fc.constantFrom('w', 'layers.0.weight', 'bias'), fc.string({ maxLength: 6 })),
  dtype: fc.constantFrom(...Object.keys(SIZES)),
  shape: fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 3 }),
});

/** A valid file's header object and data section. */
function build(specs: Spec[], payload: number): { header: Record<string, unknown>; data: Buffer } {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  const parts: Buffer[] = [];
  let off = 0;
  for (const s of specs) {
    const n = s.shape.reduce((a, d) => a * d, 1) * SIZES[s.dtype];
    header[s.name] = { dtype: s.dtype, shape: s.shape, data_offsets: [off, off + n] };
    parts.push(Buffer.alloc(n, (payload + off) & 0xff));
    off += n;
  }
  return { header, data: Buffer.concat(parts) };
}

function encode(headerText: string, data: Uint8Array, lengthDelta = 0): Uint8Array {
  const text = Buffer.from(headerText, 'utf8');
  const n = Buffer.alloc(8);
  n.writeBigUInt64LE(BigInt(Math.max(0, text.length + lengthDelta)));
  return Buffer.concat([n, text, data]);
}

const valid = fc.tuple(fc.uniqueArray(spec, { selector: (s) => s.name, maxLength: 4 }), fc.integer({ min: 0, max: 255 })).map(([specs, p]) => build(specs, p));

/** One field of a valid header replaced; lengths, nesting and padding forged at the text level. */
const structured: fc.Arbitrary<FuzzCase> = fc
  .tuple(
    valid,
    fc.oneof(
      fc.record({ at: fc.nat(), field: fc.constantFrom('dtype', 'shape', 'data_offsets'), value: fc.oneof(hostileJson, fc.array(hostileNumber, { maxLength: 4 })) }),
      fc.record({ metadata: fc.oneof(hostileJson, fc.dictionary(fc.string({ unit: 'binary', maxLength: 8 }), fc.oneof(fc.string({ unit: 'binary' }), hostileJson))) }),
      fc.record({ deepMetadata: fc.integer({ min: 1, max: 20_000 }) }),
      fc.record({ rename: fc.nat(), to: fc.string({ unit: 'binary', maxLength: 10 }) }),
      fc.record({ lengthDelta: fc.integer({ min: -16, max: 16 }) }),
      fc.record({ padding: fc.stringMatching(/^[ \t\r\n]{0,9}$/) }),
      fc.record({ whole: hostileJson }),
    ),
  )
  .map(([{ header, data }, m]): FuzzCase => {
    const names = Object.keys(header).filter((k) => k !== '__metadata__');
    if ('field' in m && names.length) (header[names[m.at % names.length]] as Record<string, unknown>)[m.field] = m.value;
    if ('metadata' in m) header.__metadata__ = m.metadata;
    if ('rename' in m && names.length) {
      const from = names[m.rename % names.length];
      const entry = header[from];
      delete header[from];
      header[m.to] = entry;
    }
    if ('deepMetadata' in m) {
      delete header.__metadata__;
      return { bytes: encode(JSON.stringify(header).replace(/^\{/, `{"__metadata__":${nested('"x"', m.deepMetadata)}${names.length ? ',' : ''}`), data) };
    }
    const text = 'whole' in m ? JSON.stringify(m.whole) ?? 'null' : JSON.stringify(header);
    if ('padding' in m) return { bytes: encode(m.padding + text + m.padding, data) };
    return { bytes: encode(text, data, 'lengthDelta' in m ? m.lengthDelta : 0) };
  });

export const safetensorsTarget: FuzzTarget = {
  name: 'safetensors',
  codes: ['ERR_FORMAT'],
  inputs: fc.oneof(structured, byteMutations(valid.map(({ header, data }) => encode(JSON.stringify(header), data))).map((bytes) => ({ bytes }))),
  check,
  allocationBound: (input) => input.length + 4096,
};
