/**
 * Byte-level mutations shared by the targets: flips, overwrites with boundary values (as 8/16/32/64-bit
 * little- and big-endian integers, where forged lengths and offsets live), insertions, deletions, duplicated
 * ranges and truncation. Positions are drawn as fractions of the current length, so one arbitrary fits every seed.
 */
import fc from 'fast-check';

/** Values that break length and offset arithmetic: zero, one, sign bits, all-ones, just past 2^32 and 2^53. */
const BOUNDARY = [0n, 1n, 0x7fn, 0x80n, 0xffn, 0x7fffn, 0xffffn, 0x7fffffffn, 0x80000000n, 0xffffffffn, 1n << 32n, (1n << 53n) - 1n, 1n << 53n, (1n << 63n) - 1n, (1n << 64n) - 1n];

type Mutation =
  | { op: 'flip'; at: number; bit: number }
  | { op: 'set'; at: number; value: number }
  | { op: 'word'; at: number; width: 1 | 2 | 4 | 8; value: bigint; bigEndian: boolean }
  | { op: 'insert'; at: number; bytes: Uint8Array }
  | { op: 'delete'; at: number; length: number }
  | { op: 'duplicate'; at: number; length: number }
  | { op: 'truncate'; at: number };

const position = fc.double({ min: 0, max: 1, maxExcluded: true, noNaN: true });

const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ op: fc.constant('flip' as const), at: position, bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ op: fc.constant('set' as const), at: position, value: fc.integer({ min: 0, max: 255 }) }),
  fc.record({
    op: fc.constant('word' as const),
    at: position,
    width: fc.constantFrom(1 as const, 2 as const, 4 as const, 8 as const),
    value: fc.oneof(fc.constantFrom(...BOUNDARY), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
    bigEndian: fc.boolean(),
  }),
  fc.record({ op: fc.constant('insert' as const), at: position, bytes: fc.uint8Array({ minLength: 1, maxLength: 16 }) }),
  fc.record({ op: fc.constant('delete' as const), at: position, length: fc.integer({ min: 1, max: 64 }) }),
  fc.record({ op: fc.constant('duplicate' as const), at: position, length: fc.integer({ min: 1, max: 64 }) }),
  fc.record({ op: fc.constant('truncate' as const), at: position }),
);

function apply(data: Buffer, m: Mutation): Buffer {
  const at = Math.floor(m.at * data.length);
  switch (m.op) {
    case 'flip':
      if (data.length) data[at] ^= 1 << m.bit;
      return data;
    case 'set':
      if (data.length) data[at] = m.value;
      return data;
    case 'word': {
      if (at + m.width > data.length) return data;
      const v = m.value & ((1n << BigInt(8 * m.width)) - 1n);
      for (let i = 0; i < m.width; i++) data[at + (m.bigEndian ? m.width - 1 - i : i)] = Number((v >> BigInt(8 * i)) & 0xffn);
      return data;
    }
    case 'insert':
      return Buffer.concat([data.subarray(0, at), m.bytes, data.subarray(at)]);
    case 'delete':
      return Buffer.concat([data.subarray(0, at), data.subarray(at + m.length)]);
    case 'duplicate':
      return Buffer.concat([data.subarray(0, at + m.length), data.subarray(at, at + m.length), data.subarray(at + m.length)]);
    case 'truncate':
      return data.subarray(0, at);
  }
}

/**
 * 1 to 6 byte-level mutations of one of `seeds` (copied; the seeds stay intact), after its first `keep` bytes: a
 * magic number the parser checks first is kept so that most mutations reach the code behind it.
 */
export function byteMutations(seeds: fc.Arbitrary<Uint8Array>, keep = 0): fc.Arbitrary<Uint8Array> {
  return fc
    .tuple(seeds, fc.array(mutation, { minLength: 1, maxLength: 6 }))
    .map(([seed, ms]) => new Uint8Array(Buffer.concat([seed.subarray(0, keep), ms.reduce(apply, Buffer.from(seed.subarray(keep)))])));
}

/** Numbers that stress a parser's integer checks: negatives, fractions, huge, unsafe, special. */
export const hostileNumber: fc.Arbitrary<unknown> = fc.oneof(
  fc.constantFrom(-1, -0, 0.5, 1e300, 2 ** 53, 2 ** 53 + 2, 2 ** 64, 2 ** 32, 2 ** 31, -(2 ** 31), Number.MAX_SAFE_INTEGER, 1e-300),
  fc.integer(),
  fc.double(),
);

/** JSON values that are not what a field expects: strings (Unicode and control characters), nulls, arrays, objects. */
export const hostileJson: fc.Arbitrary<unknown> = fc.oneof(
  hostileNumber,
  fc.string({ unit: 'binary', maxLength: 12 }),
  fc.constantFrom(null, true, false, [], {}, ''),
  fc.jsonValue({ maxDepth: 3 }),
);

/** `value` wrapped in `depth` arrays: nesting that a recursive reader would follow to a stack overflow. */
export function nested(value: string, depth: number): string {
  return '['.repeat(depth) + value + ']'.repeat(depth);
}
