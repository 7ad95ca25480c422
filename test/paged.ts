/**
 * Test helper: a contiguous [rows, heads, cap, d] history scattered into a paged pool [pages, heads, P, d] (the KV
 * arena's layout, kernels/backend.h KvPages) through a random page table per row. Pages are distinct across rows and
 * shuffled; the pool has spare pages; table rows are wider than needed, their spare entries -1; every element the
 * table does not reach holds `poison`, so a kernel that reads past the table or writes outside it is seen.
 */
import type { Rng } from './helpers.js';

type Elements = Float32Array | Uint16Array | Uint32Array;

export interface PageLayout {
  table: Int32Array;
  pages: number;
  tablePages: number;
  pageTokens: number;
}

export interface Dims {
  rows: number;
  heads: number;
  cap: number;
  d: number;
}

/** A random layout for `cap` tokens a row (see the file comment). */
export function randomLayout(rng: Rng, rows: number, cap: number, pageTokens: number): PageLayout {
  const used = Math.ceil(cap / pageTokens);
  const tablePages = used + rng.int(0, 2);
  const pages = rows * used + rng.int(1, 3);
  const order = Array.from({ length: pages }, (_, i) => i);
  for (let i = pages - 1; i > 0; i--) {
    const j = rng.int(0, i);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const table = new Int32Array(rows * tablePages).fill(-1);
  for (let r = 0; r < rows; r++) for (let i = 0; i < used; i++) table[r * tablePages + i] = order[r * used + i];
  return { table, pages, tablePages, pageTokens };
}

/** Row index (in d-long rows) of token t of (row r, head h) in the pool. */
export function pagedRow(p: PageLayout, heads: number, r: number, h: number, t: number): number {
  return (p.table[r * p.tablePages + Math.floor(t / p.pageTokens)] * heads + h) * p.pageTokens + (t % p.pageTokens);
}

/** The pool [pages, heads, P, d] holding `data` ([rows, heads, cap, d]) where the layout says, `poison` elsewhere. */
export function scatter<T extends Elements>(p: PageLayout, data: T, dims: Dims, poison: number): T {
  const { rows, heads, cap, d } = dims;
  const pool = new (data.constructor as new (n: number) => T)(p.pages * heads * p.pageTokens * d);
  pool.fill(poison);
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < heads; h++)
      for (let t = 0; t < cap; t++) pool.set(data.subarray(((r * heads + h) * cap + t) * d, ((r * heads + h) * cap + t + 1) * d), pagedRow(p, heads, r, h, t) * d);
  return pool;
}

/** The contiguous [rows, heads, len, d] view of the first `len` tokens of a pool. */
export function gather<T extends Elements>(p: PageLayout, pool: T, dims: Omit<Dims, 'cap'>, len: number): T {
  const { rows, heads, d } = dims;
  const out = new (pool.constructor as new (n: number) => T)(rows * heads * len * d);
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < heads; h++)
      for (let t = 0; t < len; t++) {
        const src = pagedRow(p, heads, r, h, t) * d;
        out.set(pool.subarray(src, src + d), ((r * heads + h) * len + t) * d);
      }
  return out;
}

/** Index of the first pool element outside the rows the layout gives `cap` tokens that no longer holds `poison`, or -1. */
export function firstOutsideChanged(p: PageLayout, pool: Uint16Array | Uint32Array, dims: Dims, poison: number): number {
  const { rows, heads, cap, d } = dims;
  const reached = new Uint8Array(pool.length);
  for (let r = 0; r < rows; r++)
    for (let h = 0; h < heads; h++)
      for (let t = 0; t < cap; t++) reached.fill(1, pagedRow(p, heads, r, h, t) * d, (pagedRow(p, heads, r, h, t) + 1) * d);
  for (let i = 0; i < pool.length; i++) if (!reached[i] && pool[i] !== poison) return i;
  return -1;
}
