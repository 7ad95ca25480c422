#!/usr/bin/env node
// `npm run test:sanitize [-- ava arguments]`: builds the addon with AddressSanitizer + UndefinedBehaviorSanitizer
// (CPU and emu backends, build-sanitize/) and runs ava against it — the whole suite by default, or the files and
// options given. node is not instrumented, so the sanitizer runtime is preloaded into it (and into ava's worker
// processes); every report is fatal (halt_on_error, -fno-sanitize-recover), so a report fails the run. Leak
// checking is off: node's own allocations at exit are not the addon's. The golden fixtures are read as usual.
// `npm run test:tsan`: ThreadSanitizer (build-tsan/, the CPU backend on its own thread pool: oneDNN's OpenMP
// runtime is not instrumented) over test/native/concurrency_check.cc, the thread pool and the engine queue; an
// uninstrumented node would drown the addon's reports in its own threads' accesses.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const thread = process.argv[2] === '--thread';
const sanitizers = thread ? 'thread' : 'address,undefined';
const buildDir = join(root, thread ? 'build-tsan' : 'build-sanitize');

function run(cmd, args, env = process.env) {
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', env });
  if (r.status !== 0) process.exit(r.status ?? 1);
}

function runtime(name) {
  const r = spawnSync('gcc', [`-print-file-name=${name}`], { encoding: 'utf8' });
  const path = r.stdout.trim();
  if (r.status !== 0 || !existsSync(path)) {
    console.error(`test:sanitize: the sanitizer runtime ${name} was not found (gcc -print-file-name=${name})`);
    process.exit(1);
  }
  return path;
}

const cmakeJs = join(root, 'node_modules', '.bin', 'cmake-js');
const started = Date.now();
run(cmakeJs, ['build', '--out', buildDir, `--CDSCALEKV_SANITIZE=${sanitizers}`, ...(thread ? ['--CDSCALEKV_EMU=OFF', '--CDSCALEKV_ONEDNN=OFF'] : ['--CDSCALEKV_EMU=ON'])]);
console.log(`test:sanitize: built ${buildDir} (${sanitizers}) in ${((Date.now() - started) / 1000).toFixed(0)} s`);

const env = {
  ...process.env,
  SCALEKV_ADDON: join(buildDir, 'Release', 'scalekv.node'),
  SCALEKV_SANITIZED: sanitizers,
  // The TSan harness is an instrumented executable of its own; node needs the ASan runtime preloaded.
  LD_PRELOAD: (thread ? [process.env.LD_PRELOAD] : [runtime('libasan.so'), process.env.LD_PRELOAD]).filter(Boolean).join(':'),
  ASAN_OPTIONS: 'halt_on_error=1:abort_on_error=1:detect_leaks=0:detect_odr_violation=0',
  UBSAN_OPTIONS: 'halt_on_error=1:abort_on_error=1:print_stacktrace=1',
  TSAN_OPTIONS: 'halt_on_error=1:abort_on_error=1:second_deadlock_stack=1',
};
if (thread) {
  run(join(buildDir, 'concurrency_check'), [], env);
} else {
  // Sanitized code runs several times slower: the per-test timeout grows with it.
  run(process.execPath, [join(root, 'node_modules', 'ava', 'entrypoints', 'cli.mjs'), '--timeout=60m', ...process.argv.slice(2)], env);
}
console.log(`test:sanitize: no sanitizer report (${sanitizers}), ${((Date.now() - started) / 1000).toFixed(0)} s in all`);
