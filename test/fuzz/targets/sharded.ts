/**
 * Sharded checkpoints (model.safetensors.index.json): weight_map entries drawn from real and hostile shard names
 * (`../` escapes, absolute paths, symlinks out of the directory, directories, NULs, non-strings) and tensor names,
 * plus hostile documents and byte-level mutations of a valid index, against fixed shards whose contents the
 * reference knows. The reference: an index loads exactly when every shard is a relative path to a file whose real
 * path lies inside the directory and holds the tensors the index puts there.
 */
import fc from 'fast-check';
import { existsSync, mkdirSync, realpathSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { isAbsolute, join, relative, resolve, sep } from 'node:path';
import { openCheckpoint } from '../../../lib/checkpoint/index.js';
import { safetensors, StTensor } from '../../checkpoint-writers.js';
import { ExpectedTensor, FuzzTarget, FuzzViolation, scratchFile, scratchPath } from '../harness.js';
import { byteMutations, hostileJson } from '../mutate.js';

const INDEX = 'model.safetensors.index.json';

function tensor(name: string, fill: number): StTensor {
  return { name, dtype: 'F32', shape: [2], data: new Uint8Array(8).fill(fill) };
}

/** Shard file (relative to the checkpoint directory) → the tensors it holds. */
const SHARDS: Record<string, StTensor[]> = {
  'a.safetensors': [tensor('x', 1), tensor('y', 2)],
  'b.safetensors': [tensor('z', 3)],
  'sub/c.safetensors': [tensor('w', 4)],
};

let layout: { dir: string; outside: string } | undefined;

/** The checkpoint directory: three shards, a symlink to a file outside it and one to a folder outside it. */
function checkpointDir(): { dir: string; outside: string } {
  if (layout) return layout;
  const dir = scratchPath('sharded');
  const outside = scratchPath('outside');
  mkdirSync(join(dir, 'sub'), { recursive: true });
  mkdirSync(outside, { recursive: true });
  for (const [shard, tensors] of Object.entries(SHARDS)) writeFileSync(join(dir, shard), safetensors(tensors));
  writeFileSync(join(outside, 'secret.safetensors'), safetensors([tensor('x', 9), tensor('secret', 9)]));
  writeFileSync(join(outside, 'c.safetensors'), safetensors([tensor('w', 9)]));
  symlinkSync(join(outside, 'secret.safetensors'), join(dir, 'link.safetensors'));
  symlinkSync(outside, join(dir, 'sublink'));
  symlinkSync('a.safetensors', join(dir, 'inner-link.safetensors'));
  layout = { dir, outside };
  return layout;
}

const SHARD_NAMES = [
  ...Object.keys(SHARDS), './a.safetensors', 'sub/../a.safetensors', 'inner-link.safetensors',
  '../outside/secret.safetensors', '../../etc/passwd', '/etc/passwd', 'link.safetensors', 'sublink/c.safetensors', 'sub', '', '.',
  'missing.safetensors', 'a.safetensors\0', 'a.safetensors/', 'sub\\..\\..\\x', '%2e%2e/a.safetensors',
];
const TENSOR_NAMES = ['x', 'y', 'z', 'w', 'secret', 'missing'];

type Reference = { ok: true; tensors: Map<string, ExpectedTensor> } | { ok: false; reason: string };

function reference(input: Uint8Array, dir: string): Reference {
  let index: unknown;
  try {
    index = JSON.parse(Buffer.from(input).toString('utf8'));
  } catch {
    return { ok: false, reason: 'not JSON' };
  }
  const wm = (index as { weight_map?: unknown } | null)?.weight_map;
  if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) return { ok: false, reason: 'no weight_map object' };
  const root = realpathSync(dir);
  const tensors = new Map<string, ExpectedTensor>();
  for (const [name, shard] of Object.entries(wm)) {
    if (typeof shard !== 'string' || isAbsolute(shard)) return { ok: false, reason: `${name}: shard is not a relative path` };
    const full = resolve(dir, shard);
    if (!existsSync(full) || !statSync(full).isFile()) return { ok: false, reason: `${name}: shard is not a file` };
    const rel = relative(root, realpathSync(full));
    if (rel.startsWith('..' + sep) || isAbsolute(rel)) return { ok: false, reason: `${name}: shard lies outside` };
    const held = SHARDS[rel]?.find((t) => t.name === name);
    if (!held) return { ok: false, reason: `${name}: not in its shard` };
    tensors.set(name, { dtype: held.dtype, shape: held.shape, bytes: held.data });
  }
  return { ok: true, tensors };
}

async function check(input: Uint8Array): Promise<Map<string, ExpectedTensor>> {
  const { dir } = checkpointDir();
  const ref = reference(input, dir);
  scratchFile(join('sharded', INDEX), input);
  const ckpt = openCheckpoint(dir);
  try {
    const out = new Map<string, ExpectedTensor>();
    for (const name of ckpt.names) {
      const t = await ckpt.read(name);
      out.set(name, { dtype: t.dtype.toUpperCase(), shape: t.shape, bytes: t.data });
    }
    if (!ref.ok) throw new FuzzViolation(`loaded an index the reference refuses (${ref.reason})`);
    const same = [...ref.tensors].every(([n, t]) => out.has(n) && Buffer.from(out.get(n)!.bytes).equals(t.bytes)) && out.size === ref.tensors.size;
    if (!same) throw new FuzzViolation('loaded tensors differ from the shards the index names');
    return out;
  } finally {
    ckpt.close();
  }
}

const entries = fc.dictionary(
  fc.oneof(fc.constantFrom(...TENSOR_NAMES), fc.string({ unit: 'binary', maxLength: 8 })),
  fc.oneof({ weight: 6, arbitrary: fc.constantFrom(...SHARD_NAMES) }, { weight: 1, arbitrary: hostileJson }),
  { minKeys: 1, maxKeys: 5 },
);

const validIndex = fc
  .subarray(['x', 'y', 'z', 'w'], { minLength: 1 })
  .map((names) => JSON.stringify({ metadata: { total_size: 32 }, weight_map: Object.fromEntries(names.map((n) => [n, n === 'z' ? 'b.safetensors' : n === 'w' ? 'sub/c.safetensors' : 'a.safetensors'])) }));

export const shardedTarget: FuzzTarget = {
  name: 'sharded',
  codes: ['ERR_FORMAT'],
  inputs: fc.oneof(
    { weight: 4, arbitrary: entries.map((weight_map) => ({ bytes: Buffer.from(JSON.stringify({ metadata: {}, weight_map })) })) },
    { weight: 1, arbitrary: hostileJson.map((v) => ({ bytes: Buffer.from(JSON.stringify({ weight_map: v })) })) },
    { weight: 2, arbitrary: byteMutations(validIndex.map((s) => Buffer.from(s))).map((bytes) => ({ bytes })) },
  ),
  check,
  allocationBound: () => 64 << 10,
};
