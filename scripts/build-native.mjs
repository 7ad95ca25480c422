#!/usr/bin/env node
// Builds the native addon from this package's sources: `buildFromSource` is what `scalekv build` runs, and this file
// run as a script is the package's install script. The install script does nothing when a prebuilt platform package
// that fits this machine is installed and loads (scripts/prebuilt.mjs); otherwise it builds every backend this machine
// can: cmake-js for CPU, CUDA when nvcc is found and the SIMT emulator when Boost.Context is installed; node-gyp
// CPU-only only where CMake is absent and nothing else could be built. A backend that could be built but was not is
// a failure, never a quieter addon. The full build log goes to <build dir>/build.log.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { delimiter, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { prebuiltAddonPath, prebuiltPackageNames } from './prebuilt.mjs';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
export const BACKENDS = ['cpu', 'cuda', 'emu'];

/** A build that cannot do what was asked: the message says why and what to do. */
export class NativeBuildError extends Error {}

function run(cmd, args, logFile) {
  const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', maxBuffer: 256 << 20, env: process.env });
  const log = `$ ${cmd} ${args.join(' ')}\n${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}\n`;
  mkdirSync(dirname(logFile), { recursive: true });
  writeFileSync(logFile, log, { flag: 'a' });
  return { ok: r.status === 0, log };
}

/** The first `name` on PATH, or undefined. */
function onPath(name) {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) if (dir && existsSync(join(dir, name))) return join(dir, name);
  return undefined;
}

/** A tool of this package's own dependencies (node_modules/.bin, here or hoisted beside it), else from PATH. */
function bin(name) {
  for (const dir of [join(root, 'node_modules', '.bin'), join(root, '..', '.bin'), join(root, '..', '..', '.bin')])
    if (existsSync(join(dir, name))) return join(dir, name);
  return name;
}

/** What this machine can build, and why not where it cannot. */
export function buildablePrerequisites() {
  const nvcc = process.env.CUDACXX || onPath('nvcc');
  const cmake = onPath('cmake');
  const boostContext = existsSync('/usr/include/boost/context/detail/fcontext.hpp');
  return {
    cmake,
    nvcc,
    why: {
      cpu: cmake || onPath('g++') || onPath('c++') ? undefined : 'no C++ compiler found',
      cuda: !cmake ? 'CMake not found (it drives the CUDA build)' : !nvcc ? 'nvcc not found (install the CUDA toolkit, or set CUDACXX)' : undefined,
      emu: !cmake ? 'CMake not found (it drives the emulator build)' : !boostContext ? 'Boost.Context not found (apt-get install libboost-context-dev)' : undefined,
    },
  };
}

/**
 * Builds the addon into build-cmake/ (or build/ for node-gyp). `backends`: the ones required (each must build, or
 * this throws saying why it cannot); undefined: every backend this machine can build, and a skipped one is reported
 * with its reason. Returns the backends built and one line per skipped backend or slower path.
 */
export function buildFromSource({ backends, jobs = process.env.SCALEKV_BUILD_JOBS } = {}) {
  const pre = buildablePrerequisites();
  const wanted = backends ?? BACKENDS.filter((b) => !pre.why[b] && !(b === 'cuda' && process.env.SCALEKV_CUDA === '0') && !(b === 'emu' && process.env.SCALEKV_EMU === '0'));
  const notes = BACKENDS.filter((b) => !wanted.includes(b) && !backends).map((b) =>
    `${b} skipped: ${pre.why[b] ?? (b === 'cuda' ? 'SCALEKV_CUDA=0' : 'SCALEKV_EMU=0')}`);
  const impossible = wanted.filter((b) => pre.why[b]).map((b) => `${b}: ${pre.why[b]}`);
  if (impossible.length) throw new NativeBuildError(`cannot build ${impossible.join('; ')}`);
  if (!wanted.includes('cpu')) throw new NativeBuildError('every addon has the cpu backend: add it to --backend');

  if (!pre.cmake) {
    // Only the CPU backend was asked for or possible: node-gyp builds it without CMake (npm ships node-gyp).
    const r = buildWithGyp();
    if (!r.ok) throw new NativeBuildError(`CMake not found and node-gyp failed (see build/build.log):\n${tail(r.log)}`);
    return { tool: 'node-gyp', backends: ['cpu'], notes: [...notes, 'CMake not found: built with node-gyp', ...cpuLibraryNotes(join(root, 'build'))] };
  }

  const buildDir = join(root, 'build-cmake');
  const logFile = join(buildDir, 'build.log');
  mkdirSync(buildDir, { recursive: true });
  writeFileSync(logFile, '');
  const args = ['rebuild', '--out', 'build-cmake', `--CDSCALEKV_EMU=${wanted.includes('emu') ? 'ON' : 'OFF'}`,
    `--CDSCALEKV_CUDA=${wanted.includes('cuda') ? 'ON' : 'OFF'}`];
  if (process.env.SCALEKV_ONEDNN === '0') args.push('--CDSCALEKV_ONEDNN=OFF');
  if (jobs) args.push('--parallel', String(jobs));
  const r = run(bin('cmake-js'), args, logFile);
  if (!r.ok) throw new NativeBuildError(`cmake-js failed (full log: ${logFile}):\n${tail(r.log)}`);
  const addon = join(buildDir, 'Release', 'scalekv.node');
  // A build that links but cannot be loaded (e.g. static TLS exhausted) must fail here, not at first use.
  const loads = run(process.execPath, ['-e', `require(${JSON.stringify(addon)})`], logFile);
  if (!loads.ok) {
    rmSync(addon, { force: true });
    throw new NativeBuildError(`the built addon does not load (full log: ${logFile}):\n${tail(loads.log)}`);
  }
  const built = readFileSync(join(buildDir, 'backends.txt'), 'utf8').trim().split('+');
  const missing = wanted.filter((b) => !built.includes(b));
  if (missing.length) {
    rmSync(addon, { force: true });
    throw new NativeBuildError(`the build has no ${missing.join(', ')} backend although this machine should build it` +
      `${missing.includes('cuda') ? ` (nvcc: ${pre.nvcc}; CMake did not accept it)` : ''}: see ${logFile}, ` +
      `or leave it out with --backend ${built.join(',')}`);
  }
  return { tool: 'cmake-js', backends: built, notes: [...notes, ...cpuLibraryNotes(buildDir)] };
}

function tail(log) {
  return log.split('\n').slice(-40).join('\n');
}

function cpuLibraryNotes(buildDir) {
  const file = join(buildDir, 'cpu-library.txt');
  const library = existsSync(file) ? readFileSync(file, 'utf8').trim() : 'builtin';
  if (library === 'onednn') return [];
  return [process.env.SCALEKV_ONEDNN === '0' ? 'oneDNN disabled (SCALEKV_ONEDNN=0): builtin CPU GEMM and convolution'
    : 'oneDNN not found (apt-get install libdnnl-dev): builtin CPU GEMM and convolution, several times slower'];
}

/** The CPU-only node-gyp build, against the running Node's own headers when they are installed (nothing downloaded). */
export function buildWithGyp() {
  const gyp = process.env.npm_config_node_gyp || bin('node-gyp');
  const args = ['rebuild'];
  const nodePrefix = dirname(dirname(process.execPath));
  if (!process.env.npm_config_nodedir && existsSync(join(nodePrefix, 'include/node/node_api.h'))) args.push(`--nodedir=${nodePrefix}`);
  const logFile = join(root, 'build', 'build.log');
  return gyp.endsWith('.js') ? run(process.execPath, [gyp, ...args], logFile) : run(gyp, args, logFile);
}

/** The installed prebuilt package that fits this machine and loads, with its backends; undefined if none. */
export function loadablePrebuilt() {
  for (const name of prebuiltPackageNames()) {
    const path = prebuiltAddonPath(name, root);
    if (!path || !existsSync(path)) continue;
    const r = spawnSync(process.execPath, ['-p', `require(${JSON.stringify(path)}).backends().join(', ')`], { encoding: 'utf8' });
    if (r.status === 0) return { name, path, backends: r.stdout.trim() };
  }
  return undefined;
}

function installScript() {
  if (process.env.SCALEKV_SKIP_NATIVE === '1') {
    console.log('scalekv: SCALEKV_SKIP_NATIVE=1, native addon not built');
    return 0;
  }
  const prebuilt = loadablePrebuilt();
  if (prebuilt) {
    console.log(`scalekv: using the prebuilt addon of ${prebuilt.name} (backends: ${prebuilt.backends}); nothing to build`);
    return 0;
  }
  try {
    const r = buildFromSource();
    console.log(`scalekv: built the native addon with ${r.tool}, backends: ${r.backends.join(', ')}${r.notes.length ? ` (${r.notes.join('; ')})` : ''}`);
    return 0;
  } catch (e) {
    if (!(e instanceof NativeBuildError)) throw e;
    console.error(`scalekv: native build failed: ${e.message}`);
    return 1;
  }
}

if (process.argv[1] && realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) process.exitCode = installScript();
