#!/usr/bin/env node
// The CPU op suites again at every instruction-set level below this machine's highest (the plain `ava` run covers
// the highest): SCALEKV_CPU_ISA caps the level the handwritten kernels dispatch to (kernels/cpu/isa.h), and each
// suite compares its op against a float64 reference, so every compiled path is checked, not just the fastest.
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
// The suites of the ops with per-level kernels: attention, segmentAttention, crossAttention, layerNorm, groupNorm.
const suites = ['test/attention.test.ts', 'test/segment-attention.test.ts', 'test/transformer-ops.test.ts', 'test/latent-ops.test.ts'];
// The addon the suites will load (lib/native.ts: $SCALEKV_ADDON, else the cmake-js build, else node-gyp's).
const addon = process.env.SCALEKV_ADDON ?? ['build-cmake/Release/scalekv.node', 'build/Release/scalekv.node'].map((p) => join(root, p)).find(existsSync);
if (!addon) {
  console.log('NOTICE: no native addon built; instruction-set levels not tested');
  process.exit(0);
}
const highest = createRequire(import.meta.url)(addon).cpuIsa();
const levels = ['generic', 'avx2', 'avx512'];
let failed = 0;
for (const level of levels.slice(0, levels.indexOf(highest))) {
  const started = Date.now();
  const r = spawnSync('npx', ['ava', ...suites], {
    cwd: root, stdio: ['ignore', 'pipe', 'pipe'], encoding: 'utf8',
    env: { ...process.env, SCALEKV_CPU_ISA: level, SCALEKV_TEST_BACKENDS: 'cpu' },
  });
  const seconds = ((Date.now() - started) / 1000).toFixed(1);
  if (r.status === 0) console.log(`test-isa: cpu op suites at ${level} passed (${seconds} s)`);
  else {
    console.error(`${r.stdout}${r.stderr}\ntest-isa: cpu op suites at ${level} FAILED (exit ${r.status ?? r.signal}, ${seconds} s)`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
