import test, { ExecutionContext } from 'ava';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Checkpoint, infinityBlockKey, normalizeVaeKey, openCheckpoint } from '../lib/checkpoint/index.js';
import { loadTensor } from '../lib/checkpoint/load.js';
import { unpickle } from '../lib/checkpoint/unpickle.js';
import { bf16ToF32Array, f16ToF32Array, f32ToBf16Bits } from '../lib/dtype.js';
import { ScaleKVError } from '../lib/errors.js';
import { SafetensorsFile } from '../lib/safetensors.js';
import { Pickler, PthTensor, safetensors, StTensor, torchArchive, torchPickle, TorchDType, zipStored } from './checkpoint-writers.js';
import { bf16Round, goldenDir, Rng, seedFor, withEngine } from './helpers.js';

const golden = goldenDir('forward_fullcache');

function tmp(t: ExecutionContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'scalekv-ckpt-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function write(dir: string, name: string, data: Uint8Array): string {
  const p = join(dir, name);
  writeFileSync(p, data);
  return p;
}

function bytesOf(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength).slice();
}

/** Random tensor contents of a dtype, as the little-endian bytes torch would store (no NaNs, so values compare). */
function randomBytes(rng: Rng, dtype: TorchDType, n: number): Uint8Array {
  switch (dtype) {
    case 'f32':
      return bytesOf(rng.normals(n));
    case 'f64':
      return bytesOf(Float64Array.from(rng.normals(n)));
    case 'bf16':
      return bytesOf(Uint16Array.from(rng.normals(n), (x) => f32ToBf16Bits(x)));
    case 'f16':
      return bytesOf(Uint16Array.from({ length: n }, () => rng.int(0, 0x7bff) | (rng.next() < 0.5 ? 0x8000 : 0)));
    case 'i64':
      return bytesOf(BigInt64Array.from({ length: n }, () => BigInt(rng.int(-2e9, 2e9))));
    case 'i32':
      return bytesOf(Int32Array.from({ length: n }, () => rng.int(-2e9, 2e9)));
    case 'u8':
      return Uint8Array.from({ length: n }, () => rng.int(0, 255));
    case 'bool':
      return Uint8Array.from({ length: n }, () => rng.int(0, 1));
  }
}

const ELEM: Record<TorchDType, number> = { f32: 4, f64: 8, bf16: 2, f16: 2, i64: 8, i32: 4, u8: 1, bool: 1 };
const ST: Record<TorchDType, StTensor['dtype']> = { f32: 'F32', f64: 'F64', bf16: 'BF16', f16: 'F16', i64: 'I64', i32: 'I32', u8: 'U8', bool: 'BOOL' };

function randomShape(rng: Rng): number[] {
  const rank = rng.int(0, 4);
  return Array.from({ length: rank }, () => (rng.next() < 0.15 ? 1 : rng.int(1, 7)));
}

/** A random state dict: every dtype, scalars, a zero-size tensor, Parameters, and views sharing one storage. */
function randomStateDict(rng: Rng): PthTensor[] {
  const out: PthTensor[] = [];
  const dtypes: TorchDType[] = ['f32', 'bf16', 'f16', 'f64', 'i64', 'i32', 'u8', 'bool'];
  let key = 0;
  for (let i = 0; i < 14; i++) {
    const dtype = i < dtypes.length ? dtypes[i] : rng.pick(['f32', 'bf16', 'f16'] as const);
    const shape = i === 3 ? [] : i === 4 ? [0, 3] : randomShape(rng);
    const n = shape.reduce((a, b) => a * b, 1);
    out.push({ name: `layers.${i}.${rng.pick(['weight', 'bias', 'ada_gss'])}`, dtype, shape, key: String(key++), storage: randomBytes(rng, dtype, n), parameter: rng.next() < 0.3 });
  }
  // Two views into one storage at different offsets, as torch writes for tensors sliced from one buffer.
  const shared = randomBytes(rng, 'f32', 40);
  out.push({ name: 'shared.a', dtype: 'f32', shape: [2, 5], key: String(key), storage: shared, offset: 3 });
  out.push({ name: 'shared.b', dtype: 'f32', shape: [4, 1, 3], key: String(key), storage: shared, offset: 20 });
  // A size-1 dimension may carry any stride in torch and still be contiguous.
  out.push({ name: 'odd_stride', dtype: 'f32', shape: [1, 6], key: String(key + 1), storage: randomBytes(rng, 'f32', 6), stride: [1, 1] });
  return out;
}

function expectedBytes(t: PthTensor): Uint8Array {
  const e = ELEM[t.dtype];
  const n = t.shape.reduce((a, b) => a * b, 1);
  return t.storage.subarray((t.offset ?? 0) * e, ((t.offset ?? 0) + n) * e);
}

async function sameTensors(t: ExecutionContext, a: Checkpoint, b: Checkpoint): Promise<void> {
  t.deepEqual([...a.names].sort(), [...b.names].sort());
  for (const n of b.names) {
    t.deepEqual(a.entry(n), b.entry(n), n);
    const [x, y] = [await a.read(n), await b.read(n)];
    t.true(x.data.equals(y.data), `${n}: bytes differ`);
  }
}

if (!golden) {
  test('golden checkpoints (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; the .pth vs .safetensors fixture comparison is skipped');
    t.pass();
  });
} else {
  test('golden weights.pth and weights.safetensors hold identical tensors under the official names', async (t) => {
    const pth = openCheckpoint(join(golden, 'weights.pth'));
    const st = openCheckpoint(join(golden, 'weights.safetensors'));
    t.teardown(() => (pth.close(), st.close()));
    t.is(pth.format, 'pth');
    await sameTensors(t, pth, st);
    const manifest = JSON.parse(readFileSync(join(golden, 'manifest.json'), 'utf8'));
    for (const w of manifest.weights_tensors as { name: string; shape: number[]; dtype: string }[]) {
      t.deepEqual(pth.entry(w.name).shape, w.shape, w.name);
      t.is(pth.entry(w.name).dtype as string, w.dtype === 'float32' ? 'f32' : w.dtype);
    }
    const { depth, block_chunks: chunks } = manifest.model as { depth: number; block_chunks: number };
    for (let layer = 0; layer < depth; layer++) t.true(pth.has(`${infinityBlockKey(layer, depth / chunks)}.sa.mat_qkv.weight`), `layer ${layer}`);
  });

  test('golden vae.pth ({"vae": sd}) matches the flat vae.safetensors with prefix vae.; keys normalise both ways', async (t) => {
    const nested = openCheckpoint(join(golden, 'vae.pth'));
    t.true(nested.names.every((n) => n.startsWith('vae.')));
    nested.close();
    const pth = openCheckpoint(join(golden, 'vae.pth'), { prefix: 'vae.' });
    const st = openCheckpoint(join(golden, 'vae.safetensors'));
    t.teardown(() => (pth.close(), st.close()));
    await sameTensors(t, pth, st);
    t.is(pth.entry('quantizer.lfq.mask').dtype, 'i64');
    for (const n of st.names) {
      t.is(normalizeVaeKey(n), n, `canonical names stay: ${n}`);
      const bare = n.replace(/\.(conv|norm)\.(weight|bias)$/, '.$2');
      t.is(normalizeVaeKey(bare), n, `unwrapped ${bare}`);
    }
  });

  test('golden .pth streams to the engine equal to the safetensors values', async (t) => {
    const pth = openCheckpoint(join(golden, 'weights.pth'));
    const st = new SafetensorsFile(join(golden, 'weights.safetensors'));
    t.teardown(() => (pth.close(), st.close()));
    await withEngine('cpu', async (e) => {
      const before = e.memory().inUse.weights;
      for (const n of pth.names.slice(0, 12)) {
        const x = await loadTensor(e, pth, n);
        t.deepEqual(x.shape, st.entry(n).shape);
        t.deepEqual(await x.read(), st.f32(n), n);
        x.dispose();
      }
      await e.sync(); // frees run in queue order, after the reads above
      t.is(e.memory().inUse.weights, before);
      const w = 'block_chunks.0.module.0.sa.mat_qkv.weight';
      const b = await loadTensor(e, pth, w, { dtype: 'bf16' });
      t.deepEqual(await b.read(), bf16Round(st.f32(w)));
      await t.throwsAsync(loadTensor(e, pth, w, { shape: [1, 2] }), { code: 'ERR_SHAPE', message: /mat_qkv\.weight/ });
    });
  });
}

test('pth round trip: random f32/bf16/f16/f64/int tensors through hand-built torch.save archives', async (t) => {
  const rng = new Rng(seedFor(t));
  const dir = tmp(t);
  for (const [protocol, zip64, wrap] of [[2, false, undefined], [4, true, 'model'], [2, true, 'vae']] as const) {
    const sd = randomStateDict(rng);
    const path = write(dir, `rt-${protocol}-${zip64}.pth`, torchArchive(sd, { protocol, wrap, zip: { zip64 }, root: wrap ?? 'archive' }));
    const c = openCheckpoint(path, wrap ? { prefix: `${wrap}.` } : {});
    t.is(c.format, 'pth');
    t.deepEqual(c.names, sd.map((x) => x.name), 'insertion order is kept');
    for (const x of sd) {
      const info = c.entry(x.name);
      t.deepEqual(info, { dtype: x.dtype, shape: x.shape, bytes: expectedBytes(x).length }, x.name);
      const r = await c.read(x.name);
      t.true(Buffer.from(expectedBytes(x)).equals(r.data), `${x.name} (${x.dtype} [${x.shape}])`);
    }
    if (wrap) {
      const full = openCheckpoint(path);
      t.deepEqual(full.names, sd.map((x) => `${wrap}.${x.name}`));
      full.close();
      t.throws(() => openCheckpoint(path, { prefix: 'ema.' }), { code: 'ERR_FORMAT', message: /prefix 'ema\.'.*top-level names: vae|model/ });
    }
    // Through the engine: 16-bit floats are loaded bit-exactly, other types converted as documented.
    await withEngine('cpu', async (e) => {
      for (const x of sd) {
        const n = x.shape.reduce((a, b) => a * b, 1);
        if (n === 0) continue;
        const raw = expectedBytes(x).slice();
        const dev = await loadTensor(e, c, x.name);
        const got = await dev.read();
        t.is(dev.dtype as string, { f32: 'f32', f64: 'f32', bf16: 'bf16', f16: 'f16', i64: 'i32', i32: 'i32', u8: 'u8', bool: 'u8' }[x.dtype]);
        const want =
          x.dtype === 'f32' ? new Float32Array(raw.buffer)
          : x.dtype === 'f64' ? Float32Array.from(new Float64Array(raw.buffer))
          : x.dtype === 'bf16' ? bf16ToF32Array(new Uint16Array(raw.buffer))
          : x.dtype === 'f16' ? f16ToF32Array(new Uint16Array(raw.buffer))
          : x.dtype === 'i64' ? Int32Array.from(new BigInt64Array(raw.buffer), Number)
          : x.dtype === 'i32' ? new Int32Array(raw.buffer)
          : raw;
        t.deepEqual(got, want, `${x.name} ${x.dtype}`);
        if (x.dtype === 'f32') t.deepEqual(await (await loadTensor(e, c, x.name, { dtype: 'bf16' })).read(), bf16Round(want as Float32Array));
        if (x.dtype === 'f16') t.deepEqual(await (await loadTensor(e, c, x.name, { dtype: 'f32' })).read(), want);
        if (x.dtype === 'bf16') await t.throwsAsync(loadTensor(e, c, x.name, { dtype: 'i32' }), { code: 'ERR_DTYPE' });
      }
    });
    c.close();
  }
});

test('sharded safetensors: index.json over shards, opened lazily, equal to the source tensors', async (t) => {
  const rng = new Rng(seedFor(t));
  const dir = tmp(t);
  const shards: StTensor[][] = [[], [], []];
  const weightMap: Record<string, string> = {};
  for (let i = 0; i < 12; i++) {
    const dtype = rng.pick(['f32', 'bf16', 'f16'] as const);
    const shape = randomShape(rng);
    const s = i % 3;
    const name = `${infinityBlockKey(i, 5)}.ffn.fc${(i % 2) + 1}.weight`;
    shards[s].push({ name, dtype: ST[dtype], shape, data: randomBytes(rng, dtype, shape.reduce((a, b) => a * b, 1)) });
    weightMap[name] = `model-0000${s + 1}-of-00003.safetensors`;
  }
  shards.forEach((s, i) => write(dir, `model-0000${i + 1}-of-00003.safetensors`, safetensors(s)));
  write(dir, 'model.safetensors.index.json', Buffer.from(JSON.stringify({ metadata: { total_size: 1 }, weight_map: weightMap })));
  for (const path of [dir, join(dir, 'model.safetensors.index.json')]) {
    const c = openCheckpoint(path);
    t.is(c.format, 'safetensors-sharded');
    t.deepEqual(c.names, Object.keys(weightMap));
    for (const x of shards.flat()) {
      const r = await c.read(x.name);
      t.deepEqual(r.shape, x.shape);
      t.true(r.data.equals(Buffer.from(x.data)), x.name);
    }
    c.close();
  }
  // Lazy: a broken third shard goes unnoticed until one of its tensors is touched.
  write(dir, 'model-00003-of-00003.safetensors', Buffer.from('garbage, not a safetensors file'));
  const c = openCheckpoint(dir);
  t.true((await c.read(shards[0][0].name)).data.equals(Buffer.from(shards[0][0].data)));
  t.throws(() => c.entry(shards[2][0].name), { code: 'ERR_FORMAT' });
  c.close();
  // An index naming a tensor its shard lacks, a missing shard, an escaping path, and a malformed index.
  const idx = (wm: unknown, name = 'model.safetensors.index.json') => write(dir, name, Buffer.from(JSON.stringify({ weight_map: wm })));
  const lying = openCheckpoint(idx({ ...weightMap, 'head.weight': 'model-00001-of-00003.safetensors' }));
  await t.throwsAsync(lying.read('head.weight'), { code: 'ERR_FORMAT', message: /head\.weight.*no such tensor/ });
  lying.close();
  t.throws(() => openCheckpoint(idx({ ...weightMap, 'head.weight': 'model-00004-of-00004.safetensors' })), {
    code: 'ERR_FORMAT',
    message: /model-00004-of-00004\.safetensors.*missing/,
  });
  t.throws(() => openCheckpoint(idx({ x: '../outside.safetensors' })), { code: 'ERR_FORMAT', message: /invalid shard/ });
  t.throws(() => openCheckpoint(idx({ x: 7 })), { code: 'ERR_FORMAT' });
  t.throws(() => openCheckpoint(idx([])), { code: 'ERR_FORMAT', message: /weight_map/ });
  write(dir, 'model.safetensors.index.json', Buffer.from('{"weight_map": '));
  t.throws(() => openCheckpoint(dir), { code: 'ERR_FORMAT', message: /not JSON/ });
  t.throws(() => openCheckpoint(join(dir, 'nope')), { code: 'ERR_INVALID_ARG' });
});

test('single safetensors: bf16/f16 tensors read raw and convert in SafetensorsFile.f32', async (t) => {
  const rng = new Rng(seedFor(t));
  const dir = tmp(t);
  const f = rng.normals(24);
  const bf = Uint16Array.from(f, (x) => f32ToBf16Bits(x));
  const h = new Uint16Array(randomBytes(rng, 'f16', 24).buffer);
  const path = write(dir, 'x.safetensors', safetensors([
    { name: 'bf', dtype: 'BF16', shape: [4, 6], data: bytesOf(bf) },
    { name: 'h', dtype: 'F16', shape: [24], data: bytesOf(h) },
    { name: 'f', dtype: 'F32', shape: [2, 3, 4], data: bytesOf(f) },
  ]));
  const c = openCheckpoint(path);
  t.is(c.format, 'safetensors');
  t.deepEqual(c.entry('bf'), { dtype: 'bf16', shape: [4, 6], bytes: 48 });
  t.true((await c.read('bf')).data.equals(Buffer.from(bytesOf(bf))));
  c.close();
  const s = new SafetensorsFile(path);
  t.deepEqual(s.f32('bf'), bf16ToF32Array(bf));
  t.deepEqual(s.f32('h'), f16ToF32Array(h));
  t.deepEqual(s.f32('f'), f);
  s.close();
  await withEngine('cpu', async (e) => {
    const c2 = openCheckpoint(path);
    t.deepEqual(await (await loadTensor(e, c2, 'bf')).read(), bf16ToF32Array(bf));
    t.deepEqual(await (await loadTensor(e, c2, 'f', { shape: [2, 3, 4] })).read(), f);
    await t.throwsAsync(loadTensor(e, c2, 'f', { shape: [6, 4] }), { code: 'ERR_SHAPE', message: /tensor f has shape \[2,3,4\], expected \[6,4\]/ });
    c2.close();
  });
});

/** An archive whose data.pkl is `pkl` (plus one valid storage so nothing else is missing). */
function hostileArchive(pkl: Buffer): Buffer {
  return zipStored([
    { name: 'archive/data.pkl', data: pkl },
    { name: 'archive/data/0', data: new Uint8Array(16) },
    { name: 'archive/version', data: Buffer.from('3\n') },
  ]);
}

test('hostile pickles: os.system, eval and other globals are refused by name; nothing runs', (t) => {
  const dir = tmp(t);
  const marker = join(dir, 'pwned');
  const calls: [string, string, number][] = [
    ['os', 'system', 2],
    ['posix', 'system', 2],
    ['builtins', 'eval', 4],
    ['__builtin__', 'getattr', 2],
    ['subprocess', 'Popen', 4],
    ['torch', 'load', 2],
    ['torch._utils', '_rebuild_device_tensor_from_numpy', 2],
  ];
  for (const [module, name, protocol] of calls) {
    const p = new Pickler(protocol).global(module, name).str(`touch ${marker}`).tuple(1).reduce().stop();
    const path = write(dir, `${module}-${name}.pth`, hostileArchive(p));
    t.throws(() => openCheckpoint(path), { code: 'ERR_UNSAFE_PICKLE', message: new RegExp(`refused global ${module.replace(/\./g, '\\.')}\\.${name}`) });
  }
  // A whitelisted marker (a storage type) may not be called, and INST imports by another route.
  const callStorage = new Pickler(2).global('torch', 'FloatStorage').tuple(0).reduce().stop();
  t.throws(() => openCheckpoint(write(dir, 'call-storage.pth', hostileArchive(callStorage))), { code: 'ERR_UNSAFE_PICKLE', message: /torch\.FloatStorage/ });
  const inst = new Pickler(2).mark().op(0x69, Buffer.from('os\nsystem\n')).stop();
  t.throws(() => openCheckpoint(write(dir, 'inst.pth', hostileArchive(inst))), { code: 'ERR_UNSAFE_PICKLE', message: /INST/ });
  t.false(existsSync(marker));
});

test('hostile archives: storages too short or missing, non-contiguous and malformed shapes', (t) => {
  const rng = new Rng(seedFor(t));
  const dir = tmp(t);
  const storage = randomBytes(rng, 'f32', 12);
  const base: PthTensor = { name: 'w', dtype: 'f32', shape: [3, 4], key: '0', storage };
  const open = (name: string, tensors: PthTensor[], opts = {}) => () => openCheckpoint(write(dir, name, torchArchive(tensors, opts)));
  t.notThrows(open('ok.pth', [base]));
  t.throws(open('offset.pth', [{ ...base, offset: 1 }]), { code: 'ERR_FORMAT', message: /needs 13 elements but storage 0 has 12/ });
  t.throws(open('numel.pth', [{ ...base, storageNumel: 6 }]), { code: 'ERR_FORMAT', message: /storage 0 has 6/ });
  t.throws(open('entry.pth', [base], { storageOverride: { 0: storage.subarray(0, 40) } }), { code: 'ERR_FORMAT', message: /data\/0 holds 40 bytes, too short/ });
  t.throws(open('missing.pth', [base], { omitStorage: ['0'] }), { code: 'ERR_FORMAT', message: /archive\/data\/0 is missing/ });
  t.throws(open('transposed.pth', [{ ...base, stride: [1, 3] }]), { code: 'ERR_FORMAT', message: /contiguous/ });
  t.throws(open('rank.pth', [{ ...base, stride: [4] }]), { code: 'ERR_FORMAT', message: /stride/ });
  // Two dtypes claimed for one storage, and a persistent id of the wrong form.
  t.throws(open('twice.pth', [base, { ...base, name: 'v', dtype: 'i32' }]), { code: 'ERR_FORMAT', message: /described twice/ });
  const badPid = new Pickler(2).emptyDict().str('w').str('not-a-storage').persid().setitem().stop();
  t.throws(() => openCheckpoint(write(dir, 'pid.pth', hostileArchive(badPid))), { code: 'ERR_FORMAT', message: /persistent id/ });
  // Safetensors: a shape that disagrees with the bytes.
  const st = write(dir, 'shape.safetensors', safetensors([{ name: 'w', dtype: 'F32', shape: [4, 4], data: storage }]));
  t.throws(() => openCheckpoint(st), { code: 'ERR_FORMAT', message: /w \(F32 \[4,4\]\)/ });
});

test('truncated, compressed and foreign zips are rejected with ERR_FORMAT', (t) => {
  const rng = new Rng(seedFor(t));
  const dir = tmp(t);
  for (const zip64 of [false, true]) {
    const full = torchArchive(randomStateDict(rng), { zip: { zip64 } });
    const cuts = [0, 2, 4, 29, 100, full.length >> 1, full.length - 200, full.length - 98, full.length - 60, full.length - 22, full.length - 10, full.length - 1];
    for (let i = 0; i < 8; i++) cuts.push(rng.int(1, full.length - 1));
    for (const cut of cuts) {
      const path = write(dir, 'cut.pth', full.subarray(0, cut));
      t.throws(() => openCheckpoint(path), { code: 'ERR_FORMAT' }, `zip64=${zip64} cut at ${cut} of ${full.length}`);
    }
  }
  const deflated = zipStored([{ name: 'archive/data.pkl', data: new Pickler(2).emptyDict().stop() }], { method: 8 });
  t.throws(() => openCheckpoint(write(dir, 'deflate.pth', deflated)), { code: 'ERR_FORMAT', message: /compression method 8/ });
  const noPkl = zipStored([{ name: 'readme.txt', data: Buffer.from('hi') }]);
  t.throws(() => openCheckpoint(write(dir, 'other.zip', noPkl)), { code: 'ERR_FORMAT', message: /data\.pkl/ });
  const legacy = Buffer.concat([Buffer.from([0x80, 0x02, 0x8a, 0x0a]), Buffer.alloc(20)]);
  t.throws(() => openCheckpoint(write(dir, 'old.pth', legacy)), { code: 'ERR_FORMAT', message: /legacy/ });
  t.throws(() => openCheckpoint(write(dir, 'empty.bin', new Uint8Array(0))), { code: 'ERR_FORMAT' });
});

test('sharded index paths: ../ escapes, absolute paths and symlinks out of the directory are refused; links inside load', async (t) => {
  const rng = new Rng(seedFor(t));
  const root = tmp(t);
  const dir = join(root, 'ckpt');
  const outside = join(root, 'elsewhere');
  mkdirSync(join(dir, 'sub'), { recursive: true });
  mkdirSync(outside);
  const data = randomBytes(rng, 'f32', 4);
  const shard = safetensors([{ name: 'x', dtype: 'F32', shape: [4], data }]);
  write(dir, 'a.safetensors', shard);
  write(outside, 'secret.safetensors', shard);
  symlinkSync(join(outside, 'secret.safetensors'), join(dir, 'link.safetensors'));
  symlinkSync(outside, join(dir, 'sublink'));
  symlinkSync('a.safetensors', join(dir, 'inner.safetensors'));
  symlinkSync(join(dir, 'a.safetensors'), join(dir, 'sub', 'inner-abs.safetensors'));
  const idx = (shardName: string) => write(dir, 'model.safetensors.index.json', Buffer.from(JSON.stringify({ weight_map: { x: shardName } })));
  const refused: [string, RegExp][] = [
    ['../../etc/passwd', /invalid shard/],
    ['../elsewhere/secret.safetensors', /invalid shard/],
    ['sub/../../elsewhere/secret.safetensors', /invalid shard/],
    ['/etc/passwd', /invalid shard/],
    [join(dir, 'a.safetensors'), /invalid shard/],
    ['link.safetensors', /outside the checkpoint directory/],
    ['sublink/secret.safetensors', /outside the checkpoint directory/],
  ];
  for (const [name, message] of refused) t.throws(() => openCheckpoint(idx(name)), { code: 'ERR_FORMAT', message }, name);
  for (const name of ['inner.safetensors', 'sub/inner-abs.safetensors', './a.safetensors']) {
    const c = openCheckpoint(idx(name));
    t.true((await c.read('x')).data.equals(Buffer.from(data)), name);
    c.close();
  }
});

test('safetensors __metadata__ must be a string → string map: nesting 200,000 deep, numbers and objects are refused', (t) => {
  const dir = tmp(t);
  const withMetadata = (json: string) => {
    const text = `{"__metadata__":${json},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`;
    const n = Buffer.alloc(8);
    n.writeBigUInt64LE(BigInt(Buffer.byteLength(text)));
    return Buffer.concat([n, Buffer.from(text), Buffer.alloc(4)]);
  };
  const cases: [string, string, RegExp][] = [
    ['deep', '['.repeat(200_000) + ']'.repeat(200_000), /__metadata__ is not a JSON object/],
    ['deep-value', `{"a":${'['.repeat(200_000)}${']'.repeat(200_000)}}`, /entry "a" is an array/],
    ['number', '{"format":1}', /entry "format" is a number/],
    ['object', '{"format":{"pt":"x"}}', /is an object/],
    ['string', '"pt"', /not a JSON object/],
  ];
  for (const [name, json, message] of cases)
    t.throws(() => new SafetensorsFile(write(dir, `${name}.safetensors`, withMetadata(json))), { code: 'ERR_FORMAT', message }, name);
  const ok = new SafetensorsFile(write(dir, 'ok.safetensors', withMetadata('{"format":"pt","note":"a\\u001b[2Jb"}')));
  t.deepEqual(ok.metadata, { format: 'pt', note: 'a\u001b[2Jb' });
  ok.close();
  const none = new SafetensorsFile(write(dir, 'null.safetensors', withMetadata('null')));
  t.deepEqual(none.metadata, {});
  none.close();
});

test('hostile safetensors: overlapping and overrunning offsets, bad headers', (t) => {
  const rng = new Rng(seedFor(t));
  const dir = tmp(t);
  const a = randomBytes(rng, 'f32', 8);
  const b = randomBytes(rng, 'f32', 8);
  const cases: [string, Buffer, RegExp][] = [
    ['overlap', safetensors([{ name: 'a', dtype: 'F32', shape: [8], data: a }, { name: 'b', dtype: 'F32', shape: [8], data: b, offsets: [16, 48] }]), /overlap/],
    ['overrun', safetensors([{ name: 'a', dtype: 'F32', shape: [8], data: a }, { name: 'b', dtype: 'F32', shape: [8], data: b, offsets: [40, 72] }]), /offsets/],
    ['backwards', safetensors([{ name: 'a', dtype: 'F32', shape: [0], data: new Uint8Array(0), offsets: [8, 0] }]), /offsets/],
    ['dtype', safetensors([{ name: 'a', dtype: 'constructor' as never, shape: [8], data: a }]), /unsupported dtype/],
    ['truncated', safetensors([{ name: 'a', dtype: 'F32', shape: [8], data: a }]).subarray(0, 60), /does not fit|offsets/],
  ];
  const header = (json: string) => {
    const n = Buffer.alloc(8);
    n.writeBigUInt64LE(BigInt(json.length));
    return Buffer.concat([n, Buffer.from(json)]);
  };
  cases.push(['array', header('[1,2]'), /not a JSON object/], ['null', header('null'), /not a JSON object/], ['entry', header('{"a": 5}'), /malformed/]);
  const huge = Buffer.alloc(16);
  huge.writeBigUInt64LE(1n << 62n);
  cases.push(['length', huge, /header length/]);
  for (const [name, data, message] of cases) t.throws(() => openCheckpoint(write(dir, `${name}.safetensors`, data)), { code: 'ERR_FORMAT', message }, name);
});

test('pickle VM limits: self-containing and deep dicts, stack, memo and size caps', (t) => {
  const dir = tmp(t);
  const selfRef = new Pickler(2).emptyDict().put().str('me').get(0).setitem().stop();
  t.throws(() => openCheckpoint(write(dir, 'self.pth', hostileArchive(selfRef))), { code: 'ERR_FORMAT', message: /contains itself/ });
  const deepPkl = new Pickler(2);
  for (let i = 0; i < 100; i++) deepPkl.emptyDict().str('k');
  deepPkl.emptyDict();
  for (let i = 0; i < 100; i++) deepPkl.setitem();
  t.throws(() => openCheckpoint(write(dir, 'deep.pth', hostileArchive(deepPkl.stop()))), { code: 'ERR_FORMAT', message: /nested deeper/ });
  const dups = new Pickler(2).none();
  for (let i = 0; i < 50; i++) dups.op(0x32);
  t.throws(() => unpickle(dups.stop(), 'dup', { maxStack: 20 }), { code: 'ERR_FORMAT', message: /stack exceeds 20/ });
  const memo = new Pickler(2).none();
  for (let i = 0; i < 50; i++) memo.put();
  t.throws(() => unpickle(memo.stop(), 'memo', { maxMemo: 10 }), { code: 'ERR_FORMAT', message: /memo exceeds 10/ });
  t.throws(() => unpickle(new Uint8Array(100), 'big', { maxBytes: 50 }), { code: 'ERR_FORMAT', message: /cap/ });
  t.throws(() => unpickle(Buffer.from([0x80, 0x02, 0x7d]), 'nostop'), { code: 'ERR_FORMAT', message: /truncated/ });
  t.throws(() => unpickle(Buffer.from([0x80, 0x02, 0x30, 0x2e]), 'underflow'), { code: 'ERR_FORMAT', message: /underflow/ });
  t.throws(() => unpickle(Buffer.from([0x80, 0x02, 0x68, 0x07, 0x2e]), 'memo-miss'), { code: 'ERR_FORMAT', message: /memo key 7/ });
  t.throws(() => unpickle(Buffer.from([0x80, 0x02, 0xff]), 'unknown'), { code: 'ERR_FORMAT', message: /opcode 0xff/ });
  const topList = new Pickler(2).op(0x5d).stop();
  t.throws(() => openCheckpoint(write(dir, 'list.pth', hostileArchive(topList))), { code: 'ERR_FORMAT', message: /not a dict/ });
});

test('fuzz: corrupted pickles and archives only ever fail with coded errors', async (t) => {
  const rng = new Rng(seedFor(t));
  const dir = tmp(t);
  const sd = randomStateDict(rng);
  const pkl = torchPickle(sd, { wrap: 'model' });
  const coded = (e: unknown, what: string) => {
    if (!(e instanceof ScaleKVError) || !['ERR_FORMAT', 'ERR_UNSAFE_PICKLE'].includes(e.code)) {
      t.fail(`${what}: ${(e as Error)?.stack ?? e}`);
      return false;
    }
    return true;
  };
  let failures = 0;
  for (let i = 0; i < 400; i++) {
    const m = Buffer.from(pkl);
    for (let k = rng.int(1, 4); k > 0; k--) m[rng.int(2, m.length - 1)] = rng.int(0, 255);
    try {
      unpickle(m, 'fuzz');
    } catch (e) {
      if (coded(e, `pickle mutation ${i}`)) failures++;
    }
  }
  const archive = torchArchive(sd);
  for (let i = 0; i < 150; i++) {
    const m = Buffer.from(archive);
    for (let k = rng.int(1, 3); k > 0; k--) m[rng.int(0, m.length - 1)] = rng.int(0, 255);
    const path = write(dir, 'fuzz.pth', m);
    try {
      const c = openCheckpoint(path);
      for (const n of c.names) await c.read(n);
      c.close();
    } catch (e) {
      if (coded(e, `archive mutation ${i}`)) failures++;
    }
  }
  t.log(`${failures} of 550 mutations rejected (the rest still decode)`);
  t.true(failures > 0);
});

test('key helpers: infinityBlockKey and normalizeVaeKey', (t) => {
  t.is(infinityBlockKey(0, 4), 'block_chunks.0.module.0');
  t.is(infinityBlockKey(2, 2), 'block_chunks.1.module.0');
  t.is(infinityBlockKey(31, 4), 'block_chunks.7.module.3');
  t.is(infinityBlockKey(39, 5), 'block_chunks.7.module.4');
  t.throws(() => infinityBlockKey(-1, 4), { code: 'ERR_INVALID_ARG' });
  t.throws(() => infinityBlockKey(1, 0), { code: 'ERR_INVALID_ARG' });
  const pairs: [string, string][] = [
    ['decoder.conv_in.weight', 'decoder.conv_in.conv.weight'],
    ['decoder.norm_out.bias', 'decoder.norm_out.norm.bias'],
    ['decoder.mid.block_1.norm1.weight', 'decoder.mid.block_1.norm1.norm.weight'],
    ['decoder.up.3.block.0.nin_shortcut.weight', 'decoder.up.3.block.0.nin_shortcut.conv.weight'],
    ['decoder.up.2.upsample.conv.weight', 'decoder.up.2.upsample.conv.conv.weight'],
    ['decoder.mid.attn_1.q.bias', 'decoder.mid.attn_1.q.conv.bias'],
    ['decoder.mid.attn_1.norm.weight', 'decoder.mid.attn_1.norm.norm.weight'],
  ];
  for (const [bare, canon] of pairs) {
    t.is(normalizeVaeKey(bare), canon);
    t.is(normalizeVaeKey(canon), canon);
  }
  t.is(normalizeVaeKey('quantizer.lfq.mask'), 'quantizer.lfq.mask');
});

test('cli inspect lists tensors, dtypes, shapes, bytes and totals; hostile files exit 1 with the code', (t) => {
  const rng = new Rng(seedFor(t));
  const dir = tmp(t);
  const sd = randomStateDict(rng);
  const path = write(dir, 'm.pth', torchArchive(sd, { wrap: 'vae' }));
  const cli = (...args: string[]) => spawnSync(process.execPath, ['--import=tsx', 'lib/cli.ts', 'inspect', ...args], { encoding: 'utf8', timeout: 60_000 });
  const json = cli(path, '--json');
  t.is(json.status, 0, json.stderr);
  const report = JSON.parse(json.stdout);
  t.is(report.format, 'pth');
  t.deepEqual(
    report.tensors.map((x: { name: string; dtype: string; shape: number[]; bytes: number }) => [x.name, x.dtype, x.shape, x.bytes]),
    sd.map((x) => [`vae.${x.name}`, x.dtype, x.shape, expectedBytes(x).length]),
  );
  t.is(report.total.count, sd.length);
  t.is(report.total.bytes, sd.reduce((a, x) => a + expectedBytes(x).length, 0));
  const text = cli(path, '--prefix', 'vae.');
  t.is(text.status, 0, text.stderr);
  t.regex(text.stdout, new RegExp(`^  ${sd[0].name.replace(/\./g, '\\.')} +${sd[0].dtype} +\\[${sd[0].shape.join(', ')}\\]`, 'm'));
  t.regex(text.stdout, new RegExp(`^${sd.length} tensors, ${report.total.bytes} bytes`, 'm'));
  const evil = write(dir, 'evil.pth', hostileArchive(new Pickler(2).global('os', 'system').str('true').tuple(1).reduce().stop()));
  const bad = cli(evil);
  t.is(bad.status, 1);
  t.regex(bad.stderr, /refused global os\.system.*\[ERR_UNSAFE_PICKLE\]/);
  mkdirSync(join(dir, 'empty'));
  t.is(cli(join(dir, 'empty')).status, 1);
});

test('cli inspect prints tensor names and metadata with control characters escaped; --json keeps them exact', (t) => {
  const dir = tmp(t);
  const names = ['plain.weight', 'evil\u001b[2J\u001b[31mred', 'new\nline', 'bidi\u202eexe.txt', 'back\\slash', 'c1\u009bx'];
  const path = write(dir, 'names.safetensors', safetensors(names.map((name) => ({ name, dtype: 'F32', shape: [1], data: new Uint8Array(4) })), { format: 'pt', 'note\u0007': 'ring\u0007\r' }));
  const cli = (...args: string[]) => spawnSync(process.execPath, ['--import=tsx', 'lib/cli.ts', 'inspect', ...args], { encoding: 'utf8', timeout: 60_000 });
  const text = cli(path);
  t.is(text.status, 0, text.stderr);
  t.false(/[\u0000-\u0009\u000b-\u001f\u007f-\u009f\u202e]/.test(text.stdout), 'no raw control character reaches the terminal');
  for (const escaped of ['evil\\x1b[2J\\x1b[31mred', 'new\\x0aline', 'bidi\\u202eexe.txt', 'back\\\\slash', 'c1\\x9bx', 'metadata note\\x07: ring\\x07\\x0d'])
    t.true(text.stdout.includes(escaped), escaped);
  const json = cli(path, '--json');
  t.is(json.status, 0, json.stderr);
  const report = JSON.parse(json.stdout);
  t.deepEqual(report.tensors.map((x: { name: string }) => x.name).sort(), [...names].sort());
  t.deepEqual(report.metadata, { format: 'pt', 'note\u0007': 'ring\u0007\r' });
  const missing = cli(join(dir, 'nope\u001b[2J.safetensors'));
  t.is(missing.status, 1);
  t.true(missing.stderr.includes('nope\\x1b[2J.safetensors') && !missing.stderr.includes('\u001b'), missing.stderr);
});
