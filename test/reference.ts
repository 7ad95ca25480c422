// Plain float64 references of the three ops, written for clarity, not speed.

export interface AttentionProblem {
  rows: number;
  heads: number;
  lq: number;
  d: number;
  cap: number;
  len: number;
  lc: number;
  gather?: Int32Array; // [rows, heads, g]
  q: Float32Array;
  hk: Float32Array;
  hv: Float32Array;
  ck: Float32Array;
  cv: Float32Array;
  scale: number;
}

export function keysOf(p: AttentionProblem, rh: number): { k: Float32Array[]; v: Float32Array[] } {
  const { d, cap, lc } = p;
  const k: Float32Array[] = [];
  const v: Float32Array[] = [];
  const nHist = p.gather ? p.gather.length / (p.rows * p.heads) : p.len;
  for (let j = 0; j < nHist; j++) {
    const src = p.gather ? p.gather[rh * nHist + j] : j;
    k.push(p.hk.subarray((rh * cap + src) * d, (rh * cap + src + 1) * d));
    v.push(p.hv.subarray((rh * cap + src) * d, (rh * cap + src + 1) * d));
  }
  for (let j = 0; j < lc; j++) {
    k.push(p.ck.subarray((rh * lc + j) * d, (rh * lc + j + 1) * d));
    v.push(p.cv.subarray((rh * lc + j) * d, (rh * lc + j + 1) * d));
  }
  return { k, v };
}

/**
 * out (f64) and, optionally, the output a bf16 pipeline would produce (probabilities and output rounded to
 * bf16, as torch's bf16 math path does), whose error sets the bf16 tolerance.
 */
export function attentionRef(p: AttentionProblem, roundBf16?: (x: number) => number): { out: Float64Array; outBf16?: Float64Array } {
  const { rows, heads, lq, d } = p;
  const out = new Float64Array(rows * heads * lq * d);
  const outBf16 = roundBf16 ? new Float64Array(out.length) : undefined;
  for (let rh = 0; rh < rows * heads; rh++) {
    const { k, v } = keysOf(p, rh);
    for (let i = 0; i < lq; i++) {
      const q = p.q.subarray((rh * lq + i) * d, (rh * lq + i + 1) * d);
      const s = k.map((kj) => {
        let acc = 0;
        for (let x = 0; x < d; x++) acc += q[x] * kj[x];
        return acc * p.scale;
      });
      const m = Math.max(...s);
      const e = s.map((x) => Math.exp(x - m));
      const l = e.reduce((a, b) => a + b, 0);
      for (let x = 0; x < d; x++) {
        let acc = 0;
        let acc16 = 0;
        for (let j = 0; j < k.length; j++) {
          acc += (e[j] / l) * v[j][x];
          if (roundBf16) acc16 += roundBf16(e[j] / l) * v[j][x];
        }
        out[(rh * lq + i) * d + x] = acc;
        if (outBf16 && roundBf16) outBf16[(rh * lq + i) * d + x] = roundBf16(acc16);
      }
    }
  }
  return { out, outBf16 };
}

/**
 * The window output in float64, and the same quantities computed in f32 arithmetic (every product, sum, exp
 * and log rounded to f32, keys summed in order): the error of that f32 pipeline sets the kernels' tolerance.
 */
export function windowRef(p: AttentionProblem, rowsIdx: Int32Array): { logits: Float64Array; lse: Float64Array; logitsF32: Float32Array; lseF32: Float32Array } {
  const { rows, heads, lq, d } = p;
  const f = Math.fround;
  const nKeys = (p.gather ? p.gather.length / (rows * heads) : p.len) + p.lc;
  const logits = new Float64Array(rows * heads * rowsIdx.length * nKeys);
  const logitsF32 = new Float32Array(logits.length);
  const lse = new Float64Array(rows * heads * rowsIdx.length);
  const lseF32 = new Float32Array(lse.length);
  for (let rh = 0; rh < rows * heads; rh++) {
    const { k } = keysOf(p, rh);
    rowsIdx.forEach((r, w) => {
      const q = p.q.subarray((rh * lq + r) * d, (rh * lq + r + 1) * d);
      const base = (rh * rowsIdx.length + w) * nKeys;
      k.forEach((kj, j) => {
        let acc = 0;
        let acc32 = 0;
        for (let x = 0; x < d; x++) {
          acc += q[x] * kj[x];
          acc32 = f(acc32 + f(q[x] * kj[x]));
        }
        logits[base + j] = acc * p.scale;
        logitsF32[base + j] = f(acc32 * p.scale);
      });
      const row = logits.subarray(base, base + nKeys);
      const row32 = logitsF32.subarray(base, base + nKeys);
      const m = Math.max(...row);
      const m32 = Math.max(...row32);
      let sum = 0;
      let sum32 = 0;
      for (let j = 0; j < nKeys; j++) {
        sum += Math.exp(row[j] - m);
        sum32 = f(sum32 + f(Math.exp(f(row32[j] - m32))));
      }
      lse[rh * rowsIdx.length + w] = m + Math.log(sum);
      lseF32[rh * rowsIdx.length + w] = f(m32 + f(Math.log(sum32)));
    });
  }
  return { logits, lse, logitsF32, lseF32 };
}

export interface SelectionProblem {
  rows: number;
  heads: number;
  nWindow: number;
  nKeys: number;
  logits: Float32Array;
  lse?: Float32Array;
  windowKeys: Int32Array;
  budget: number;
  mode: 'logits' | 'probs';
  pooling: 'none' | 'max' | 'avg';
  kernel: number;
}

/** Scores in float64 and the kept lists with ties to the lowest index. */
export function selectionRef(p: SelectionProblem): { kept: Int32Array; pooled: Float64Array } {
  const { rows, heads, nWindow, nKeys } = p;
  const kept = new Int32Array(rows * heads * p.budget);
  const pooled = new Float64Array(rows * heads * nKeys);
  const isWindow = new Set(p.windowKeys);
  const half = p.kernel >> 1;
  for (let rh = 0; rh < rows * heads; rh++) {
    const s = new Float64Array(nKeys);
    for (let w = 0; w < nWindow; w++)
      for (let j = 0; j < nKeys; j++) {
        const x = p.logits[(rh * nWindow + w) * nKeys + j];
        s[j] += p.mode === 'logits' ? x : Math.exp(x - p.lse![rh * nWindow + w]);
      }
    for (const w of p.windowKeys) s[w] = -Infinity;
    const ps = new Float64Array(nKeys);
    for (let j = 0; j < nKeys; j++) {
      if (p.pooling === 'none' || p.kernel === 1) ps[j] = s[j];
      else if (p.pooling === 'max') {
        let m = -Infinity;
        for (let t = Math.max(0, j - half); t <= Math.min(nKeys - 1, j + half); t++) m = Math.max(m, s[t]);
        ps[j] = m;
      } else {
        let sum = 0;
        for (let t = Math.max(0, j - half); t <= Math.min(nKeys - 1, j + half); t++) sum += s[t];
        ps[j] = sum / p.kernel;
      }
    }
    pooled.set(ps, rh * nKeys);
    const masked = ps.map((x, j) => (isWindow.has(j) ? -Infinity : x));
    const order = Array.from({ length: nKeys }, (_, j) => j).sort((a, b) => (masked[b] - masked[a]) || a - b);
    // -Infinity - -Infinity is NaN: order -inf entries by index explicitly.
    order.sort((a, b) => {
      const x = masked[a];
      const y = masked[b];
      if (x === y) return a - b;
      return y > x ? 1 : -1;
    });
    const top = order.slice(0, p.budget - nWindow);
    const all = [...top, ...Array.from(p.windowKeys)].sort((a, b) => a - b);
    kept.set(all, rh * p.budget);
  }
  return { kept, pooled };
}
