// The README's examples are code that works: every ```ts block preceded by `<!-- readme-example: NAME -->` is
// type-checked against the package's declarations and run (as an ES module, with tsx) against a fresh build of the
// package, imported by name as a consumer imports it (test/package-build.ts). One example per tier; each run is
// checked for what it says it does, and for a quiet library (nothing on stderr).
import test, { ExecutionContext } from 'ava';
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { decodePng } from '../lib/image/png.js';
import { goldenDir } from './helpers.js';
import { packageBuild, removePackageBuild, repoRoot, tsc } from './package-build.js';

const EXAMPLES = ['pipeline', 'engine', 'kv', 'verify'];

/** The marked examples of a markdown text, by name. */
function readmeExamples(markdown: string): Map<string, string> {
  const out = new Map<string, string>();
  const marker = /<!-- readme-example: ([\w-]+) -->\n```ts\n([\s\S]*?)\n```/g;
  for (const m of markdown.matchAll(marker)) {
    if (out.has(m[1])) throw new Error(`README: two examples named '${m[1]}'`);
    out.set(m[1], m[2] + '\n');
  }
  const markers = markdown.match(/<!-- readme-example/g)?.length ?? 0;
  if (markers !== out.size) throw new Error(`README: ${markers} readme-example markers, ${out.size} of them directly before a \`\`\`ts block`);
  return out;
}

const examples = readmeExamples(readFileSync(join(repoRoot, 'README.md'), 'utf8'));
const tsxLoader = fileURLToPath(import.meta.resolve('tsx'));

test.after.always(removePackageBuild);

/** The example's file in the build folder (.mts: an ES module, so top-level await works). */
async function exampleFile(name: string): Promise<string> {
  const build = await packageBuild();
  const dir = join(build.root, 'readme');
  mkdirSync(dir, { recursive: true });
  const file = join(dir, `${name}.mts`);
  writeFileSync(file, examples.get(name) ?? '');
  return file;
}

/** Runs an example in a fresh working folder with tsx; fails the test with its output unless it exits 0 and quietly. */
async function runExample(t: ExecutionContext, name: string, args: string[] = []): Promise<{ stdout: string; cwd: string }> {
  const file = await exampleFile(name);
  const cwd = mkdtempSync(join((await packageBuild()).root, `run-${name}-`));
  const env = { ...process.env };
  delete env.NODE_OPTIONS;
  const r = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
    execFile(process.execPath, ['--import', tsxLoader, file, ...args], { cwd, env, maxBuffer: 1 << 24 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr }),
    );
  });
  t.log(r.stdout.trimEnd());
  t.is(r.code, 0, `example '${name}' failed:\n${r.stdout}\n${r.stderr}`);
  t.is(r.stderr, '', `example '${name}' wrote to stderr`);
  return { stdout: r.stdout, cwd };
}

test('the README marks one runnable example per tier', (t) => {
  t.deepEqual([...examples.keys()].sort(), [...EXAMPLES].sort());
  for (const [name, code] of examples) t.regex(code, /from 'scalekv(\/\w+)?'/, `${name} imports the package by name`);
});

test('the README examples type-check against the package declarations (moduleResolution nodenext, strict)', async (t) => {
  const build = await packageBuild();
  const files = await Promise.all(EXAMPLES.map(exampleFile));
  const config = join(build.root, 'readme', 'tsconfig.json');
  writeFileSync(
    config,
    JSON.stringify({
      compilerOptions: {
        module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', strict: true, noEmit: true, skipLibCheck: true, types: ['node'],
        typeRoots: [join(repoRoot, 'node_modules', '@types')],
      },
      files,
    }),
  );
  await tsc(['-p', config], build.root);
  t.pass();
});

test('README pipeline example: PNG files of the size it reports, one per prompt', async (t) => {
  const { stdout, cwd } = await runExample(t, 'pipeline');
  const m = /^(\d+) images (\d+)x(\d+), (\d+) scales/m.exec(stdout);
  if (!m) return t.fail(`unexpected output: ${stdout}`);
  const [count, width, height] = [Number(m[1]), Number(m[2]), Number(m[3])];
  t.is(count, 2);
  const pixels = [];
  for (let i = 0; i < count; i++) {
    const path = join(cwd, `image-${i}.png`);
    t.true(existsSync(path), path);
    const png = decodePng(readFileSync(path));
    t.like(png, { width, height, channels: 3 });
    pixels.push(png.data);
  }
  t.notDeepEqual(pixels[0], pixels[1], 'two prompts, two different images');
});

test('README engine example: the GEMM runs, is profiled, and a bad shape is a coded error', async (t) => {
  const { stdout } = await runExample(t, 'engine');
  t.regex(stdout, /op: 'gemm', (path: '\w+', )?count: 1/); // path: the library that ran it (oneDNN where installed)
  t.regex(stdout, /^ERR_SHAPE /m);
});

test('README kv example: a planned 2B memory figure, a calibrated plan that shrinks the cache, PSNR and SSIM', async (t) => {
  const { stdout } = await runExample(t, 'kv');
  const plan = /^2B batch 8, scalekv: KV (\d+) MiB, peak ([\d.]+) GiB$/m.exec(stdout);
  t.truthy(plan, stdout);
  if (plan) t.true(Number(plan[1]) > 0 && Number(plan[2]) * 1024 > Number(plan[1]));
  t.regex(stdout, /^drafters: layer \d+ @ scale \d+/m);
  const fid = /^KV (\d+) -> (\d+) bytes; PSNR ([\d.]+|Infinity) dB, SSIM (-?[\d.]+)$/m.exec(stdout);
  if (!fid) return t.fail(`unexpected output: ${stdout}`);
  t.true(Number(fid[2]) < Number(fid[1]), 'the ScaleKV cache is smaller than the full one');
  t.true(Number(fid[3]) > 0);
  t.true(Number(fid[4]) > 0 && Number(fid[4]) <= 1);
});

test('README verify example: the official rope2d fixture passes', async (t) => {
  const dir = goldenDir('rope2d');
  if (!dir) {
    t.log('NOTICE: no golden fixtures (../shared/golden or $SCALEKV_GOLDEN): README verify example not run');
    return t.pass();
  }
  const { stdout } = await runExample(t, 'verify', [dir]);
  t.regex(stdout, /^rope2d on cpu: pass, 0 recorded tensors left unchecked$/m);
  t.notRegex(stdout, /^FAIL/m);
});
