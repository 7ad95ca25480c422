import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import type { ExecutionContext } from 'ava';
import { backendInfo, BackendName, createEngine, Engine } from '../lib/engine.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../lib/dtype.js';
import type { TextFeatures } from '../lib/model/infinity.js';

/** Backends to exercise here: cpu always, emu when built, cuda when a device is usable. */
export function testBackends(): BackendName[] {
  const info = backendInfo();
  const list: BackendName[] = ['cpu'];
  if (info.built.includes('emu')) list.push('emu');
  if (info.built.includes('cuda') && info.cuda.available) list.push('cuda');
  const only = process.env.SCALEKV_TEST_BACKENDS?.split(',');
  if (!only) return list;
  // A suite asked for by name must run: a missing backend is a failure, not an empty run.
  for (const b of only)
    if (!list.includes(b as BackendName))
      throw new Error(`SCALEKV_TEST_BACKENDS asks for '${b}', which is not usable here (built: ${info.built.join(', ')}; cuda: ${info.cuda.reason || 'ok'})`);
  return list.filter((b) => only.includes(b));
}

export async function withEngine<T>(backend: BackendName, fn: (e: Engine) => Promise<T>): Promise<T> {
  const engine = await createEngine({ backend, threads: 2 });
  try {
    return await fn(engine);
  } finally {
    engine.dispose();
  }
}

/** A fresh seed per run (SCALEKV_SEED pins it), logged by ava when a test fails. */
export function seedFor(t: ExecutionContext): number {
  const seed = process.env.SCALEKV_SEED ? Number(process.env.SCALEKV_SEED) : (Math.random() * 2 ** 31) >>> 0;
  t.log(`seed ${seed} (rerun with SCALEKV_SEED=${seed})`);
  return seed;
}

/** mulberry32: small, fast, good enough for test data. */
export class Rng {
  #s: number;
  constructor(seed: number) {
    this.#s = seed >>> 0 || 1;
  }
  next(): number {
    this.#s = (this.#s + 0x6d2b79f5) >>> 0;
    let t = this.#s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)];
  }
  normal(): number {
    const u = Math.max(this.next(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.next());
  }
  normals(n: number, scale = 1): Float32Array {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = this.normal() * scale;
    return a;
  }
}

export function bf16Round(a: Float32Array): Float32Array {
  return a.map((x) => bf16BitsToF32(f32ToBf16Bits(x)));
}

export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (Number.isNaN(d)) return Infinity;
    m = Math.max(m, d);
  }
  return m;
}

/** ../shared/golden or $SCALEKV_GOLDEN; undefined (the caller skips with a notice) where neither exists. */
export function goldenDir(name?: string): string | undefined {
  const candidates = [process.env.SCALEKV_GOLDEN, resolve('..', 'shared', 'golden')].filter(Boolean) as string[];
  for (const c of candidates) if (existsSync(join(c, 'index.json')) || existsSync(join(c, name ?? '', 'manifest.json'))) return name ? join(c, name) : c;
  return undefined;
}

/**
 * Stand-in T5 features for tests of the sampling loop that need no text encoder: one row per word plus an end
 * row, each mostly its word's vector plus a little of its position, deterministic in the prompt. (The tiny model's
 * real text path is its T5: see test/tiny.test.ts and test/pipeline.test.ts.)
 */
export function syntheticText(prompt = 'a tiny random model', channels = 128): TextFeatures & { shape: [number, number] } {
  const words = prompt.trim().toLowerCase().split(/\s+/).filter(Boolean);
  const tokens = [...words, '</s>'];
  const kv = new Float32Array(tokens.length * channels);
  const hash = (s: string) => [...s].reduce((h, ch) => Math.imul(h ^ ch.charCodeAt(0), 0x01000193) >>> 0, 0x811c9dc5);
  tokens.forEach((w, t) => {
    const word = new Rng(hash(`w/${w}`)).normals(channels, 0.25 * 0.9);
    const pos = new Rng(hash(`p/${t}`)).normals(channels, 0.25 * 0.3);
    for (let i = 0; i < channels; i++) kv[t * channels + i] = word[i] + pos[i];
  });
  return { kv, shape: [tokens.length, channels], lens: [tokens.length] };
}
