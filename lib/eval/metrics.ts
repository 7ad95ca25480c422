/**
 * Fidelity metrics of a compressed-cache image against the full-cache image of the same prompt and seed
 * (spec sec. 5.1: the paper's PSNR is torchmetrics' with data range [0, 1], averaged over images).
 *
 * Images are u8 RGB [H, W, 3] (or [B, H, W, 3] with `count`), mapped to [0, 1] by /255.
 * - PSNR: 10·log10(1 / MSE) per image over all pixels and channels, then the mean over images; identical images
 *   give +Infinity (and so does the mean if any image is identical, as torchmetrics' per-image mean would).
 * - SSIM (Wang et al. 2004): gaussian window 11, σ 1.5, K1 0.01, K2 0.03, data range 1, per channel on the
 *   'valid' region (no padding: the window centres at least 5 pixels from every edge), mean over positions and
 *   channels, then over images. An image smaller than 11 pixels in either side is an error.
 * - Differing pixels: positions where any channel differs, and values (channel entries) that differ.
 */
import { fail } from '../errors.js';

export interface ImagePair {
  a: Uint8Array;
  b: Uint8Array;
  height: number;
  width: number;
  /** Images in the arrays (B). Default 1. */
  count?: number;
}

function check(p: ImagePair): number {
  const B = p.count ?? 1;
  const n = B * p.height * p.width * 3;
  if (p.a.length !== n || p.b.length !== n) fail('ERR_SHAPE', `metrics: expected ${B} x ${p.height} x ${p.width} x 3 = ${n} bytes, got ${p.a.length} and ${p.b.length}`);
  return B;
}

/** PSNR of one image (data range 1). */
export function psnrImage(a: ArrayLike<number>, b: ArrayLike<number>, scale = 255): number {
  let se = 0;
  for (let i = 0; i < a.length; i++) {
    const d = (a[i] - b[i]) / scale;
    se += d * d;
  }
  const mse = se / a.length;
  return mse === 0 ? Infinity : 10 * Math.log10(1 / mse);
}

/** Mean PSNR over the B images of a pair. */
export function psnr(p: ImagePair): number {
  const B = check(p);
  const per = p.height * p.width * 3;
  let s = 0;
  for (let i = 0; i < B; i++) s += psnrImage(p.a.subarray(i * per, (i + 1) * per), p.b.subarray(i * per, (i + 1) * per));
  return s / B;
}

function gaussian(size = 11, sigma = 1.5): Float64Array {
  const g = new Float64Array(size);
  const c = (size - 1) / 2;
  let s = 0;
  for (let i = 0; i < size; i++) s += g[i] = Math.exp(-((i - c) ** 2) / (2 * sigma * sigma));
  for (let i = 0; i < size; i++) g[i] /= s;
  return g;
}

// Separable 'valid' filtering of a [H, W] plane.
function filter(x: Float64Array, H: number, W: number, g: Float64Array): Float64Array {
  const k = g.length;
  const Wo = W - k + 1;
  const Ho = H - k + 1;
  const tmp = new Float64Array(H * Wo);
  for (let y = 0; y < H; y++)
    for (let xo = 0; xo < Wo; xo++) {
      let s = 0;
      for (let i = 0; i < k; i++) s += g[i] * x[y * W + xo + i];
      tmp[y * Wo + xo] = s;
    }
  const out = new Float64Array(Ho * Wo);
  for (let yo = 0; yo < Ho; yo++)
    for (let xo = 0; xo < Wo; xo++) {
      let s = 0;
      for (let i = 0; i < k; i++) s += g[i] * tmp[(yo + i) * Wo + xo];
      out[yo * Wo + xo] = s;
    }
  return out;
}

/** SSIM of one [H, W, 3] u8 image pair: mean over channels of the mean SSIM map. */
export function ssimImage(a: Uint8Array, b: Uint8Array, height: number, width: number): number {
  const size = 11;
  if (height < size || width < size) fail('ERR_SHAPE', `SSIM needs images of at least ${size} x ${size}, got ${height} x ${width}`);
  const g = gaussian(size, 1.5);
  const C1 = 0.01 ** 2;
  const C2 = 0.03 ** 2;
  const n = height * width;
  let total = 0;
  for (let ch = 0; ch < 3; ch++) {
    const x = new Float64Array(n);
    const y = new Float64Array(n);
    const xx = new Float64Array(n);
    const yy = new Float64Array(n);
    const xy = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      x[i] = a[3 * i + ch] / 255;
      y[i] = b[3 * i + ch] / 255;
      xx[i] = x[i] * x[i];
      yy[i] = y[i] * y[i];
      xy[i] = x[i] * y[i];
    }
    const [mx, my, sxx, syy, sxy] = [x, y, xx, yy, xy].map((p) => filter(p, height, width, g));
    let s = 0;
    for (let i = 0; i < mx.length; i++) {
      const vx = sxx[i] - mx[i] * mx[i];
      const vy = syy[i] - my[i] * my[i];
      const cxy = sxy[i] - mx[i] * my[i];
      s += ((2 * mx[i] * my[i] + C1) * (2 * cxy + C2)) / ((mx[i] * mx[i] + my[i] * my[i] + C1) * (vx + vy + C2));
    }
    total += s / mx.length;
  }
  return total / 3;
}

/** Mean SSIM over the B images of a pair. */
export function ssim(p: ImagePair): number {
  const B = check(p);
  const per = p.height * p.width * 3;
  let s = 0;
  for (let i = 0; i < B; i++) s += ssimImage(p.a.subarray(i * per, (i + 1) * per), p.b.subarray(i * per, (i + 1) * per), p.height, p.width);
  return s / B;
}

export interface PixelDiff {
  /** Pixel positions (over all images) where any channel differs. */
  pixels: number;
  /** Channel values that differ. */
  values: number;
  /** Largest absolute difference of a value (0..255). */
  maxAbs: number;
  totalPixels: number;
}

export function pixelDiff(p: ImagePair): PixelDiff {
  const B = check(p);
  let pixels = 0;
  let values = 0;
  let maxAbs = 0;
  for (let i = 0; i < p.a.length; i += 3) {
    let any = false;
    for (let c = 0; c < 3; c++) {
      const d = Math.abs(p.a[i + c] - p.b[i + c]);
      if (d) {
        values++;
        any = true;
        if (d > maxAbs) maxAbs = d;
      }
    }
    if (any) pixels++;
  }
  return { pixels, values, maxAbs, totalPixels: B * p.height * p.width };
}

export interface Fidelity {
  psnr: number;
  ssim: number;
  diff: PixelDiff;
}

export function fidelity(p: ImagePair): Fidelity {
  return { psnr: psnr(p), ssim: ssim(p), diff: pixelDiff(p) };
}
