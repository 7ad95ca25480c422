import test from 'ava';
import { inflateSync } from 'node:zlib';
import { decode as decodeIndependently } from 'fast-png';
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

const paethPredictor = (a: number, b: number, c: number): number => {
  const p = a + b - c;
  const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
};

/**
 * Rows built so that each filter type is the cheapest for some of them: every designed row follows a setup row
 * (uniform noise, or for Paeth piecewise-constant runs, where Paeth switches between its left and upper
 * predictions and so beats both Sub and Up). Filter 0 wins on small values of alternating sign (adjacent
 * differences are twice as large), 1 on a slow horizontal walk, 2 on a copy of the row above, 3 on the running
 * average of left and up, 4 on the Paeth prediction plus sparse noise.
 */
function filterWinners(rng: Rng, width: number, height: number, channels: 3 | 4): RawImage {
  const stride = width * channels;
  const data = new Uint8Array(height * stride);
  let designed = 0;
  for (let y = 0; y < height; y++) {
    const row = data.subarray(y * stride, (y + 1) * stride);
    const up = y > 0 ? data.subarray((y - 1) * stride, y * stride) : new Uint8Array(stride);
    // Even rows set up the designed odd row after them.
    if (y % 2 === 0) designed = rng.int(0, 4);
    const kind = y % 2 === 1 ? designed : designed === 4 ? 'runs' : 'noise';
    for (let i = 0; i < stride; i++) {
      const a = i >= channels ? row[i - channels] : 0, b = up[i], c = i >= channels ? up[i - channels] : 0;
      const sparse = (amp: number) => (rng.int(0, 3) === 0 ? rng.int(-amp, amp) : 0);
      const v =
        kind === 'noise' ? rng.int(0, 255)
        : kind === 'runs' ? (i >= channels && rng.int(0, 3) > 0 ? a : rng.int(0, 255))
        : kind === 0 ? (Math.floor(i / channels) % 2 ? -1 : 1) * rng.int(2, 6)
        : kind === 1 ? a + rng.int(-2, 2)
        : kind === 2 ? b + sparse(1)
        : kind === 3 ? ((a + b) >> 1) + sparse(1)
        : paethPredictor(a, b, c) + (rng.int(0, 3) === 0 ? rng.pick([-1, 1]) * rng.int(5, 20) : 0);
      row[i] = v & 0xff;
    }
  }
  return { width, height, channels, data };
}

/** Per row, the filter type the documented rule picks: least sum of |filtered byte as int8|, ties to the lower type. */
function cheapestFilters(img: RawImage): number[] {
  const { width, height, channels, data } = img;
  const stride = width * channels;
  const out: number[] = [];
  for (let y = 0; y < height; y++) {
    const costs = [0, 0, 0, 0, 0];
    for (let i = 0; i < stride; i++) {
      const x = data[y * stride + i];
      const a = i >= channels ? data[y * stride + i - channels] : 0;
      const b = y > 0 ? data[(y - 1) * stride + i] : 0;
      const c = i >= channels && y > 0 ? data[(y - 1) * stride + i - channels] : 0;
      [0, a, b, Math.floor((a + b) / 2), paethPredictor(a, b, c)].forEach((pred, f) => {
        const r = (x - pred + 256) % 256;
        costs[f] += Math.min(r, 256 - r);
      });
    }
    out.push(costs.indexOf(Math.min(...costs)));
  }
  return out;
}

/** The filter-type byte of every row, read from the inflated IDAT stream. */
function rowFilters(png: Buffer, img: RawImage): number[] {
  const idat = Buffer.concat(pngChunks(png).filter((c) => c.type === 'IDAT').map((c) => c.data));
  const raw = inflateSync(idat);
  const stride = img.width * img.channels;
  return Array.from({ length: img.height }, (_, y) => raw[y * (stride + 1)]);
}

test('adaptive filters: each row takes the cheapest filter, all five types occur, and an independent decoder (fast-png) reads every image back exactly', (t) => {
  const rng = new Rng(seedFor(t));
  const sizes: [number, number][] = [[1, 9], [2, 40], [5, 60], [37, 120], [64, 160], [301, 80]];
  for (const channels of [3, 4] as const)
    for (const [w, h] of sizes)
      for (const make of [filterWinners, (r: Rng, ww: number, hh: number, ch: 3 | 4) => image(r, ww, hh, ch, false), (r: Rng, ww: number, hh: number, ch: 3 | 4) => image(r, ww, hh, ch, true)]) {
        const img = make(rng, w, h, channels);
        const label = `${w}x${h}x${channels} ${make === filterWinners ? 'filter winners' : 'gradient/noise'}`;
        const png = encodePng(img, { filter: 'adaptive' });
        const filters = rowFilters(png, img);
        t.deepEqual(filters, cheapestFilters(img), `${label}: per-row filter choice`);
        if (make === filterWinners && w >= 37) t.deepEqual([...new Set(filters)].sort(), [0, 1, 2, 3, 4], `${label}: filter types used`);
        const decoded = decodeIndependently(png, { checkCrc: true });
        t.is(decoded.width, w, label);
        t.is(decoded.height, h, label);
        t.is(decoded.depth, 8, label);
        t.is(decoded.channels, channels, label);
        t.true(Buffer.from(decoded.data.buffer, decoded.data.byteOffset, decoded.data.byteLength).equals(img.data), `${label}: pixels`);
        const plain = decodeIndependently(encodePng(img, { filter: 'none' }));
        t.true(Buffer.from(plain.data.buffer, plain.data.byteOffset, plain.data.byteLength).equals(img.data), `${label}: pixels, filter none`);
      }
});

test('adaptive filtering shrinks smooth images', (t) => {
  const rng = new Rng(seedFor(t));
  const img = image(rng, 128, 96, 3, true);
  const plain = encodePng(img, { filter: 'none' });
  const adaptive = encodePng(img, { filter: 'adaptive' });
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
