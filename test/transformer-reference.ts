// Float64 references of the transformer ops, written for clarity. Inputs are the values the kernels see
// (bf16 inputs already rounded by the caller); outputs are exact f64 unless a comment says where f32 rounds.

export function geluTanh(x: number): number {
  return 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x * x * x)));
}
export function silu(x: number): number {
  return x / (1 + Math.exp(-x));
}
export function epilogue(kind: 'none' | 'gelu_tanh' | 'silu', x: number): number {
  return kind === 'gelu_tanh' ? geluTanh(x) : kind === 'silu' ? silu(x) : x;
}

/** y[m, n] = f(x[m] . w[n] + bias[n]), and per element the magnitude sum |x||w| + |bias| (the f32 error scale). */
export function gemmRef(x: Float32Array, w: Float32Array, bias: Float32Array | undefined, m: number, n: number, k: number, kind: 'none' | 'gelu_tanh' | 'silu') {
  const y = new Float64Array(m * n);
  const mag = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let acc = bias ? bias[j] : 0;
      let abs = bias ? Math.abs(bias[j]) : 0;
      for (let p = 0; p < k; p++) {
        acc += x[i * k + p] * w[j * k + p];
        abs += Math.abs(x[i * k + p] * w[j * k + p]);
      }
      y[i * n + j] = epilogue(kind, acc);
      mag[i * n + j] = abs;
    }
  }
  return { y, mag };
}

/** LayerNorm of each C-row, then modulate (scale/shift rows per image b = row / tokens) or affine. */
export function layerNormRef(
  x: Float32Array, rows: number, tokens: number, C: number, eps: number,
  mod?: { scale: (b: number, c: number) => number; shift: (b: number, c: number) => number },
  affine?: { weight: Float32Array; bias: Float32Array },
): Float64Array {
  const y = new Float64Array(rows * C);
  for (let r = 0; r < rows; r++) {
    let mean = 0;
    for (let c = 0; c < C; c++) mean += x[r * C + c];
    mean /= C;
    let v = 0;
    for (let c = 0; c < C; c++) v += (x[r * C + c] - mean) ** 2;
    const rstd = 1 / Math.sqrt(v / C + eps);
    const b = Math.floor(r / tokens);
    for (let c = 0; c < C; c++) {
      let o = (x[r * C + c] - mean) * rstd;
      if (mod) o = o * (1 + mod.scale(b, c)) + mod.shift(b, c);
      if (affine) o = o * affine.weight[c] + affine.bias[c];
      y[r * C + c] = o;
    }
  }
  return y;
}

/** inv_freq as torch computes it in f32: 1 / 10000^(f32(2i) / f32(c/2)). */
export function invFreq(c: number): Float64Array {
  const f = Math.fround;
  const out = new Float64Array(c / 4);
  for (let i = 0; i < c / 4; i++) out[i] = f(1 / f(Math.pow(10000, f(f(2 * i) / f(c / 2)))));
  return out;
}

/** Rotates adjacent pairs of a c-vector by the 2-D RoPE of position (y, x) (first c/4 pairs: y, then x). */
export function ropeRef(v: Float64Array, y: number, x: number): Float64Array {
  const c = v.length;
  const inv = invFreq(c);
  const out = new Float64Array(c);
  for (let p = 0; p < c / 2; p++) {
    const theta = Math.fround((p < c / 4 ? y : x) * inv[p % (c / 4)]);
    const cs = Math.cos(theta), sn = Math.sin(theta);
    out[2 * p] = v[2 * p] * cs - v[2 * p + 1] * sn;
    out[2 * p + 1] = v[2 * p + 1] * cs + v[2 * p] * sn;
  }
  return out;
}

/** Varlen cross-attention, q/out [B, L, H, c], k/v [N, H, c]. */
export function crossAttentionRef(q: Float32Array, k: Float32Array, v: Float32Array, cu: Int32Array, B: number, L: number, H: number, c: number, scale: number): Float64Array {
  const out = new Float64Array(B * L * H * c);
  for (let b = 0; b < B; b++) {
    for (let l = 0; l < L; l++) {
      for (let h = 0; h < H; h++) {
        const qo = ((b * L + l) * H + h) * c;
        const s: number[] = [];
        for (let j = cu[b]; j < cu[b + 1]; j++) {
          let acc = 0;
          for (let d = 0; d < c; d++) acc += q[qo + d] * k[(j * H + h) * c + d];
          s.push(acc * scale);
        }
        if (!s.length) continue;
        const m = Math.max(...s);
        const e = s.map((x) => Math.exp(x - m));
        const sum = e.reduce((a, b2) => a + b2, 0);
        for (let d = 0; d < c; d++) {
          let acc = 0;
          for (let j = 0; j < e.length; j++) acc += e[j] * v[((cu[b] + j) * H + h) * c + d];
          out[qo + d] = acc / sum;
        }
      }
    }
  }
  return out;
}

// ---- Philox4x32-10 (Random123), the sampler's counter-based RNG.

function mulhilo(a: number, b: number): [number, number] {
  const p = BigInt(a) * BigInt(b);
  return [Number(p >> 32n) >>> 0, Number(p & 0xffffffffn) >>> 0];
}

export function philox4x32(key: [number, number], ctr: [number, number, number, number]): [number, number, number, number] {
  let [k0, k1] = key;
  let c = [...ctr] as [number, number, number, number];
  for (let r = 0; r < 10; r++) {
    const [hi0, lo0] = mulhilo(0xd2511f53, c[0]);
    const [hi1, lo1] = mulhilo(0xcd9e8d57, c[2]);
    c = [(hi1 ^ c[1] ^ k0) >>> 0, lo1, (hi0 ^ c[3] ^ k1) >>> 0, lo0];
    k0 = (k0 + 0x9e3779b9) >>> 0;
    k1 = (k1 + 0xbb67ae85) >>> 0;
  }
  return c;
}

/** The uniform of pair t of image b at a scale: top 24 bits of Philox word 0 of counter (t, 0, b, scale), key = seed. */
export function philoxUniform(seed: number, b: number, scale: number, t: number): number {
  const key: [number, number] = [seed >>> 0, Math.floor(seed / 2 ** 32) >>> 0];
  return (philox4x32(key, [t >>> 0, Math.floor(t / 2 ** 32) >>> 0, b, scale])[0] >>> 8) / 2 ** 24;
}

/**
 * The official top-k / top-p mask of one row (in place), with f32 softmax and running sum as torch, ties in
 * the ascending sort broken by index.
 */
export function maskRowRef(x: Float32Array, topK: number, topP: number): void {
  const V = x.length;
  const f = Math.fround;
  if (topK > 0) {
    const kth = [...x].sort((a, b) => b - a)[Math.min(topK, V) - 1];
    for (let i = 0; i < V; i++) if (x[i] < kth) x[i] = -Infinity;
  }
  if (topP > 0) {
    const order = [...x.keys()].sort((i, j) => x[i] - x[j] || i - j);
    const mx = x[order[V - 1]];
    let sum = 0;
    for (const i of order) sum = f(sum + f(Math.exp(f(x[i] - mx))));
    const limit = f(1 - topP);
    let cum = 0;
    for (let r = 0; r < V - 1; r++) {
      cum = f(cum + f(f(Math.exp(f(x[order[r]] - mx))) / sum));
      if (cum <= limit) x[order[r]] = -Infinity;
    }
  }
}
