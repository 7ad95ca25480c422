#!/usr/bin/env node
// Builds the native addon: cmake-js first (CPU + CUDA when nvcc is found, + the SIMT emulator backend when
// its Boost.Context dependency is present), node-gyp CPU-only as the fallback. Prints one line saying
// which backends were built; the full build log goes to <build dir>/build.log.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
if (process.env.SCALEKV_SKIP_NATIVE === '1') {
  console.log('scalekv: SCALEKV_SKIP_NATIVE=1, native addon not built');
  process.exit(0);
}

function run(cmd, args, logFile) {
  const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', maxBuffer: 256 << 20, env: process.env });
  const log = `$ ${cmd} ${args.join(' ')}\n${r.stdout ?? ''}${r.stderr ?? ''}${r.error ? String(r.error) : ''}\n`;
  mkdirSync(dirname(logFile), { recursive: true });
  writeFileSync(logFile, log, { flag: 'a' });
  return { ok: r.status === 0, log };
}

function has(cmd) {
  return spawnSync(cmd, ['--version'], { encoding: 'utf8' }).status === 0;
}

function bin(name) {
  const local = join(root, 'node_modules', '.bin', name);
  return existsSync(local) ? local : name;
}

const emuWanted = process.env.SCALEKV_EMU !== '0' && existsSync(join(root, 'kernels/emu/emu.cmake'));
const boostContext = existsSync('/usr/include/boost/context/detail/fcontext.hpp');
const emu = emuWanted && boostContext;
let failure = '';

if (has('cmake')) {
  const logFile = join(root, 'build-cmake', 'build.log');
  mkdirSync(join(root, 'build-cmake'), { recursive: true });
  writeFileSync(logFile, '');
  const args = ['rebuild', '--out', 'build-cmake', `--CDSCALEKV_EMU=${emu ? 'ON' : 'OFF'}`];
  if (process.env.SCALEKV_CUDA === '0') args.push('--CDSCALEKV_CUDA=OFF');
  if (process.env.SCALEKV_ONEDNN === '0') args.push('--CDSCALEKV_ONEDNN=OFF');
  const jobs = process.env.SCALEKV_BUILD_JOBS;
  if (jobs) args.push('--parallel', jobs);
  const r = run(bin('cmake-js'), args, logFile);
  // A build that links but cannot be loaded (e.g. static TLS exhausted) must fail here, not at first use.
  const loads = r.ok && run(process.execPath, ['-e', "require('./build-cmake/Release/scalekv.node')"], logFile).ok;
  if (r.ok && !loads) {
    failure = 'the cmake-js addon does not load (see build-cmake/build.log)';
    rmSync(join(root, 'build-cmake', 'Release', 'scalekv.node'), { force: true });
  }
  if (loads) {
    const backends = readFileSync(join(root, 'build-cmake', 'backends.txt'), 'utf8').trim().split('+');
    const notes = [];
    if (!backends.includes('cuda')) notes.push('nvcc not found: CPU-only build');
    if (emuWanted && !boostContext) notes.push('emu backend skipped: install libboost-context-dev');
    const cpuLibrary = readFileSync(join(root, 'build-cmake', 'cpu-library.txt'), 'utf8').trim();
    if (cpuLibrary !== 'onednn')
      notes.push(process.env.SCALEKV_ONEDNN === '0' ? 'oneDNN disabled (SCALEKV_ONEDNN=0): builtin CPU GEMM and convolution'
        : 'oneDNN not found (apt-get install libdnnl-dev): builtin CPU GEMM and convolution, several times slower');
    console.log(`scalekv: built the native addon with cmake-js, backends: ${backends.join(', ')}` +
      (notes.length ? ` (${notes.join('; ')})` : ''));
    process.exit(0);
  }
  failure ||= `cmake-js failed (see build-cmake/build.log)`;
  process.stderr.write(r.log.split('\n').slice(-40).join('\n') + '\n');
} else {
  failure = 'cmake not found';
}

// Build against the running Node's own headers when they are installed, rather than downloading them.
const gyp = process.env.npm_config_node_gyp || bin('node-gyp');
const gypArgs = gyp.endsWith('.js') ? [gyp, 'rebuild'] : ['rebuild'];
const nodePrefix = dirname(dirname(process.execPath));
if (!process.env.npm_config_nodedir && existsSync(join(nodePrefix, 'include/node/node_api.h')))
  gypArgs.push(`--nodedir=${nodePrefix}`);
const r = run(gyp.endsWith('.js') ? process.execPath : gyp, gypArgs, join(root, 'build', 'build.log'));
if (r.ok) {
  console.log(`scalekv: ${failure}; built the CPU-only addon with node-gyp, backends: cpu`);
  process.exit(0);
}
process.stderr.write(r.log.split('\n').slice(-40).join('\n') + '\n');
console.error(`scalekv: native build failed (${failure}; node-gyp failed too, see build/build.log)`);
process.exit(1);
