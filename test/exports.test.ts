// The public surface. package.json "exports" names the root and three tiers (scalekv/engine, scalekv/kv,
// scalekv/verify); each resolves by the package's name to a fresh tsc build of lib/ (test/package-build.ts), with
// exactly the exports of its source entry, typed for a consumer; every entry export is the implementing module's own
// object, and the built tiers share one module graph (a class from one tier is the class of another, so instanceof
// holds across them); one real call per tier works through the package.
import test from 'ava';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import * as rootSrc from '../lib/index.js';
import * as engineSrc from '../lib/engine-entry.js';
import * as kvSrc from '../lib/kv-entry.js';
import * as verifySrc from '../lib/verify-entry.js';
import * as engineMod from '../lib/engine.js';
import * as opsMod from '../lib/ops.js';
import * as dtypeMod from '../lib/dtype.js';
import * as errorsMod from '../lib/errors.js';
import * as memoryPlanMod from '../lib/memory-plan.js';
import * as kvCache from '../lib/kv/cache.js';
import * as kvPolicy from '../lib/kv/policy.js';
import * as kvSelection from '../lib/kv/selection.js';
import * as kvBaselines from '../lib/kv/baselines.js';
import * as kvSpec from '../lib/kv/spec.js';
import * as kvPlanner from '../lib/kv/planner.js';
import * as kvResolve from '../lib/kv/resolve.js';
import * as kvQuant from '../lib/kv/quant.js';
import * as skPolicy from '../lib/scalekv/policy.js';
import * as skBudget from '../lib/scalekv/budget.js';
import * as skWindow from '../lib/scalekv/window.js';
import * as skAsi from '../lib/scalekv/asi.js';
import * as metrics from '../lib/eval/metrics.js';
import * as verifyIndex from '../lib/verify/index.js';
import * as verifyCompare from '../lib/verify/compare.js';
import * as vUnits from '../lib/verify/update-kv-units.js';
import * as vRope from '../lib/verify/rope2d.js';
import * as vBsq from '../lib/verify/bsq-codes.js';
import * as vVae from '../lib/verify/vae-decode.js';
import * as vSampling from '../lib/verify/sampling.js';
import * as vFull from '../lib/verify/forward-fullcache.js';
import * as vScalekv from '../lib/verify/forward-scalekv.js';
import * as safetensorsMod from '../lib/safetensors.js';
import * as pipelineMod from '../lib/pipeline.js';
import { Rng, seedFor } from './helpers.js';
import { packageBuild, removePackageBuild, repoRoot, tsc } from './package-build.js';

type Module = Record<string, unknown>;
const run = promisify(execFile);

const SUBPATHS = { '.': 'index', './engine': 'engine-entry', './kv': 'kv-entry', './verify': 'verify-entry' } as const;
const SOURCES: Record<string, Module> = { scalekv: rootSrc, 'scalekv/engine': engineSrc, 'scalekv/kv': kvSrc, 'scalekv/verify': verifySrc };

/** What each tier must export (the list); the full lists are compared with the source entries below. */
const REQUIRED: Record<string, string[]> = {
  scalekv: ['Pipeline', 'parseAspect', 'readTextFeatures', 'createEngine', 'Engine', 'Tensor', 'ScaleKVError', 'InfinityModel', 'VaeDecoder', 'generate',
    'decodeImage', 'scaleSchedule', 'preset', 'openCheckpoint', 'encodePng', 'kvPolicyFromSpec', 'ScaleKvPolicy', 'verifyFixture', 'kv', 'verify'],
  'scalekv/engine': ['createEngine', 'backendInfo', 'Engine', 'Tensor', 'MEMORY_CATEGORIES', 'bsqCodeValue', 'DTYPES', 'dtypeSize', 'f32ToBf16Bits',
    'bf16BitsToF32', 'roundToBf16', 'ScaleKVError', 'planAllocations', 'packAllocations'],
  'scalekv/kv': ['KvCache', 'appendUnlessLast', 'SelectionPolicy', 'FullKvPolicy', 'SlidingWindowPolicy', 'StreamingLlmPolicy', 'SnapKvPolicy',
    'PyramidKvPolicy', 'ScaleKvPolicy', 'kvPolicyFromSpec', 'builtinPlan', 'parseBudgetPlan', 'budgetPlanToJson', 'layerBudget', 'officialRulePlan',
    'linearDecayPlan', 'observationWindow', 'calibrate', 'AsiProfiler', 'planMemory', 'largestBatch', 'psnr', 'ssim', 'fidelity'],
  'scalekv/verify': ['verifyFixture', 'VERIFY_KINDS', 'verifyUpdateKvUnits', 'verifyRope2d', 'verifyBsqCodes', 'verifyVaeDecode', 'verifySampling',
    'verifyForwardFullcache', 'verifyForwardScalekv', 'compareFloats', 'relCheck', 'diffCheck', 'SafetensorsFile'],
};

/** The modules that implement each tier: every export of the entry must be one of theirs, the very same object. */
const IMPLEMENTERS: Record<string, Module[]> = {
  'scalekv/engine': [engineMod, opsMod, dtypeMod, errorsMod, memoryPlanMod],
  'scalekv/kv': [kvCache, kvQuant, kvPolicy, kvSelection, kvBaselines, kvSpec, kvPlanner, kvResolve, skPolicy, skBudget, skWindow, skAsi, metrics],
  'scalekv/verify': [verifyIndex, verifyCompare, vUnits, vRope, vBsq, vVae, vSampling, vFull, vScalekv, safetensorsMod],
};

const pkgJson = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { exports: Record<string, unknown>; files: string[] };
const keys = (m: Module) => Object.keys(m).sort();
const uniform = (rng: Rng, lo: number, hi: number) => lo + (hi - lo) * rng.next();

test.after.always(removePackageBuild);

test('package.json exports the root and the three tiers, types and import into dist/, and tsc emits every target', async (t) => {
  t.deepEqual(Object.keys(pkgJson.exports).sort(), ['.', './engine', './kv', './package.json', './verify']);
  t.true(pkgJson.files.includes('dist'));
  const build = await packageBuild();
  for (const [sub, file] of Object.entries(SUBPATHS)) {
    t.deepEqual(pkgJson.exports[sub], { types: `./dist/${file}.d.ts`, import: `./dist/${file}.js` }, sub);
    t.true(existsSync(join(repoRoot, 'lib', `${file}.ts`)), `${sub}: lib/${file}.ts`);
    for (const ext of ['.js', '.d.ts']) t.true(existsSync(join(build.pkg, 'dist', file + ext)), `${sub}: tsc emitted dist/${file}${ext}`);
  }
});

test('each subpath resolves by the package name to its build, with exactly the exports of its source entry', async (t) => {
  const build = await packageBuild();
  for (const [spec, src] of Object.entries(SOURCES)) {
    const built = await build.load(spec);
    t.deepEqual(keys(built), keys(src), spec);
    for (const name of REQUIRED[spec]) t.true(name in built, `${spec} exports ${name}`);
  }
  // What was loaded is the build, not the sources: distinct module instances.
  t.not((await build.load('scalekv/kv')).KvCache, kvSrc.KvCache);
  // Only the exports map is reachable (the resolver's error may come from another realm: not an ava 'Error').
  const closed = await build.load('scalekv/lib/kv/index.js').then(() => undefined, (e: { code?: string }) => e);
  t.is(closed?.code, 'ERR_PACKAGE_PATH_NOT_EXPORTED');
});

test('plain Node (no tsx) imports every subpath of the build by name', async (t) => {
  const build = await packageBuild();
  const script = `const out = {}; for (const s of ${JSON.stringify(Object.keys(SOURCES))}) out[s] = Object.keys(await import(s)).sort(); console.log(JSON.stringify(out));`;
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  const { stdout } = await run(process.execPath, ['--input-type=module', '-e', script], { cwd: build.root, env });
  const got = JSON.parse(stdout) as Record<string, string[]>;
  for (const [spec, src] of Object.entries(SOURCES)) t.deepEqual(got[spec], keys(src), spec);
});

test('every tier export is the implementing module\'s own object; the root re-exports the tiers as the same objects', (t) => {
  for (const [spec, impls] of Object.entries(IMPLEMENTERS)) {
    const entry = SOURCES[spec];
    for (const [name, value] of Object.entries(entry)) {
      const owners = impls.filter((m) => name in m);
      t.true(owners.length > 0, `${spec}.${name}: implemented by none of its modules`);
      for (const m of owners) t.is(m[name], value, `${spec}.${name}`);
    }
  }
  t.is(rootSrc.Pipeline, pipelineMod.Pipeline);
  for (const [name, value] of Object.entries(engineSrc)) t.is((rootSrc as Module)[name], value, `root ${name} is scalekv/engine's`);
  for (const [name, value] of Object.entries(kvSrc)) t.is((rootSrc.kv as Module)[name], value, `root kv.${name}`);
  for (const [name, value] of Object.entries(verifySrc)) t.is((rootSrc.verify as Module)[name], value, `root verify.${name}`);
  // The KV names the root has always exported flat are the kv tier's.
  for (const name of ['KvCache', 'FullKvPolicy', 'ScaleKvPolicy', 'kvPolicyFromSpec', 'builtinPlan', 'planEntry', 'observationWindow'])
    t.is((rootSrc as Module)[name], (kvSrc as Module)[name], name);
});

test('the built tiers share one module graph: the same classes and functions from every entry', async (t) => {
  const build = await packageBuild();
  const [root, engine, kv, verify] = await Promise.all(Object.keys(SOURCES).map((s) => build.load(s)));
  for (const [name, value] of Object.entries(engine)) t.is(root[name], value, `scalekv.${name} === scalekv/engine.${name}`);
  for (const [name, value] of Object.entries(kv)) t.is((root.kv as Module)[name], value, `scalekv.kv.${name}`);
  for (const [name, value] of Object.entries(verify)) t.is((root.verify as Module)[name], value, `scalekv.verify.${name}`);
  t.is(root.KvCache, kv.KvCache);
  t.is(root.SafetensorsFile, verify.SafetensorsFile);
});

test('scalekv/engine: a kernel on the CPU against float64, its profile, dtype helpers, coded errors', async (t) => {
  const rng = new Rng(seedFor(t));
  const E = (await (await packageBuild()).load('scalekv/engine')) as unknown as typeof engineSrc;
  const engine = await E.createEngine({ backend: 'cpu', threads: 2 });
  try {
    t.true(engine instanceof E.Engine);
    const n = rng.int(1, 300);
    const xs = Float32Array.from({ length: n }, () => uniform(rng, -8, 8));
    const x = engine.tensor(xs, [n], 'f32');
    t.true(x instanceof E.Tensor);
    const y = engine.empty([n], 'f32');
    engine.startProfiling();
    engine.ops.silu(x, y);
    const profile = await engine.stopProfiling();
    const got = await y.read();
    for (let i = 0; i < n; i++) {
      const want = xs[i] / (1 + Math.exp(-xs[i]));
      t.true(Math.abs(got[i] - want) <= 4e-7 * Math.max(1, Math.abs(want)), `silu(${xs[i]}) = ${got[i]}, float64 ${want}`);
    }
    t.deepEqual(profile.filter((p) => p.op === 'activation').map((p) => p.count), [1]);
    const err = t.throws(() => engine.tensor(new Float32Array(n + 1), [n], 'f32'));
    t.true(err instanceof E.ScaleKVError);
    t.is((err as InstanceType<typeof E.ScaleKVError>).code, 'ERR_SHAPE');
  } finally {
    engine.dispose();
  }
  t.is(E.f32ToBf16Bits(1), 0x3f80);
  t.is(E.bf16BitsToF32(0xc000), -2);
  t.deepEqual(E.DTYPES.map((d) => E.dtypeSize(d)), [4, 2, 2, 4, 1]);
});

test('scalekv/kv: an official-format budget plan parsed and written back, psnr/ssim against float64', async (t) => {
  const rng = new Rng(seedFor(t));
  const K = (await (await packageBuild()).load('scalekv/kv')) as unknown as typeof kvSrc;
  // A random plan in the official JSON, built here by hand.
  const depth = rng.int(2, 12);
  const entries = Array.from({ length: rng.int(1, 5) }, (_, i) => 3 + 2 * i + rng.int(0, 1)).filter((v, i, a) => a.indexOf(v) === i);
  const raw: Record<string, Record<string, number>> = {};
  const drafterSets = new Map<number, number[]>();
  for (const N of entries) {
    const drafters = Array.from({ length: depth }, (_, b) => b).filter(() => rng.next() < 0.3);
    drafterSets.set(N, drafters);
    const e: Record<string, number> = {};
    for (let b = 0; b < depth; b++) e[`Block ${b}`] = drafters.includes(b) ? 1 : 0;
    Object.assign(e, { High: drafters.length, Max: 100 * N, Min: 10 * N, Limit: 1000 * N });
    raw[`Scale ${N}`] = e;
  }
  const plan = K.parseBudgetPlan(JSON.stringify(raw));
  t.is(plan.depth, depth);
  t.deepEqual(plan.scales.map((s) => s.scale), [...entries].sort((a, b) => a - b));
  for (const N of entries)
    for (let layer = 0; layer < depth; layer++)
      t.is(K.layerBudget(plan, layer, N - 2), drafterSets.get(N)!.includes(layer) ? 100 * N : 10 * N, `Scale ${N}, layer ${layer}`);
  t.deepEqual(JSON.parse(K.budgetPlanToJson(plan)), raw);
  const bad = structuredClone(raw);
  bad[`Scale ${entries[0]}`].High += 1;
  t.throws(() => K.parseBudgetPlan(bad), { message: /High/ });

  // PSNR: 10·log10(1 / MSE) on [0, 1] data, computed here in float64; SSIM of an image with itself is 1.
  const height = rng.int(11, 24);
  const width = rng.int(11, 24);
  const a = Uint8Array.from({ length: height * width * 3 }, () => rng.int(0, 255));
  const b = a.map((v) => Math.min(255, Math.max(0, v + rng.int(-20, 20))));
  b[0] = a[0] ^ 1;
  let se = 0;
  for (let i = 0; i < a.length; i++) se += ((a[i] - b[i]) / 255) ** 2;
  const want = 10 * Math.log10(1 / (se / a.length));
  t.true(Math.abs(K.psnr({ a, b, height, width }) - want) < 1e-9, `psnr ${K.psnr({ a, b, height, width })}, float64 ${want}`);
  t.is(K.psnr({ a, b: a.slice(), height, width }), Infinity);
  t.true(Math.abs(K.ssim({ a, b: a.slice(), height, width }) - 1) < 1e-12);
  const s = K.ssim({ a, b, height, width });
  t.true(s < 1 && s > -1, `ssim ${s}`);
});

test('scalekv/verify: the agreement rules by hand, and a bad fixture directory is a coded error', async (t) => {
  const rng = new Rng(seedFor(t));
  const build = await packageBuild();
  const V = (await build.load('scalekv/verify')) as unknown as typeof verifySrc;
  const E = (await build.load('scalekv/engine')) as unknown as typeof engineSrc;
  const n = rng.int(2, 200);
  const expected = Float64Array.from({ length: n }, () => uniform(rng, -4, 4));
  const actual = Float64Array.from(expected);
  const at = rng.int(0, n - 1);
  const delta = uniform(rng, 1e-6, 1e-3);
  actual[at] += delta;
  const scale = expected.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  const want = Math.abs(actual[at] - expected[at]) / scale; // max |ours - official| / max |official|
  const close = V.relCheck('x', actual, expected, 2 * want);
  t.true(close.value === want && close.pass, JSON.stringify(close));
  t.false(V.relCheck('x', actual, expected, want / 2).pass);
  const ints = Int32Array.from({ length: n }, () => rng.int(0, 1000));
  const other = Int32Array.from(ints);
  other[at] += 1;
  t.like(V.diffCheck('kept', other, ints), { value: 1, pass: false });
  t.like(V.diffCheck('kept', ints, ints.slice()), { value: 0, pass: true });
  const err = await t.throwsAsync(V.verifyFixture(join(build.root, 'no-such-fixture')));
  t.true(err instanceof E.ScaleKVError);
  t.is((err as InstanceType<typeof E.ScaleKVError>).code, 'ERR_FIXTURE');
});

test('the declarations: a consumer with moduleResolution nodenext type-checks against each subpath', async (t) => {
  const build = await packageBuild();
  const file = join(build.root, 'consumer.mts');
  writeFileSync(
    file,
    `import { Pipeline, kv, verify, type PipelineResult } from 'scalekv';
import type { DType, Engine, ErrorCode, GemmArgs, MemoryStats, OpProfileEntry, Ops, Tensor } from 'scalekv/engine';
import { ScaleKVError } from 'scalekv/engine';
import type { BudgetPlan, CalibrationResult, ImagePair, KvPolicy, KvPolicySession, MemoryPlan, ScaleKvOptions } from 'scalekv/kv';
import { parseBudgetPlan, psnr, ScaleKvPolicy } from 'scalekv/kv';
import type { Check, VerifyReport } from 'scalekv/verify';
import { verifyFixture } from 'scalekv/verify';

export const plan: BudgetPlan = parseBudgetPlan('{}');
export const same: typeof parseBudgetPlan = kv.parseBudgetPlan;
export const policy: KvPolicy = new ScaleKvPolicy({ mode: 'paper', plan } satisfies ScaleKvOptions);
export const metric: (p: ImagePair) => number = psnr;
export const run: (dir: string) => Promise<VerifyReport> = verifyFixture;
export const runAgain: typeof verifyFixture = verify.verifyFixture;
export const load: typeof Pipeline.load = Pipeline.load;
export type Used = [PipelineResult, DType, Engine, ErrorCode, GemmArgs, MemoryStats, OpProfileEntry, Ops, Tensor, CalibrationResult,
  KvPolicySession, MemoryPlan, Check];
export const code: ErrorCode = new ScaleKVError('ERR_SHAPE', 'x').code;
// @ts-expect-error psnr takes an ImagePair (the declarations are real types, not any)
psnr(1);
// @ts-expect-error not a dtype
export const wrong: DType = 'f64';
`,
  );
  writeFileSync(
    join(build.root, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: {
        module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', strict: true, noEmit: true, types: ['node'],
        typeRoots: [join(repoRoot, 'node_modules', '@types')],
      },
      files: [file],
    }),
  );
  await tsc(['-p', join(build.root, 'tsconfig.json')], build.root);
  t.pass();
});
