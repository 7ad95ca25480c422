import test from 'ava';
import { fidelity, pixelDiff, psnr, ssim } from '../lib/eval/metrics.js';

const H = 16;
const W = 20;
const fill = (v: (i: number) => number, count = 1) => Uint8Array.from({ length: count * H * W * 3 }, (_, i) => v(i));

test('identical images: PSNR +Infinity, SSIM 1, no differing pixels', (t) => {
  const a = fill((i) => (i * 37) % 256);
  const f = fidelity({ a, b: a.slice(), height: H, width: W });
  t.is(f.psnr, Infinity);
  t.true(Math.abs(f.ssim - 1) < 1e-12);
  t.deepEqual(f.diff, { pixels: 0, values: 0, maxAbs: 0, totalPixels: H * W });
});

test('a constant offset: PSNR 20·log10(255/d), SSIM from the luminance term alone', (t) => {
  const a = fill(() => 100);
  const b = fill(() => 110);
  t.true(Math.abs(psnr({ a, b, height: H, width: W }) - 20 * Math.log10(25.5)) < 1e-9); // 28.1308...
  const mx = 100 / 255;
  const my = 110 / 255;
  const C1 = 1e-4;
  const expected = (2 * mx * my + C1) / (mx * mx + my * my + C1); // variances 0: the contrast term is C2/C2
  t.true(Math.abs(ssim({ a, b, height: H, width: W }) - expected) < 1e-12);
  t.deepEqual(pixelDiff({ a, b, height: H, width: W }), { pixels: H * W, values: 3 * H * W, maxAbs: 10, totalPixels: H * W });
});

test('known noise: PSNR by hand, SSIM against a direct 2-D window evaluation', (t) => {
  // +-5 on one channel of every other pixel.
  const a = fill((i) => 60 + ((i * 13) % 120));
  const b = a.map((v, i) => (i % 3 === 1 && Math.floor(i / 3) % 2 === 0 ? v + 5 : v));
  const changed = (H * W) / 2;
  const mse = (changed * (5 / 255) ** 2) / (H * W * 3);
  t.true(Math.abs(psnr({ a, b, height: H, width: W }) - 10 * Math.log10(1 / mse)) < 1e-9);
  // Direct SSIM: 2-D gaussian window weights, valid positions, mean over channels.
  const g1 = Array.from({ length: 11 }, (_, i) => Math.exp(-((i - 5) ** 2) / 4.5));
  const s1 = g1.reduce((x, y) => x + y, 0);
  let total = 0;
  for (let c = 0; c < 3; c++) {
    let s = 0;
    let count = 0;
    for (let y0 = 0; y0 + 11 <= H; y0++)
      for (let x0 = 0; x0 + 11 <= W; x0++) {
        let mx = 0, my = 0, xx = 0, yy = 0, xy = 0;
        for (let i = 0; i < 11; i++)
          for (let j = 0; j < 11; j++) {
            const w = (g1[i] * g1[j]) / (s1 * s1);
            const p = ((y0 + i) * W + x0 + j) * 3 + c;
            const u = a[p] / 255;
            const v = b[p] / 255;
            mx += w * u; my += w * v; xx += w * u * u; yy += w * v * v; xy += w * u * v;
          }
        const vx = xx - mx * mx;
        const vy = yy - my * my;
        const cv = xy - mx * my;
        s += ((2 * mx * my + 1e-4) * (2 * cv + 9e-4)) / ((mx * mx + my * my + 1e-4) * (vx + vy + 9e-4));
        count++;
      }
    total += s / count;
  }
  const got = ssim({ a, b, height: H, width: W });
  t.true(Math.abs(got - total / 3) < 1e-10, `${got} vs ${total / 3}`);
  t.true(got < 1 && got > 0.5);
  t.is(pixelDiff({ a, b, height: H, width: W }).pixels, changed);
});

test('several images: per-image PSNR, then the mean', (t) => {
  const a = fill(() => 50, 2);
  const b = a.map((v, i) => (i < H * W * 3 ? v + 2 : v + 4));
  const p1 = 20 * Math.log10(255 / 2);
  const p2 = 20 * Math.log10(255 / 4);
  t.true(Math.abs(psnr({ a, b, height: H, width: W, count: 2 }) - (p1 + p2) / 2) < 1e-9);
  t.throws(() => psnr({ a, b: b.subarray(1), height: H, width: W, count: 2 }), { message: /bytes/ });
  t.throws(() => ssim({ a: fill(() => 0).subarray(0, 5 * 5 * 3), b: fill(() => 0).subarray(0, 5 * 5 * 3), height: 5, width: 5 }), { message: /11 x 11/ });
});
