#!/usr/bin/env node
// The native half of `npm test`: the op table's C++ harness (test/native/op_table_check.cc), the thread pool and engine
// queue under concurrency (test/native/concurrency_check.cc), the SIMT emulator's own tests (planted bugs: missing barriers, divergent
// barriers, wrong fragment indices, out-of-bounds shared writes, bad shuffle masks — built with
// AddressSanitizer), the real kernels/cuda sources on the emulator against the CPU kernels, and the emulator's cost
// counters on planted kernels (coalescing, bank conflicts, ldmatrix swizzles, sampling). Skipped, with
// a notice, when the addon was built without the emulator (no Boost.Context).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const buildDir = join(root, 'build-cmake');
// op_table_check and concurrency_check come with every cmake-js build; the emulator's programs only with Boost.Context.
const programs = ['op_table_check', 'concurrency_check', 'emu_selftest', 'emu_kernel_check', 'emu_profile_check'];
const found = programs.map((p) => [p, [join(buildDir, p), join(buildDir, 'Release', p)].find(existsSync)]);
if (!existsSync(buildDir)) {
  console.log('NOTICE: no cmake-js build (build-cmake/); native suites skipped');
  process.exit(0);
}
if (found.slice(2).every(([, path]) => !path)) {
  console.log('NOTICE: emulator test programs not built (install libboost-context-dev and rerun npm install); emu native suite skipped');
  found.splice(2);
}
let failed = 0;
for (const [name, path] of found) {
  if (!path) {
    console.error(`test-native: ${name} was not built`);
    failed++;
    continue;
  }
  const started = Date.now();
  const r = spawnSync(path, [], { stdio: 'inherit', env: { ...process.env, ASAN_OPTIONS: process.env.ASAN_OPTIONS ?? 'detect_leaks=1' } });
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  if (r.status === 0) console.log(`test-native: ${name} passed (${seconds} s)`);
  else {
    console.error(`test-native: ${name} FAILED (exit ${r.status ?? r.signal}, ${seconds} s)`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
