/**
 * A small PNG codec for 8-bit RGB / RGBA images (no interlace): the encoder writes IHDR, one IDAT (zlib via
 * node:zlib) and IEND; the decoder reads what the encoder writes plus any filter type, for tests and tools.
 */
import { deflateSync, inflateSync } from 'node:zlib';
import { fail, ScaleKVError } from '../errors.js';

export interface RawImage {
  width: number;
  height: number;
  /** 3 (RGB) or 4 (RGBA). */
  channels: 3 | 4;
  /** Row-major, interleaved, height * width * channels bytes. */
  data: Uint8Array;
}

export interface EncodeOptions {
  /** Row filter: 'none' (type 0 everywhere) or 'adaptive' (per row the one of None/Sub/Up/Average/Paeth with the smallest sum of |signed bytes|). Default 'adaptive'. */
  filter?: 'none' | 'adaptive';
  /** zlib level 0-9. Default 6. */
  level?: number;
}

/** Largest decoded (filtered) image accepted: 2 GiB, beyond any image this package writes or reads. */
const MAX_DECODED_BYTES = 2 ** 31;

export const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 (ISO 3309 / PNG), optionally continuing from a previous value. */
export function crc32(bytes: Uint8Array, crc = 0): number {
  let c = (crc ^ 0xffffffff) >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Uint8Array): Buffer {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  out.set(data, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}

function paeth(a: number, b: number, c: number): number {
  const p = a + b - c;
  const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

// Filtered bytes of one row for filter type `f` (prev: the previous unfiltered row, zeros for the first).
function filterRow(f: number, row: Uint8Array, prev: Uint8Array, bpp: number, out: Uint8Array): void {
  for (let i = 0; i < row.length; i++) {
    const a = i >= bpp ? row[i - bpp] : 0;
    const b = prev[i];
    const c = i >= bpp ? prev[i - bpp] : 0;
    const pred = f === 0 ? 0 : f === 1 ? a : f === 2 ? b : f === 3 ? (a + b) >> 1 : paeth(a, b, c);
    out[i] = (row[i] - pred) & 0xff;
  }
}

function checkImage(img: RawImage): void {
  const { width, height, channels, data } = img ?? ({} as RawImage);
  if (!Number.isSafeInteger(width) || !Number.isSafeInteger(height) || width < 1 || height < 1 || width > 0x7fffffff || height > 0x7fffffff)
    fail('ERR_INVALID_ARG', `PNG: width and height must be positive integers, got ${width} x ${height}`);
  if (channels !== 3 && channels !== 4) fail('ERR_INVALID_ARG', `PNG: channels must be 3 (RGB) or 4 (RGBA), got ${channels}`);
  if (!(data instanceof Uint8Array) || data.length !== width * height * channels)
    fail('ERR_SHAPE', `PNG: data must be a Uint8Array of ${width} * ${height} * ${channels} bytes, got ${data?.length}`);
}

/** Encodes an 8-bit RGB or RGBA image as a PNG file. */
export function encodePng(img: RawImage, opts: EncodeOptions = {}): Buffer {
  checkImage(img);
  const { width, height, channels, data } = img;
  const stride = width * channels;
  const adaptive = (opts.filter ?? 'adaptive') === 'adaptive';
  const raw = new Uint8Array(height * (stride + 1));
  const zeros = new Uint8Array(stride);
  const trial = new Uint8Array(stride);
  for (let y = 0; y < height; y++) {
    const row = data.subarray(y * stride, (y + 1) * stride);
    const prev = y > 0 ? data.subarray((y - 1) * stride, y * stride) : zeros;
    const dst = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    let best = 0;
    if (adaptive) {
      let bestCost = Infinity;
      for (let f = 0; f < 5; f++) {
        filterRow(f, row, prev, channels, trial);
        let cost = 0;
        for (let i = 0; i < stride; i++) cost += trial[i] < 128 ? trial[i] : 256 - trial[i];
        if (cost < bestCost) {
          bestCost = cost;
          best = f;
        }
      }
    }
    raw[y * (stride + 1)] = best;
    filterRow(best, row, prev, channels, dst);
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8; // bit depth
  ihdr[9] = channels === 4 ? 6 : 2; // colour type: RGBA or RGB
  ihdr[10] = 0; // deflate
  ihdr[11] = 0; // adaptive filtering
  ihdr[12] = 0; // no interlace
  const idat = deflateSync(raw, { level: opts.level ?? 6 });
  return Buffer.concat([PNG_SIGNATURE, chunk('IHDR', ihdr), chunk('IDAT', idat), chunk('IEND', new Uint8Array(0))]);
}

export interface PngChunk {
  type: string;
  data: Buffer;
  /** The stored CRC and whether it matches type + data. */
  crc: number;
  crcOk: boolean;
}

/** The chunks of a PNG file in order (signature checked; CRCs reported, not enforced). */
export function pngChunks(file: Uint8Array): PngChunk[] {
  const buf = Buffer.from(file.buffer, file.byteOffset, file.byteLength);
  if (buf.length < 8 || !buf.subarray(0, 8).equals(PNG_SIGNATURE)) fail('ERR_FORMAT', 'PNG: bad signature');
  const out: PngChunk[] = [];
  let p = 8;
  while (p < buf.length) {
    if (p + 12 > buf.length) fail('ERR_FORMAT', `PNG: truncated chunk header at byte ${p}`);
    const len = buf.readUInt32BE(p);
    if (p + 12 + len > buf.length) fail('ERR_FORMAT', `PNG: chunk at byte ${p} (${len} bytes) runs past the end`);
    const type = buf.toString('latin1', p + 4, p + 8);
    const data = buf.subarray(p + 8, p + 8 + len);
    const crc = buf.readUInt32BE(p + 8 + len);
    out.push({ type, data, crc, crcOk: crc32(buf.subarray(p + 4, p + 8 + len)) === crc });
    p += 12 + len;
    if (type === 'IEND') break;
  }
  return out;
}

/** Decodes an 8-bit, non-interlaced RGB or RGBA PNG (any filter types); fails on anything else or a bad CRC. */
export function decodePng(file: Uint8Array): RawImage {
  const chunks = pngChunks(file);
  for (const c of chunks) if (!c.crcOk) fail('ERR_FORMAT', `PNG: CRC mismatch in chunk ${c.type}`);
  const ihdr = chunks[0];
  if (!ihdr || ihdr.type !== 'IHDR' || ihdr.data.length !== 13) fail('ERR_FORMAT', 'PNG: first chunk is not IHDR');
  if (chunks[chunks.length - 1].type !== 'IEND') fail('ERR_FORMAT', 'PNG: no IEND chunk');
  const width = ihdr.data.readUInt32BE(0);
  const height = ihdr.data.readUInt32BE(4);
  const [depth, colour, compression, filterMethod, interlace] = ihdr.data.subarray(8);
  if (depth !== 8 || (colour !== 2 && colour !== 6) || compression !== 0 || filterMethod !== 0 || interlace !== 0)
    fail('ERR_FORMAT', `PNG: only 8-bit non-interlaced RGB/RGBA is supported (depth ${depth}, colour type ${colour}, interlace ${interlace})`);
  const channels = colour === 6 ? 4 : 3;
  const stride = width * channels;
  const expected = height * (stride + 1);
  if (width < 1 || height < 1 || expected > MAX_DECODED_BYTES)
    fail('ERR_FORMAT', `PNG: ${width} x ${height} is empty or larger than the decoder's ${MAX_DECODED_BYTES}-byte limit`);
  let raw: Buffer;
  try {
    // Inflating stops one byte past what IHDR promises: a small file that inflates to gigabytes is refused, not held.
    raw = inflateSync(Buffer.concat(chunks.filter((c) => c.type === 'IDAT').map((c) => c.data)), { maxOutputLength: expected + 1 });
  } catch (e) {
    throw new ScaleKVError('ERR_FORMAT', `PNG: image data is not a valid zlib stream of ${expected} bytes (${(e as Error).message})`, { cause: e });
  }
  if (raw.length !== expected) fail('ERR_FORMAT', `PNG: image data holds ${raw.length} bytes, expected ${expected}`);
  const data = new Uint8Array(height * stride);
  for (let y = 0; y < height; y++) {
    const f = raw[y * (stride + 1)];
    if (f > 4) fail('ERR_FORMAT', `PNG: row ${y} has unknown filter type ${f}`);
    const src = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    const o = y * stride;
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? data[o + i - channels] : 0;
      const b = y > 0 ? data[o - stride + i] : 0;
      const c = i >= channels && y > 0 ? data[o - stride + i - channels] : 0;
      const pred = f === 0 ? 0 : f === 1 ? a : f === 2 ? b : f === 3 ? (a + b) >> 1 : paeth(a, b, c);
      data[o + i] = (src[i] + pred) & 0xff;
    }
  }
  return { width, height, channels, data };
}
