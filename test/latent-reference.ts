// Float64 references of the latent and VAE-decoder ops, written for clarity. Where the kernel's result is
// defined by f32 rounding (interpolation taps, image truncation, code values) the reference rounds the same
// way with Math.fround and says so.

const f = Math.fround;

/** The per-axis taps of torch's linear interpolation (align_corners=False): f32 scale, src rounded once. */
export function linearTaps(inSize: number, outSize: number): { i0: number[]; i1: number[]; w1: number[] } {
  const scale = f(inSize / outSize);
  const i0: number[] = [], i1: number[] = [], w1: number[] = [];
  for (let d = 0; d < outSize; d++) {
    const src = inSize === outSize ? d : Math.max(0, f((d + 0.5) * scale - 0.5));
    const lo = Math.floor(src);
    i0.push(lo);
    i1.push(inSize === outSize ? lo : Math.min(lo + 1, inSize - 1));
    w1.push(src - lo);
  }
  return { i0, i1, w1 };
}

export function resizeBilinearRef(x: Float32Array, planes: number, h: number, w: number, oh: number, ow: number): Float64Array {
  const ty = linearTaps(h, oh), tx = linearTaps(w, ow);
  const out = new Float64Array(planes * oh * ow);
  for (let p = 0; p < planes; p++)
    for (let y = 0; y < oh; y++)
      for (let xx = 0; xx < ow; xx++) {
        const at = (r: number, c: number) => x[(p * h + r) * w + c];
        const row = (r: number) => at(r, tx.i0[xx]) * (1 - tx.w1[xx]) + at(r, tx.i1[xx]) * tx.w1[xx];
        out[(p * oh + y) * ow + xx] = row(ty.i0[y]) * (1 - ty.w1[y]) + row(ty.i1[y]) * ty.w1[y];
      }
  return out;
}

export function conv2dRef(x: Float32Array, w: Float32Array, bias: Float32Array | undefined, B: number, I: number, O: number, H: number, W: number, k: number): Float64Array {
  const p = (k - 1) / 2;
  const out = new Float64Array(B * O * H * W);
  for (let b = 0; b < B; b++)
    for (let o = 0; o < O; o++)
      for (let y = 0; y < H; y++)
        for (let xx = 0; xx < W; xx++) {
          let acc = bias ? bias[o] : 0;
          for (let i = 0; i < I; i++)
            for (let ky = 0; ky < k; ky++) {
              const yy = y + ky - p;
              if (yy < 0 || yy >= H) continue;
              for (let kx = 0; kx < k; kx++) {
                const xs = xx + kx - p;
                if (xs < 0 || xs >= W) continue;
                acc += w[((o * I + i) * k + ky) * k + kx] * x[((b * I + i) * H + yy) * W + xs];
              }
            }
          out[((b * O + o) * H + y) * W + xx] = acc;
        }
  return out;
}

export function groupNormRef(x: Float32Array, weight: Float32Array, bias: Float32Array, B: number, C: number, S: number, G: number, eps: number, swish: boolean): Float64Array {
  const out = new Float64Array(x.length);
  const cpg = C / G, n = cpg * S;
  for (let b = 0; b < B; b++)
    for (let g = 0; g < G; g++) {
      const base = (b * C + g * cpg) * S;
      let mean = 0;
      for (let i = 0; i < n; i++) mean += x[base + i];
      mean /= n;
      let v = 0;
      for (let i = 0; i < n; i++) v += (x[base + i] - mean) ** 2;
      const rstd = 1 / Math.sqrt(v / n + eps);
      for (let i = 0; i < n; i++) {
        const c = g * cpg + Math.floor(i / S);
        const y = (x[base + i] - mean) * rstd * weight[c] + bias[c];
        out[base + i] = swish ? y / (1 + Math.exp(-y)) : y;
      }
    }
  return out;
}

/** The official (clamp(x) + 1) / 2 * 255 in f32, truncated; channels picked RGB or BGR, NHWC out. */
export function imageToU8Ref(img: Float32Array, B: number, H: number, W: number, bgr: boolean): Uint8Array {
  const out = new Uint8Array(B * H * W * 3);
  for (let b = 0; b < B; b++)
    for (let p = 0; p < H * W; p++)
      for (let k = 0; k < 3; k++) {
        const c = bgr ? 2 - k : k;
        const x = Math.min(1, Math.max(-1, img[(b * 3 + c) * H * W + p]));
        out[(b * H * W + p) * 3 + k] = Math.trunc(f(f(f(x + 1) / 2) * 255));
      }
  return out;
}
