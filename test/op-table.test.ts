// The op table (csrc/op_table.cc) checked from its own declarations: every op runs its declared example, and
// for every operand a wrong rank, a wrong dtype and each constrained wrong dimension, every attribute out of
// its kind or range, and every required operand left out is rejected with the coded error naming it — with
// nothing enqueued and no memory taken. The TS argument types must be what the table renders to.
import test, { type ExecutionContext } from 'ava';
import { readFileSync } from 'node:fs';
import type { DType } from '../lib/dtype.js';
import type { Engine, Tensor } from '../lib/engine.js';
import { loadNative, type NativeTensor, type OpDeclaration } from '../lib/native.js';
import { Ops } from '../lib/ops.js';
import { GENERATED_PATH, renderOpTypes } from '../scripts/gen-op-types.mjs';
import { Rng, seedFor, testBackends, withEngine } from './helpers.js';

type Operand = OpDeclaration['operands'][number];
interface Dim {
  run?: string;
  coef: number;
  syms: string[];
  addend: number;
}
interface Example {
  present: string[];
  /** Operands written `name:dtype` in the example take that dtype instead of their declaration's first. */
  dtypes: Map<string, DType>;
  symbols: Map<string, number[]>;
  attrs: Record<string, unknown>;
}

const table = loadNative().opTable();

function parseShape(spec: string): Dim[][] {
  return spec.split('|').map((alt) => {
    const body = alt.trim().slice(1, -1).trim();
    if (!body) return [];
    return body.split(',').map((text): Dim => {
      const t = text.trim();
      if (t.startsWith('...')) return { run: t.slice(3), coef: 1, syms: [], addend: 0 };
      const [product, addend] = t.split('+');
      const d: Dim = { coef: 1, syms: [], addend: addend ? Number(addend) : 0 };
      for (const term of product.split('*').map((x) => x.trim()))
        if (/^\d+$/.test(term)) d.coef *= Number(term);
        else d.syms.push(term);
      return d;
    });
  });
}

function parseExamples(op: OpDeclaration): Example[] {
  return op.examples.split('\n').map((line) => {
    const [ops, syms, attrs] = line.split('|').map((s) => s.trim());
    const symbols = new Map<string, number[]>();
    for (const kv of syms.split(/\s+/).filter(Boolean)) {
      const [k, v] = kv.split('=');
      symbols.set(k, v.split(',').map(Number));
    }
    const values: Record<string, unknown> = {};
    for (const kv of (attrs ?? '').split(/\s+/).filter(Boolean)) {
      const [k, v] = kv.split('=');
      const decl = op.attributes.find((a) => a.name === k);
      if (!decl) throw new Error(`${op.name}: example names an unknown attribute ${k}`);
      values[k] = decl.kind === 'boolean' ? v === 'true' : decl.kind === 'choice' ? v : decl.kind === 'intList' ? v.split(',').map(Number) : Number(v);
    }
    const named = ops.split(/\s+/).map((o) => o.split(':'));
    return { present: named.map(([n]) => n), dtypes: new Map(named.filter((o) => o[1]).map(([n, d]) => [n, d as DType])), symbols, attrs: values };
  });
}

/** The concrete call an example describes: per present operand its shape, dtype and chosen alternative. */
function resolveExample(op: OpDeclaration, ex: Example) {
  const env = new Map(ex.symbols);
  for (const a of op.attributes) if (a.kind === 'integer' && typeof ex.attrs[a.name] === 'number') env.set(a.name, [ex.attrs[a.name] as number]);
  const value = (d: Dim) => d.coef * d.syms.reduce((p, s) => p * (env.get(s)?.[0] ?? NaN), 1) + d.addend;
  const defined = (alt: Dim[]) => alt.every((d) => (d.run ? env.has(d.run) : d.syms.every((s) => env.has(s))));
  const shapes = new Map<string, { shape: number[]; alt?: Dim[] }>();
  const operands = op.operands.filter((o) => ex.present.includes(o.name));
  for (const o of operands) {
    if (o.shape.startsWith('=')) continue;
    const alts = parseShape(o.shape).filter(defined);
    if (!alts.length) throw new Error(`${op.name}.${o.name}: the example leaves its shape undetermined`);
    const alt = alts.reduce((best, a) => (a.length > best.length ? a : best));
    shapes.set(o.name, { shape: alt.flatMap((d) => (d.run ? env.get(d.run)! : [value(d)])), alt });
  }
  for (const o of operands) if (o.shape.startsWith('=')) shapes.set(o.name, { shape: [...shapes.get(o.shape.slice(1))!.shape] });
  const dtypeOf = (o: Operand): DType => {
    const given = ex.dtypes.get(o.name);
    if (given) return given;
    if (o.dtypes.startsWith('=')) return dtypeOf(op.operands.find((x) => x.name === o.dtypes.slice(1))!);
    return (o.dtypes === 'any' ? 'f32' : o.dtypes.split('|')[0]) as DType;
  };
  return operands.map((o) => ({ decl: o, dtype: dtypeOf(o), ...shapes.get(o.name)! }));
}

function fill(e: Engine, rng: Rng, shape: number[], dtype: DType): Tensor {
  const n = shape.reduce((a, b) => a * b, 1);
  const last = Math.max(1, shape[shape.length - 1] ?? 1);
  // Index operands count along their last axis, so every example's indices are in range and increasing.
  if (dtype === 'i32') return e.tensor(Int32Array.from({ length: n }, (_, i) => i % last), shape, 'i32');
  if (dtype === 'u8') return e.tensor(Uint8Array.from({ length: n }, (_, i) => i % last), shape, 'u8');
  return e.tensor(rng.normals(n), shape, dtype);
}

const mentions = (message: string, name: string) => new RegExp(`(^|[^A-Za-z0-9_])${name}([^A-Za-z0-9_]|$)`).test(message);

/** The call must throw `code` naming `name`, and leave the counters as they were. */
function rejects(t: ExecutionContext, e: Engine, call: () => void, code: string, name: string, what: string): void {
  const memory = e.memory();
  const enqueued = e.enqueued;
  const err = t.throws(call, undefined, what) as (Error & { code?: string }) | undefined;
  if (!err) return;
  t.is(err.code, code, `${what}: ${err.message}`);
  t.true(mentions(err.message, name), `${what}: the message names ${name}: ${err.message}`);
  t.is(e.enqueued, enqueued, `${what}: nothing enqueued`);
  t.deepEqual(e.memory(), memory, `${what}: no memory taken`);
}

function allowedRanks(spec: string): (rank: number) => boolean {
  const alts = parseShape(spec);
  return (r) => alts.some((a) => (a.some((d) => d.run) ? r >= a.length - 1 : r === a.length));
}

const ALL_DTYPES: DType[] = ['f32', 'bf16', 'i32', 'u8'];

test('every op of the table has an example, a method on Ops, and a kernel name', (t) => {
  t.true(table.length >= 22);
  for (const op of table) {
    t.truthy(op.examples, `${op.name} has an example`);
    t.is(typeof (Ops.prototype as unknown as Record<string, unknown>)[op.name], 'function', `Ops.${op.name} exists`);
    t.regex(op.kernel, /^[a-z0-9_]+$/);
  }
});

test('lib/native-ops.generated.ts is what the op table renders to (npm run gen:op-types)', (t) => {
  t.is(readFileSync(GENERATED_PATH, 'utf8'), renderOpTypes(table));
});

for (const backend of testBackends()) {
  for (const op of table) {
    test(`${backend} ${op.name}: the example runs; wrong ranks, dtypes, dims and attributes are rejected naming the operand`, async (t) => {
      const rng = new Rng(seedFor(t));
      await withEngine(backend, async (e) => {
        const call = (args: Record<string, unknown>) => (e.native as unknown as Record<string, (a: unknown) => void>)[op.name](args);
        let checked = 0;
        for (const ex of parseExamples(op)) {
          const operands = resolveExample(op, ex);
          const tensors = new Map(operands.map((o) => [o.decl.name, fill(e, rng, o.shape, o.dtype)]));
          const args = (replace?: [string, NativeTensor | undefined]) => {
            const a: Record<string, unknown> = { ...ex.attrs };
            for (const [name, tensor] of tensors) a[name] = tensor.native;
            if (replace) a[replace[0]] = replace[1];
            return a;
          };
          const before = e.enqueued;
          t.notThrows(() => call(args()), `${op.name}: the example ${ex.present.join(' ')} is valid`);
          t.is(e.enqueued, before + 1, 'a valid call enqueues one op');
          await e.sync();

          const symbolUses = new Map<string, number>();
          for (const o of operands)
            for (const d of o.alt ?? []) for (const s of d.run ? [d.run] : d.syms) symbolUses.set(s, (symbolUses.get(s) ?? 0) + 1);
          const attrSymbol = (s: string) => op.attributes.some((a) => a.name === s && a.kind === 'integer');
          const referenced = (name: string) => operands.some((o) => o.decl.shape === `=${name}`);
          const dtypeReferenced = (name: string) => operands.some((o) => o.decl.dtypes === `=${name}`);

          for (const o of operands) {
            const name = o.decl.name;
            const withTensor = (shape: number[], dtype: DType, what: string, code: string) => {
              const bad = e.empty(shape, dtype);
              try {
                rejects(t, e, () => call(args([name, bad.native])), code, name, `${op.name}.${name} ${what}`);
              } finally {
                bad.dispose();
              }
              checked++;
            };
            // Rank.
            const rankOk = o.decl.shape.startsWith('=') ? (r: number) => r === o.shape.length : allowedRanks(o.decl.shape);
            const runShared = (o.alt ?? []).some((d) => d.run && (symbolUses.get(d.run) ?? 0) > 1);
            const wrongRank = [o.shape.length + 1, o.shape.length - 1, o.shape.length + 2].find((r) => r >= 0 && !rankOk(r));
            if (wrongRank !== undefined || runShared || referenced(name)) {
              const r = wrongRank ?? o.shape.length + 1;
              const shape = r > o.shape.length ? [...o.shape, ...Array(r - o.shape.length).fill(2)] : o.shape.slice(0, r);
              withTensor(shape, o.dtype, `rank ${r}`, 'ERR_SHAPE');
            }
            // Dtype.
            let wrongDtype: DType | undefined;
            if (o.decl.dtypes.startsWith('=')) wrongDtype = ALL_DTYPES.find((d) => d !== o.dtype);
            else if (o.decl.dtypes !== 'any') wrongDtype = ALL_DTYPES.find((d) => !o.decl.dtypes.split('|').includes(d));
            else if (dtypeReferenced(name)) wrongDtype = ALL_DTYPES.find((d) => d !== o.dtype);
            if (wrongDtype) withTensor(o.shape, wrongDtype, `dtype ${wrongDtype}`, 'ERR_DTYPE');
            // Each dimension the table constrains.
            let axis = 0;
            const runLength = o.alt ? o.shape.length - (o.alt.length - 1) : 0;
            for (const d of o.alt ?? o.shape.map(() => undefined)) {
              const span = d?.run ? runLength : 1;
              const constrained =
                !d || referenced(name) ||
                (d.run ? (symbolUses.get(d.run) ?? 0) > 1 : d.syms.length === 0 || d.coef !== 1 || d.syms.some((s) => (symbolUses.get(s) ?? 0) > 1 || attrSymbol(s)));
              for (let k = 0; k < span; k++, axis++) {
                if (!constrained) continue;
                const shape = [...o.shape];
                shape[axis] += 1;
                withTensor(shape, o.dtype, `dim ${axis} = ${shape[axis]}`, 'ERR_SHAPE');
              }
            }
            // Left out.
            if (!o.decl.optional) {
              rejects(t, e, () => call(args([name, undefined])), 'ERR_INVALID_ARG', name, `${op.name} without ${name}`);
              checked++;
            }
          }
          for (const a of op.attributes) {
            const wrong: unknown[] = [a.kind === 'boolean' ? 1 : 'x', { value: 1 }];
            if (a.kind === 'integer') wrong.push(0.5, (a.max ?? 0) + 1, (a.min ?? 0) - 1);
            if (a.kind === 'number') wrong.push(Number.NaN, Number.POSITIVE_INFINITY);
            if (a.kind === 'choice') wrong.push('none_of_these');
            if (a.kind === 'intList') wrong.push([1, 2], Array(a.length).fill(-1));
            if (a.required) wrong.push(undefined);
            for (const v of wrong) {
              if (typeof v === 'number' && Number.isFinite(v) && Math.abs(v) > 2 ** 53) continue;
              rejects(t, e, () => call({ ...args(), [a.name]: v }), 'ERR_INVALID_ARG', a.name, `${op.name}.${a.name} = ${String(v)}`);
              checked++;
            }
          }
          for (const tensor of tensors.values()) tensor.dispose();
        }
        t.log(`${checked} rejected calls`);
      });
    });
  }
}

for (const backend of testBackends()) {
  test(`${backend}: an operand that is not a live tensor of this engine is rejected before anything is enqueued`, async (t) => {
    await withEngine(backend, async (e) => {
      await withEngine(backend, async (other) => {
        const rng = new Rng(seedFor(t));
        const [a, b, out] = [0, 1, 2].map(() => e.tensor(rng.normals(6), [2, 3], 'f32'));
        const foreign = other.tensor(rng.normals(6), [2, 3], 'f32');
        const gone = e.tensor(rng.normals(6), [2, 3], 'f32');
        gone.dispose();
        const add = (x: unknown) => (e.native as unknown as { add(args: object): void }).add({ a: a.native, b: x, out: out.native });
        rejects(t, e, () => add({ shape: [2, 3], dtype: 'f32' }), 'ERR_INVALID_ARG', 'b', 'a look-alike object');
        rejects(t, e, () => add(foreign.native), 'ERR_INVALID_ARG', 'b', "another engine's tensor");
        rejects(t, e, () => add(gone.native), 'ERR_DISPOSED', 'b', 'a disposed tensor');
        rejects(t, e, () => add(7), 'ERR_INVALID_ARG', 'b', 'a number');
        t.throws(() => (e.native as unknown as { add(args: unknown): void }).add(undefined), { code: 'ERR_INVALID_ARG' });
        for (const x of [a, b, out, foreign]) x.dispose();
      });
    });
  });
}

for (const backend of testBackends()) {
  test(`${backend}: arguments read through getters that call ops or dispose tensors cannot confuse a call`, async (t) => {
    await withEngine(backend, async (e) => {
      const rng = new Rng(seedFor(t));
      const native = e.native as unknown as Record<string, (args: object) => void>;
      const [a, b, x] = [0, 1, 2].map(() => e.tensor(rng.normals(6), [2, 3], 'f32'));
      const [out, y] = [0, 1].map(() => e.empty([2, 3], 'f32', { fillByte: 0xff }));
      const [av, bv, xv] = (await Promise.all([a.read(), b.read(), x.read()])) as Float32Array[];
      // A nested op while the outer call reads its arguments: each keeps its own operands.
      native.add({
        a: a.native,
        get b() {
          native.add({ a: x.native, b: x.native, out: y.native });
          return b.native;
        },
        out: out.native,
      });
      t.deepEqual(await out.read(), Float32Array.from(av, (v, i) => Math.fround(v + bv[i])), 'out = a + b');
      t.deepEqual(await y.read(), Float32Array.from(xv, (v) => Math.fround(v + v)), 'y = x + x');
      // Nested calls of ops with other attribute counts, one rejected, around a long attribute string.
      const w = e.tensor(rng.normals(9), [3, 3], 'f32');
      const square = e.tensor(rng.normals(9), [3, 3], 'f32');
      const z = e.empty([3, 3], 'f32');
      t.throws(() => native.gemm({ x: square.native, w: w.native, y: z.native, epilogue: 'x'.repeat(100) }), { code: 'ERR_INVALID_ARG' });
      t.throws(
        () =>
          native.gemm({
            x: square.native,
            w: w.native,
            get y() {
              native.add({ a: a.native, b: b.native, out: out.native });
              return z.native;
            },
            epilogue: 'y'.repeat(200),
          }),
        { code: 'ERR_INVALID_ARG', message: /epilogue/ },
      );
      // An operand disposed by a later argument's getter is a disposed tensor, not freed memory.
      const gone = e.tensor(rng.normals(6), [2, 3], 'f32');
      const before = e.enqueued;
      t.throws(
        () =>
          native.activation({
            x: gone.native,
            out: out.native,
            get fn() {
              gone.dispose();
              return 'silu';
            },
          }),
        { code: 'ERR_DISPOSED', message: /\bx\b/ },
      );
      t.is(e.enqueued, before, 'nothing enqueued');
      // transpose12's dims multiply past 2^64 without wrapping to the input's size.
      const [empty, emptyOut] = [e.empty([0], 'f32'), e.empty([0], 'f32')];
      rejects(t, e, () => native.transpose12({ input: empty.native, out: emptyOut.native, dims: [2 ** 32, 2 ** 32, 1, 1] }), 'ERR_SHAPE', 'dims', 'dims whose product wraps');
      await e.sync();
      for (const tensor of [a, b, x, out, y, w, square, z, empty, emptyOut]) tensor.dispose();
    });
  });
}
