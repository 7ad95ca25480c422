#!/usr/bin/env node
// `npm run package -- --out DIR`: every npm package of a release, as tarballs in DIR, built from this checkout:
//   scalekv-<v>.tgz                    the library (dist with types, the sources a source build needs, the license),
//                                      its manifest listing the platform packages below as optionalDependencies
//   scalekv-linux-x64-<v>.tgz          @scalekv/linux-x64: the prebuilt addon with the cpu and emu backends
//   scalekv-linux-x64-cuda-<v>.tgz     @scalekv/linux-x64-cuda: the same plus cuda (static cudart: loads without a GPU)
// Each platform package holds scalekv.node and the shared libraries it needs beyond a base glibc system (oneDNN,
// libgomp, Boost.Context, the OpenCL loader oneDNN links), found beside it through the addon's $ORIGIN rpath, with
// their copyright files. The repository's own package.json lists no optionalDependencies: they are this release's
// packages, made here, and an `npm ci` of the repository must never fetch a package of that name from the registry.
// The native build (build-package/native) is incremental: a second run relinks only what changed.
import { spawnSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, readFileSync, realpathSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { buildablePrerequisites } from './build-native.mjs';
import { PREBUILT_PLATFORMS, PREBUILT_SCOPE, PREBUILT_VARIANTS, currentPlatform } from './prebuilt.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const work = join(root, 'build-package');
// Machine code for every data-centre and workstation Ampere/Ada/Hopper part (sm_80 A100, sm_86 RTX 30xx/A40,
// sm_89 RTX 40xx/L4/L40, sm_90 H100) plus compute_90 PTX that newer GPUs JIT-compile: a user's GPU runs code built
// for it without a first-launch compile. The development build (CMakeLists.txt) keeps sm_80 + sm_90 + PTX, which
// covers the same GPUs (sm_86/89 through the sm_80 code) at half the compile time of every edit.
const CUDA_ARCHITECTURES = '80-real;86-real;89-real;90-real;90-virtual';
// Libraries every glibc system that runs Node has: never bundled (Node itself links libstdc++ and libgcc_s).
const SYSTEM_LIBRARIES = /^(linux-vdso|ld-linux|libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s)\.so/;

function die(message) {
  console.error(`package: ${message}`);
  process.exit(1);
}

function sh(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', maxBuffer: 256 << 20, ...opts });
  if (r.status !== 0) die(`${cmd} ${args.join(' ')} failed:\n${r.stdout ?? ''}${r.stderr ?? ''}${r.error ?? ''}`);
  return r.stdout;
}

const { values } = parseArgs({ options: { out: { type: 'string' } } });
if (!values.out) die('usage: npm run package -- --out DIR');
const out = resolve(values.out);
const platform = currentPlatform();
if (platform.unsupported) die(platform.unsupported);
const pre = buildablePrerequisites();
// A release without a backend would be a quieter package, not a smaller one: every prerequisite is required.
const missing = Object.entries(pre.why).filter(([, why]) => why).map(([b, why]) => `${b}: ${why}`);
if (!existsSync('/usr/include/oneapi/dnnl/dnnl.hpp')) missing.push('oneDNN: apt-get install libdnnl-dev');
if (missing.length) die(`cannot build every platform package here: ${missing.join('; ')}`);
const manifest = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
const { version } = manifest;
const started = performance.now();
const stamp = () => `[${((performance.now() - started) / 1000).toFixed(0)} s]`;

// 1. The native build: one tree, two addons from the same objects (CMakeLists.txt SCALEKV_CPU_ADDON).
console.log(`package ${stamp()}: native build in build-package/native (cuda ${CUDA_ARCHITECTURES}), log build-package/native.log`);
const buildArgs = ['build', '--out', join(work, 'native'), '--CDSCALEKV_EMU=ON', '--CDSCALEKV_EMU_TESTS=OFF', '--CDSCALEKV_CPU_ADDON=ON',
  '--CDSCALEKV_CUDA=ON', `--CDSCALEKV_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}`];
if (process.env.SCALEKV_BUILD_JOBS) buildArgs.push('--parallel', process.env.SCALEKV_BUILD_JOBS);
mkdirSync(work, { recursive: true });
const build = spawnSync(join(root, 'node_modules', '.bin', 'cmake-js'), buildArgs, { cwd: root, encoding: 'utf8', maxBuffer: 1 << 30 });
writeFileSync(join(work, 'native.log'), `${build.stdout ?? ''}${build.stderr ?? ''}${build.error ?? ''}`);
if (build.status !== 0) die(`the native build failed (build-package/native.log):\n${`${build.stdout}${build.stderr}`.split('\n').slice(-40).join('\n')}`);

// 2. The platform packages.
const addons = { '-cuda': join(work, 'native', 'Release', 'scalekv.node'), '': join(work, 'native', 'Release', 'scalekv-cpu.node') };
const stageRoot = join(work, 'stage');
rmSync(stageRoot, { recursive: true, force: true });
// DIR may hold other files (or be the user's own folder): only the tarballs of this release are written there.
mkdirSync(out, { recursive: true });
console.log(`package ${stamp()}: the platform packages`);
const optionalDependencies = {};
const tarballs = [];
for (const variant of PREBUILT_VARIANTS) {
  const name = `${PREBUILT_SCOPE}/${platform.key}${variant.suffix}`;
  const stage = join(stageRoot, basename(name));
  mkdirSync(join(stage, 'licenses'), { recursive: true });
  copyFileSync(addons[variant.suffix], join(stage, 'scalekv.node'));
  const bundled = bundleLibraries(stage);
  const backends = sh(process.execPath, ['-p', "require('./scalekv.node').backends().join(',')"], { cwd: stage }).trim().split(',');
  if (backends.join() !== variant.backends.join()) die(`${name}: the addon has backends ${backends}, expected ${variant.backends}`);
  copyFileSync(join(root, 'LICENSE'), join(stage, 'LICENSE'));
  writeFileSync(join(stage, 'package.json'), JSON.stringify({
    name,
    version,
    description: `scalekv's prebuilt native addon for ${platform.key} (glibc): backends ${backends.join(', ')}` +
      (variant.suffix === '-cuda' ? `; CUDA ${CUDA_ARCHITECTURES.replaceAll(';', ', ')}, static CUDA runtime` : ''),
    license: 'MIT',
    repository: manifest.repository,
    ...PREBUILT_PLATFORMS[platform.key],
    files: ['scalekv.node', ...bundled, 'licenses', 'LICENSE'],
    scalekv: { backends, ...(variant.suffix === '-cuda' ? { cudaArchitectures: CUDA_ARCHITECTURES.split(';') } : {}), bundledLibraries: bundled },
  }, null, 2) + '\n');
  writeFileSync(join(stage, 'README.md'), `# ${name}\n\nThe prebuilt native addon of [scalekv](https://www.npmjs.com/package/scalekv) for ${platform.key} ` +
    `with glibc: backends ${backends.join(', ')}. Installed by \`npm install scalekv\` as an optional dependency; not used on its own.\n` +
    `Bundled shared libraries (their copyright files in licenses/): ${bundled.join(', ')}.\n`);
  optionalDependencies[name] = version;
  tarballs.push(pack(stage));
}

// 3. The main package: exactly the files `npm pack` takes from this checkout, a fresh dist/, the manifest with the
// platform packages.
console.log(`package ${stamp()}: the library (tsc)`);
const stage = join(stageRoot, 'scalekv');
const listed = JSON.parse(sh('npm', ['pack', '--dry-run', '--json', '--ignore-scripts']))[0].files.map((f) => f.path);
for (const file of listed) if (!file.startsWith('dist/')) cpSync(join(root, file), join(stage, file));
// No source maps: the TypeScript sources they point at are not shipped.
sh(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(root, 'tsconfig.json'), '--outDir', join(stage, 'dist'), '--sourceMap', 'false']);
// Of the scripts, only the install script means anything outside this repository (the rest need its tests and tools,
// and npm lists every install-time script of a dependency to its user).
writeFileSync(join(stage, 'package.json'), JSON.stringify({ ...manifest, scripts: { install: manifest.scripts.install }, optionalDependencies }, null, 2) + '\n');
tarballs.unshift(pack(stage));

for (const t of tarballs) console.log(`package: ${t.file}  ${(t.size / 2 ** 20).toFixed(1)} MiB packed, ${(t.unpacked / 2 ** 20).toFixed(1)} MiB installed`);
console.log(`package ${stamp()}: ${tarballs.length} tarballs in ${out}`);

/**
 * Copies the non-system shared libraries the staged addon loads (as `ldd` resolves them on this machine) beside it,
 * each under the soname the loader asks for, and their Debian copyright files into licenses/. Returns their names.
 * Then checks that the staged addon resolves every bundled library to its own folder ($ORIGIN), not the system's.
 */
function bundleLibraries(stage) {
  const addon = join(stage, 'scalekv.node');
  const needed = [...sh('ldd', [addon]).matchAll(/^\s*(\S+) => (\/\S+)/gm)].filter(([, soname]) => !SYSTEM_LIBRARIES.test(soname));
  for (const [, soname, path] of needed) {
    copyFileSync(realpathSync(path), join(stage, soname));
    const owner = spawnSync('dpkg', ['-S', realpathSync(path)], { encoding: 'utf8' }).stdout?.split(':')[0];
    const copyright = owner ? `/usr/share/doc/${owner}/copyright` : undefined;
    if (!copyright || !existsSync(copyright)) die(`no copyright file for ${path} (dpkg -S found '${owner ?? ''}')`);
    copyFileSync(copyright, join(stage, 'licenses', `${soname}.copyright`));
  }
  const resolved = sh('ldd', [addon]);
  for (const [, soname] of needed) if (!resolved.includes(`${soname} => ${join(stage, soname)}`)) die(`${soname} is not found beside the addon:\n${resolved}`);
  return needed.map(([, soname]) => soname).sort();
}

function pack(dir) {
  const [info] = JSON.parse(sh('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', out], { cwd: dir }));
  return { file: info.filename, size: statSync(join(out, info.filename)).size, unpacked: info.unpackedSize };
}
