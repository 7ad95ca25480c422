/**
 * PNG decoding (decodePng): IHDR fields forged with a recomputed CRC (sizes up to 2^32 - 1, depth, colour type,
 * interlace), IDAT streams that inflate far past what IHDR promises (a decompression bomb), corrupt zlib, and
 * byte-level mutations; an image that decodes must equal fast-png's decoding of the same file.
 */
import fc from 'fast-check';
import { decode } from 'fast-png';
import { deflateSync } from 'node:zlib';
import { crc32, decodePng, encodePng } from '../../../lib/image/png.js';
import { FuzzTarget, FuzzViolation } from '../harness.js';
import { byteMutations } from '../mutate.js';

function check(input: Uint8Array): void {
  const img = decodePng(input);
  let ref;
  try {
    ref = decode(input);
  } catch (e) {
    throw new FuzzViolation(`decoded a file fast-png refuses (${(e as Error).message})`);
  }
  if (ref.width !== img.width || ref.height !== img.height || ref.channels !== img.channels || !Buffer.from(ref.data as Uint8Array).equals(Buffer.from(img.data)))
    throw new FuzzViolation('decoded image differs from fast-png');
}

const image = fc
  .record({ width: fc.integer({ min: 1, max: 9 }), height: fc.integer({ min: 1, max: 9 }), channels: fc.constantFrom(3 as const, 4 as const), seed: fc.nat(255), filter: fc.constantFrom('none' as const, 'adaptive' as const) })
  .map(({ width, height, channels, seed, filter }) =>
    encodePng({ width, height, channels, data: Uint8Array.from({ length: width * height * channels }, (_, i) => (seed + i * i * 7) & 0xff) }, { filter }),
  );

/** Chunk `type` of a PNG replaced by `data`, with a correct CRC, so only the field itself is wrong. */
function replaceChunk(png: Buffer, type: string, data: Buffer): Buffer {
  for (let p = 8; p + 12 <= png.length; p += 12 + png.readUInt32BE(p)) {
    if (png.toString('latin1', p + 4, p + 8) !== type) continue;
    const chunk = Buffer.alloc(12 + data.length);
    chunk.writeUInt32BE(data.length, 0);
    chunk.write(type, 4, 'latin1');
    data.copy(chunk, 8);
    chunk.writeUInt32BE(crc32(chunk.subarray(4, 8 + data.length)), 8 + data.length);
    return Buffer.concat([png.subarray(0, p), chunk, png.subarray(p + 12 + png.readUInt32BE(p))]);
  }
  return png;
}

let bomb: Buffer | undefined;
/** 256 MiB of zeros deflated to about 256 KiB: what a 1 x 1 image must not be allowed to inflate. */
function zlibBomb(): Buffer {
  return (bomb ??= deflateSync(Buffer.alloc(256 << 20), { level: 9 }));
}

const structured = fc.oneof(
  fc
    .tuple(image, fc.constantFrom(0, 4, 8, 9, 10, 11, 12), fc.oneof(fc.constantFrom(0, 1, 0xffff, 0x7fffffff, 0xffffffff, 46341), fc.nat(255)))
    .map(([png, at, value]) => {
      const ihdr = Buffer.from(png.subarray(16, 29));
      if (at < 8) ihdr.writeUInt32BE(value >>> 0, at);
      else ihdr[at] = value & 0xff;
      return replaceChunk(Buffer.from(png), 'IHDR', ihdr);
    }),
  fc.tuple(image, fc.boolean()).map(([png, big]) => replaceChunk(Buffer.from(png), 'IDAT', big ? zlibBomb() : Buffer.from([0x78, 0x9c, 0xff, 0xff, 0xff]))),
);

export const pngTarget: FuzzTarget = {
  name: 'png',
  codes: ['ERR_FORMAT'],
  inputs: fc.oneof(structured.map((bytes) => ({ bytes })), byteMutations(image, 8).map((bytes) => ({ bytes }))),
  check,
  allocationBound: (input) => input.length + (1 << 20),
};
