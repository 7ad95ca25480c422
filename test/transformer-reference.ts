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
  x: ArrayLike<number>, rows: number, tokens: number, C: number, eps: number,
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
/** With `starts`, image b reads cu[b + 1] - cu[b] text tokens from starts[b] on. */
export function crossAttentionRef(q: ArrayLike<number>, k: ArrayLike<number>, v: ArrayLike<number>, cu: ArrayLike<number>, B: number, L: number, H: number, c: number, scale: number, starts?: ArrayLike<number>): Float64Array {
  const out = new Float64Array(B * L * H * c);
  for (let b = 0; b < B; b++) {
    const first = starts ? starts[b] : cu[b];
    const n = cu[b + 1] - cu[b];
    for (let l = 0; l < L; l++) {
      for (let h = 0; h < H; h++) {
        const qo = ((b * L + l) * H + h) * c;
        const s: number[] = [];
        for (let j = first; j < first + n; j++) {
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
          for (let j = 0; j < e.length; j++) acc += e[j] * v[((first + j) * H + h) * c + d];
          out[qo + d] = acc / sum;
        }
      }
    }
  }
  return out;
}

// ---- The Infinity block stack and head (spec sec. 5-7), for the bf16 model's tolerance.

/** f32 host arrays of a checkpoint by official key. */
export type WeightLookup = (name: string) => Float32Array;

export interface InfinityRefProblem {
  embedDim: number;
  numHeads: number;
  headDim: number;
  depth: number;
  blocksPerChunk: number;
  ffnHidden: number;
  vocab: number;
  normEps: number;
  /** Token grids (h, w) in scale order. */
  schedule: readonly (readonly [number, number])[];
  /** The RoPE normalisation grid: the final grid of the 1M schedule of the same aspect ratio (spec sec. 6). */
  ropeGrid: readonly [number, number];
  /** Per scale, block 0's input [rows, n, C] after lvl_embed; teacher forcing makes it independent of the blocks. */
  xIn: readonly Float32Array[];
  /** shared_ada_lin(cond) [rows, 6, C], before each block's ada_gss. */
  condGss: Float32Array;
  /** The pooled text [rows, C] (cond_BD). */
  condBD: Float32Array;
  /** text_proj_for_ca output [N, C], rows of each transformer row's prompt at cuSeqlens[r]..cuSeqlens[r + 1]. */
  textKv: Float32Array;
  cuSeqlens: readonly number[];
  cfg: readonly number[];
  tau: readonly number[];
  /** Images B: rows 0..B-1 conditional, B..2B-1 unconditional. */
  batch: number;
}

/** torch.round: half to even. */
function roundHalfEven(x: number): number {
  const f = Math.floor(x);
  const d = x - f;
  return d > 0.5 ? f + 1 : d < 0.5 ? f : f % 2 === 0 ? f : f + 1;
}

/** y [m, n] = x [m, k] . w[n, k] + bias, in float64. */
function linearRef(x: ArrayLike<number>, w: ArrayLike<number>, bias: ArrayLike<number> | undefined, m: number, n: number, k: number): Float64Array {
  // One element type in the inner loop keeps it fast.
  const [xs, ws] = [Float64Array.from(x), Float64Array.from(w)];
  const y = new Float64Array(m * n);
  for (let i = 0; i < m; i++)
    for (let j = 0; j < n; j++) {
      let acc = bias ? bias[j] : 0;
      for (let p = 0; p < k; p++) acc += xs[i * k + p] * ws[j * k + p];
      y[i * n + j] = acc;
    }
  return y;
}

/**
 * Per scale the logits [B, n, 2d] after tau and CFG, of the block stack and head in float64. With `bf16`, values
 * are rounded where the engine's bf16 model holds them in bf16: the block Linear weights and their inputs (the
 * gemm rounds an f32 input against bf16 weights, as autocast does), the qkv projection,
 * q / k / v after normalisation and RoPE (so the KV cache), and in attention the probabilities and the output
 * (as the tensor-core kernel rounds them). Everything else (residual stream, norms, AdaLN, cross-attention,
 * the head) stays exact, as the engine keeps it in f32.
 */
export function infinityLogitsRef(weight: WeightLookup, p: InfinityRefProblem, bf16?: (x: number) => number): Float64Array[] {
  const { embedDim: C, numHeads: H, headDim: hd, normEps: eps, vocab: V, batch: B } = p;
  const round = bf16 ?? ((x: number) => x);
  const blockWeight = (name: string) => (bf16 ? weight(name).map(bf16) : weight(name));
  // A block Linear: with bf16 weights its f32 input is rounded to bf16 first, as the engine's gemm does (autocast).
  const blockLinear = (x: ArrayLike<number>, w: ArrayLike<number>, bias: ArrayLike<number> | undefined, m: number, n: number, k: number) =>
    linearRef(bf16 ? Float64Array.from(x, round) : x, w, bias, m, n, k);
  const rows = p.xIn[0].length / C;
  const nText = p.textKv.length / C;
  const [uh, uw] = p.ropeGrid;
  // Per layer and (row, head): the cached keys and values of every scale so far.
  const cacheK = Array.from({ length: p.depth }, () => Array.from({ length: rows * H }, () => [] as Float64Array[]));
  const cacheV = Array.from({ length: p.depth }, () => Array.from({ length: rows * H }, () => [] as Float64Array[]));
  const blocks = Array.from({ length: p.depth }, (_, l) => {
    const pre = `block_chunks.${Math.floor(l / p.blocksPerChunk)}.module.${l % p.blocksPerChunk}.`;
    const gss = weight(`${pre}ada_gss`);
    const caKvBias = new Float64Array(2 * C);
    caKvBias.set(weight(`${pre}ca.v_bias`), C);
    const textKv = blockLinear(p.textKv, blockWeight(`${pre}ca.mat_kv.weight`), caKvBias, nText, 2 * C, C);
    return {
      pre, qkvW: blockWeight(`${pre}sa.mat_qkv.weight`), projW: blockWeight(`${pre}sa.proj.weight`),
      caQW: blockWeight(`${pre}ca.mat_q.weight`), caProjW: blockWeight(`${pre}ca.proj.weight`),
      fc1W: blockWeight(`${pre}ffn.fc1.weight`), fc2W: blockWeight(`${pre}ffn.fc2.weight`),
      ada: (r: number, slot: number, c: number) => p.condGss[(r * 6 + slot) * C + c] + gss[slot * C + c],
      textK: Float64Array.from({ length: nText * C }, (_, i) => textKv[Math.floor(i / C) * 2 * C + (i % C)]),
      textV: Float64Array.from({ length: nText * C }, (_, i) => textKv[Math.floor(i / C) * 2 * C + C + (i % C)]),
    };
  });
  const silu = Array.from(p.condBD, (v) => v / (1 + Math.exp(-v)));
  const headAda = linearRef(silu, weight('head_nm.ada_lin.1.weight'), weight('head_nm.ada_lin.1.bias'), rows, 2 * C, C);
  const out: Float64Array[] = [];
  p.schedule.forEach(([gh, gw], si) => {
    const n = gh * gw;
    const pos = Array.from({ length: n }, (_, t) => [
      roundHalfEven(Math.fround(Math.floor(t / gw) * Math.fround(uh / gh))),
      roundHalfEven(Math.fround((t % gw) * Math.fround(uw / gw))),
    ]);
    const x = Float64Array.from(p.xIn[si]);
    const addInto = (y: ArrayLike<number>, gateSlot: number | undefined, blk: (typeof blocks)[number]) => {
      for (let i = 0; i < x.length; i++) {
        const r = Math.floor(i / (n * C));
        x[i] += (gateSlot === undefined ? 1 : blk.ada(r, gateSlot, i % C)) * y[i];
      }
    };
    blocks.forEach((blk, l) => {
      const w = (name: string) => weight(blk.pre + name);
      const modulated = (scaleSlot: number, shiftSlot: number) =>
        layerNormRef(x, rows * n, n, C, eps, { scale: (r, c) => blk.ada(r, scaleSlot, c), shift: (r, c) => blk.ada(r, shiftSlot, c) });
      // Self-attention over [cache ‖ this scale], cosine attention with 2-D RoPE, no mask.
      const qkv = blockLinear(modulated(2, 4), blk.qkvW, undefined, rows * n, 3 * C, C).map(round);
      const [qBias, vBias, scaleMul] = [w('sa.q_bias'), w('sa.v_bias'), w('sa.scale_mul_1H11')];
      const queries: Float64Array[] = [];
      for (let r = 0; r < rows; r++)
        for (let h = 0; h < H; h++)
          for (let t = 0; t < n; t++) {
            const at = (part: number, bias?: Float32Array) => Float64Array.from({ length: hd }, (_, c) => qkv[(r * n + t) * 3 * C + part * C + h * hd + c] + (bias ? bias[h * hd + c] : 0));
            const unit = (v: Float64Array, mul: number) => {
              const norm = Math.max(Math.hypot(...v), 1e-12);
              return v.map((e) => (e / norm) * mul);
            };
            const [y, xx] = pos[t];
            queries[(r * H + h) * n + t] = ropeRef(unit(at(0, qBias), Math.exp(Math.min(scaleMul[h], Math.log(100)))), y, xx).map(round);
            cacheK[l][r * H + h].push(ropeRef(unit(at(1), 1), y, xx).map(round));
            cacheV[l][r * H + h].push(at(2, vBias).map(round));
          }
      const o = new Float64Array(rows * n * C);
      for (let r = 0; r < rows; r++)
        for (let h = 0; h < H; h++) {
          const [ks, vs] = [cacheK[l][r * H + h], cacheV[l][r * H + h]];
          for (let t = 0; t < n; t++) {
            const q = queries[(r * H + h) * n + t];
            const e = new Float64Array(ks.length);
            let m = -Infinity;
            for (let j = 0; j < ks.length; j++) {
              let acc = 0;
              for (let c = 0; c < hd; c++) acc += ks[j][c] * q[c];
              e[j] = acc;
              m = Math.max(m, acc);
            }
            let sum = 0;
            for (let j = 0; j < e.length; j++) sum += e[j] = Math.exp(e[j] - m);
            const acc = new Float64Array(hd);
            for (let j = 0; j < e.length; j++) {
              const pj = round(e[j] / sum);
              for (let c = 0; c < hd; c++) acc[c] += pj * vs[j][c];
            }
            for (let c = 0; c < hd; c++) o[(r * n + t) * C + h * hd + c] = round(acc[c]);
          }
        }
      addInto(blockLinear(o, blk.projW, w('sa.proj.bias'), rows * n, C, C), 0, blk);
      // Cross-attention on the text (no gate).
      const hn = layerNormRef(x, rows * n, n, C, eps, undefined, { weight: w('ca_norm.weight'), bias: w('ca_norm.bias') });
      const cq = blockLinear(hn, blk.caQW, w('ca.mat_q.bias'), rows * n, C, C);
      const co = crossAttentionRef(cq, blk.textK, blk.textV, p.cuSeqlens, rows, n, H, hd, 1 / Math.sqrt(hd));
      addInto(blockLinear(co, blk.caProjW, w('ca.proj.bias'), rows * n, C, C), undefined, blk);
      // FFN.
      const f1 = blockLinear(modulated(3, 5), blk.fc1W, w('ffn.fc1.bias'), rows * n, p.ffnHidden, C).map(geluTanh);
      addInto(blockLinear(f1, blk.fc2W, w('ffn.fc2.bias'), rows * n, C, p.ffnHidden), 1, blk);
    });
    const hs = layerNormRef(x, rows * n, n, C, eps, { scale: (r, c) => headAda[r * 2 * C + c], shift: (r, c) => headAda[r * 2 * C + C + c] });
    const z = linearRef(hs, weight('head.weight'), weight('head.bias'), rows * n, V, C).map((v) => v / p.tau[si]);
    const cfg = p.cfg[si];
    const logits = new Float64Array(B * n * V);
    for (let i = 0; i < logits.length; i++) logits[i] = cfg === 1 ? z[i] : cfg * z[i] + (1 - cfg) * z[B * n * V + i];
    out.push(logits);
  });
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
