// The package as another project gets it: the tarballs of `npm run package -- --out DIR` (every package of a release,
// SCALEKV_PACKAGES=DIR; .ci/run makes them) installed into fresh projects:
// - all of them with --ignore-scripts (npm's allowScripts world: the prebuilt platform package alone must do) and
//   with the install script allowed (it must find the prebuilt and build nothing). In each, the README's "Use it from
//   your project" example runs with plain Node and writes its PNG, `scalekv info --json` lists every backend of the
//   CUDA package (cuda built, no device needed), the addon resolves its bundled libraries beside itself, and each
//   platform package runs the example with the system's copies of those libraries hidden, as on a machine without them;
// - the library alone: its first use says how to build the addon, and `scalekv build` then does, from the shipped
//   sources, with every backend this machine can build.
// Nothing is published; npm fetches only the registry's packages (the dependencies).
import test, { ExecutionContext } from 'ava';
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { decodePng } from '../lib/image/png.js';
import { prebuiltPackageNames } from '../scripts/prebuilt.mjs';
import { repoRoot } from './package-build.js';

const packagesDir = process.env.SCALEKV_PACKAGES;
const example = /<!-- consumer-example -->\n```js\n([\s\S]*?)\n```/.exec(readFileSync(join(repoRoot, 'README.md'), 'utf8'))?.[1];
const version = (JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { version: string }).version;

interface Manifest {
  name: string;
  os?: string[];
  cpu?: string[];
  libc?: string[];
  optionalDependencies?: Record<string, string>;
  scalekv?: { backends: string[]; bundledLibraries: string[] };
}

/** A tarball's file list and its package.json. */
function readTarball(file: string): { files: string[]; manifest: Manifest } {
  const list = spawnSync('tar', ['-tzf', file], { encoding: 'utf8' });
  const pkg = spawnSync('tar', ['-xzOf', file, 'package/package.json'], { encoding: 'utf8' });
  return { files: list.stdout.trim().split('\n').map((f) => f.replace(/^package\//, '')), manifest: JSON.parse(pkg.stdout) as Manifest };
}

/** This version's tarballs in SCALEKV_PACKAGES (npm pack names them <name without @ and />-<version>.tgz). */
function tarballs(): string[] {
  return readdirSync(packagesDir!).filter((f) => f.endsWith(`-${version}.tgz`)).map((f) => join(packagesDir!, f));
}

/** An environment for the consumer's npm and node: none of this run's npm settings, no tsx. */
function consumerEnv(): NodeJS.ProcessEnv {
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_/i.test(k) && k !== 'NODE_OPTIONS'));
  delete env.SCALEKV_ADDON;
  return env;
}

function exec(cmd: string, args: string[], cwd: string): Promise<{ code: number; stdout: string; stderr: string; ms: number }> {
  const started = performance.now();
  return new Promise((resolve) => {
    execFile(cmd, args, { cwd, env: consumerEnv(), maxBuffer: 1 << 26 }, (err, stdout, stderr) =>
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr, ms: performance.now() - started }),
    );
  });
}

/**
 * The system's own copies of `sonames` (as the loader's cache lists them), to hide: a prebuilt package must not
 * depend on them.
 */
function systemCopies(sonames: string[]): string[] {
  const cache = spawnSync('ldconfig', ['-p'], { encoding: 'utf8' }).stdout ?? '';
  return sonames.flatMap((soname) => [...cache.matchAll(new RegExp(`^\\s*${soname.replaceAll('.', '\\.')} .*=> (\\S+)$`, 'gm'))].map((m) => realpathSync(m[1])));
}

/**
 * Runs `node args` in `cwd` as on a machine without the libraries a platform package bundles: in a private mount
 * namespace, /dev/null is bound over each system copy. Undefined where this process may not make one (not root).
 */
async function withoutSystemCopies(hide: string[], args: string[], cwd: string, env: Record<string, string> = {}) {
  if (spawnSync('unshare', ['-m', 'true']).status !== 0) return undefined;
  const mounts = ['true', ...hide.map((f) => `mount --bind /dev/null '${f}'`)].join(' && ');
  const exports = Object.entries(env).map(([k, v]) => `${k}='${v}' `).join('');
  return exec('unshare', ['-m', 'sh', '-c', `${mounts} && ${exports}exec '${process.execPath}' ${args.map((a) => `'${a}'`).join(' ')}`], cwd);
}

function skipUnlessPackages(t: ExecutionContext): boolean {
  if (packagesDir) return false;
  t.log('NOTICE: consumer install test not run: it needs the release tarballs (npm run package -- --out DIR, then SCALEKV_PACKAGES=DIR; .ci/run does both)');
  t.pass();
  return true;
}

test('the tarballs: the library lists each platform package as an optional dependency, ships no build tree, types every export', (t) => {
  if (skipUnlessPackages(t)) return;
  const all = tarballs().map((file) => ({ file, ...readTarball(file) }));
  const main = all.find((p) => p.manifest.name === 'scalekv');
  if (!main) return t.fail(`no scalekv tarball in ${packagesDir}`);
  const platforms = all.filter((p) => p !== main);
  t.deepEqual(platforms.map((p) => p.manifest.name).sort(), prebuiltPackageNames().sort());
  t.deepEqual(main.manifest.optionalDependencies, Object.fromEntries(prebuiltPackageNames().map((n) => [n, version])));
  for (const p of platforms) t.like(p.manifest, { os: ['linux'], cpu: ['x64'], libc: ['glibc'] }, p.manifest.name);
  // Nothing of a local build: no addon, object, build folder or log in the library's tarball.
  const artefacts = main.files.filter((f) => /^(build|build-cmake|build-package|node_modules)\/|\.(node|o|a|so|log)$/.test(f));
  t.deepEqual(artefacts, []);
  const exportsMap = (JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { exports: Record<string, { types?: string; import?: string }> }).exports;
  for (const [sub, target] of Object.entries(exportsMap)) {
    if (typeof target !== 'object') continue;
    for (const file of [target.types, target.import]) t.true(main.files.includes(file!.replace(/^\.\//, '')), `${sub}: ${file} is shipped`);
  }
  for (const file of ['LICENSE', 'CMakeLists.txt', 'scripts/build-native.mjs', 'csrc/addon.cc']) t.true(main.files.includes(file), file);
  // Each platform package: the addon, the libraries it bundles, their copyright files.
  for (const p of platforms) {
    t.true(p.files.includes('scalekv.node'), p.manifest.name);
    for (const lib of p.manifest.scalekv!.bundledLibraries) {
      t.true(p.files.includes(lib), `${p.manifest.name}: ${lib}`);
      t.true(p.files.includes(`licenses/${lib}.copyright`), `${p.manifest.name}: licenses/${lib}.copyright`);
    }
  }
});

/** A fresh project (removed after the test) with `npm install flags... files...` done in it. */
async function freshProject(t: ExecutionContext, flags: string[], files: string[]): Promise<{ project: string; stdout: string }> {
  const project = mkdtempSync(join(tmpdir(), 'scalekv-consumer-'));
  t.teardown(() => rmSync(project, { recursive: true, force: true }));
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true, type: 'module' }));
  const install = await exec('npm', ['install', '--no-audit', '--no-fund', '--foreground-scripts', ...flags, ...files], project);
  t.is(install.code, 0, `npm install failed:\n${install.stdout}\n${install.stderr}`);
  t.log(`npm install${flags.map((f) => ` ${f}`).join('')}: ${(install.ms / 1000).toFixed(1)} s`);
  return { project, stdout: install.stdout };
}

test('the library alone, no platform package: ERR_NATIVE_MISSING naming `npx scalekv build`, which then builds every backend this machine can from the shipped sources', async (t) => {
  if (skipUnlessPackages(t)) return;
  t.timeout(30 * 60_000);
  const main = tarballs().find((f) => readTarball(f).manifest.name === 'scalekv')!;
  // npm asks the registry for the optional platform packages, finds none of this unpublished version, goes on.
  const { project } = await freshProject(t, ['--ignore-scripts'], [main]);
  const script = "import { backendInfo } from 'scalekv'; try { backendInfo(); } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })); }";
  const r = await exec(process.execPath, ['--input-type=module', '-e', script], project);
  const err = JSON.parse(r.stdout) as { code: string; message: string };
  t.is(err.code, 'ERR_NATIVE_MISSING');
  t.regex(err.message, /no prebuilt package \(@scalekv\/linux-x64-cuda, @scalekv\/linux-x64\) is installed .*`npx scalekv build`/);

  // The source build from what the tarball ships (cmake-js its real dependency; node-api-headers, no download).
  const expected = ['cpu', ...(spawnSync('nvcc', ['--version']).status === 0 ? ['cuda'] : []),
    ...(existsSync('/usr/include/boost/context/detail/fcontext.hpp') ? ['emu'] : [])];
  const cli = join(project, 'node_modules', '.bin', 'scalekv');
  const build = await exec(cli, ['build'], project);
  t.is(build.code, 0, `scalekv build failed:\n${build.stdout}\n${build.stderr}`);
  t.regex(build.stdout, new RegExp(`^built with cmake-js: backends ${expected.join(', ')}$`, 'm'));
  t.log(`scalekv build: ${(build.ms / 1000).toFixed(0)} s, ${build.stdout.trim().split('\n').slice(1).join('; ')}`);
  const info = await exec(cli, ['info', '--json'], project);
  t.deepEqual((JSON.parse(info.stdout) as { built: string[] }).built, expected);
});

for (const scripts of [false, true]) {
  test(`a fresh project: npm install of the tarballs ${scripts ? 'with the install script' : '--ignore-scripts'}, the README example, scalekv info`, async (t) => {
    if (skipUnlessPackages(t)) return;
    if (!example) return t.fail('README: no <!-- consumer-example --> ```js block');
    t.timeout(10 * 60_000);
    const { project, stdout } = await freshProject(t, scripts ? [] : ['--ignore-scripts'], tarballs());
    const pkg = join(project, 'node_modules', 'scalekv');
    if (scripts) t.regex(stdout, /scalekv: using the prebuilt addon of @scalekv\/linux-x64-cuda \(backends: cpu, cuda, emu\); nothing to build/);
    t.false(existsSync(join(pkg, 'build-cmake')) || existsSync(join(pkg, 'build')), 'no source build: the prebuilt addon is the one loaded');

    // The bundled libraries are the ones the loader takes, not the system's (this machine has them too).
    const cudaPackage = join(project, 'node_modules', '@scalekv', 'linux-x64-cuda');
    const bundled = (JSON.parse(readFileSync(join(cudaPackage, 'package.json'), 'utf8')) as Manifest).scalekv!.bundledLibraries;
    const ldd = spawnSync('ldd', [join(cudaPackage, 'scalekv.node')], { encoding: 'utf8' }).stdout;
    for (const lib of bundled) t.true(ldd.includes(`${lib} => ${join(cudaPackage, lib)}`), `${lib} resolves beside the addon:\n${ldd}`);

    writeFileSync(join(project, 'example.mjs'), example + '\n');
    const run = await exec(process.execPath, ['example.mjs'], project);
    t.is(run.code, 0, `the README example failed:\n${run.stdout}\n${run.stderr}`);
    t.is(run.stderr, '', 'the library writes nothing to stderr');
    const png = decodePng(readFileSync(join(project, 'fox.png')));
    t.true(png.width > 0 && png.height > 0 && png.channels === 3, `fox.png ${png.width}x${png.height}`);

    // Each platform package on a machine without the system's copies of what it bundles (no libdnnl-dev etc.).
    if (!scripts) {
      for (const name of prebuiltPackageNames()) {
        const dir = join(project, 'node_modules', name);
        const manifest = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as Manifest;
        const hide = systemCopies(manifest.scalekv!.bundledLibraries);
        rmSync(join(project, 'fox.png'), { force: true });
        const bare = await withoutSystemCopies(hide, ['example.mjs'], project, { SCALEKV_ADDON: join(dir, 'scalekv.node') });
        if (!bare) {
          t.log('NOTICE: no private mount namespace here (unshare -m needs root): the platform packages were not run with the system libraries hidden');
          break;
        }
        t.is(bare.code, 0, `${name} with ${hide.join(', ')} hidden:\n${bare.stdout}\n${bare.stderr}`);
        t.regex(bare.stdout, new RegExp(`built: \\[ ${manifest.scalekv!.backends.map((b) => `'${b}'`).join(', ')} \\]`), name);
        t.true(existsSync(join(project, 'fox.png')), `${name}: fox.png written`);
        t.log(`${name}: ran with ${hide.length} system libraries hidden (${hide.map((f) => basename(f)).join(', ')})`);
      }
    }

    const info = await exec(join(project, 'node_modules', '.bin', 'scalekv'), ['info', '--json'], project);
    t.is(info.code, 0, info.stderr);
    const backends = JSON.parse(info.stdout) as { built: string[]; cuda: { available: boolean; reason: string } };
    t.deepEqual(backends.built, ['cpu', 'cuda', 'emu']);
    if (!backends.cuda.available) t.truthy(backends.cuda.reason, 'without a usable GPU the addon says why');
    t.log(`backends ${backends.built.join(', ')}; cuda ${backends.cuda.available ? 'available' : `unavailable: ${backends.cuda.reason}`}`);
  });
}
