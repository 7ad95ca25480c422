import test from 'ava';
import { inflateSync } from 'node:zlib';
import { crc32, decodePng, encodePng, pngChunks, PNG_SIGNATURE, RawImage } from '../lib/image/png.js';
import { Rng, seedFor } from './helpers.js';

function image(rng: Rng, width: number, height: number, channels: 3 | 4, smooth: boolean): RawImage {
  const data = new Uint8Array(width * height * channels);
  for (let y = 0; y < height; y++)
    for (let x = 0; x < width; x++)
      for (let c = 0; c < channels; c++)
        data[(y * width + x) * channels + c] = smooth ? (x * 3 + y * 5 + c * 40 + rng.int(0, 3)) & 0xff : rng.int(0, 255);
  return { width, height, channels, data };
}

test('crc32 matches the standard check value', (t) => {
  t.is(crc32(Buffer.from('123456789')), 0xcbf43926);
  t.is(crc32(Buffer.from('IEND')), 0xae426082);
  t.is(crc32(new Uint8Array(0)), 0);
  t.is(crc32(Buffer.from('6789'), crc32(Buffer.from('12345'))), 0xcbf43926, 'continues a running CRC');
});

test('byte-exact structure: signature, IHDR, IDAT, IEND with valid CRCs', (t) => {
  const img: RawImage = { width: 3, height: 2, channels: 3, data: Uint8Array.from({ length: 18 }, (_, i) => i * 13) };
  const png = encodePng(img, { filter: 'none' });
  t.deepEqual([...png.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  t.true(png.subarray(0, 8).equals(PNG_SIGNATURE));
  // IHDR: length 13, type, width 3, height 2, depth 8, colour type 2, compression 0, filter 0, interlace 0.
  t.deepEqual([...png.subarray(8, 33)], [0, 0, 0, 13, 0x49, 0x48, 0x44, 0x52, 0, 0, 0, 3, 0, 0, 0, 2, 8, 2, 0, 0, 0, ...png.subarray(29, 33)]);
  t.is(png.readUInt32BE(29), crc32(png.subarray(12, 29)));
  // The file ends with the fixed 12-byte IEND chunk.
  t.deepEqual([...png.subarray(png.length - 12)], [0, 0, 0, 0, 0x49, 0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82]);
  const chunks = pngChunks(png);
  t.deepEqual(chunks.map((c) => c.type), ['IHDR', 'IDAT', 'IEND']);
  t.true(chunks.every((c) => c.crcOk));
  // Filter type 0: the inflated stream is each row prefixed by a zero byte.
  const raw = inflateSync(chunks[1].data);
  t.deepEqual([...raw], [0, ...img.data.subarray(0, 9), 0, ...img.data.subarray(9)]);
  t.is(encodePng({ ...img, channels: 4, width: 3, data: new Uint8Array(24) })[25], 6, 'RGBA: colour type 6');
});

test('round trip RGB / RGBA with both filter modes, odd sizes', (t) => {
  const rng = new Rng(seedFor(t));
  for (const [w, h] of [[1, 1], [7, 5], [33, 17], [64, 64]])
    for (const channels of [3, 4] as const)
      for (const smooth of [false, true])
        for (const filter of ['none', 'adaptive'] as const) {
          const img = image(rng, w, h, channels, smooth);
          const back = decodePng(encodePng(img, { filter }));
          t.deepEqual({ ...back, data: Buffer.from(back.data) }, { ...img, data: Buffer.from(img.data) }, `${w}x${h}x${channels} ${filter}`);
        }
});

test('adaptive filtering uses the non-trivial filters and shrinks smooth images', (t) => {
  const rng = new Rng(seedFor(t));
  const img = image(rng, 128, 96, 3, true);
  const plain = encodePng(img, { filter: 'none' });
  const adaptive = encodePng(img, { filter: 'adaptive' });
  const raw = inflateSync(pngChunks(adaptive)[1].data);
  const types = new Set<number>();
  for (let y = 0; y < 96; y++) types.add(raw[y * (128 * 3 + 1)]);
  t.true([...types].some((f) => f !== 0), `filters used: ${[...types]}`);
  t.true(adaptive.length < plain.length, `${adaptive.length} < ${plain.length}`);
});

test('the decoder rejects corruption; the encoder rejects bad input', (t) => {
  const png = encodePng({ width: 2, height: 2, channels: 3, data: new Uint8Array(12).fill(7) });
  const bad = Buffer.from(png);
  bad[40] ^= 1;
  t.throws(() => decodePng(bad), { message: /CRC|image data|inflat|incorrect|invalid/i });
  const sig = Buffer.from(png);
  sig[1] = 0;
  t.throws(() => decodePng(sig), { message: /signature/ });
  t.throws(() => encodePng({ width: 2, height: 2, channels: 3, data: new Uint8Array(11) }), { message: /bytes/ });
  t.throws(() => encodePng({ width: 0, height: 2, channels: 3, data: new Uint8Array(0) }), { message: /positive/ });
  t.throws(() => encodePng({ width: 1, height: 1, channels: 2 as never, data: new Uint8Array(2) }), { message: /channels/ });
});
