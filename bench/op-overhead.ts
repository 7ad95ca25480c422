// Per-call overhead of an op: this build (the op-table binding) against a baseline addon built from another
// commit (default: the last commit before the op table, with its per-op methods), both loaded in this
// process and timed by the same tinybench harness on the CPU backend with ops too small to cost anything
// (1-element add, a 1-token attention over 8 keys). `npm run bench:overhead [-- --baseline <rev>] [--calls 1000] [--json]`
//
// The baseline is built once (CPU only) into build-baseline/<rev>/ from a git worktree of <rev>.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, symlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Bench } from 'tinybench';
import { loadNative, type NativeAddon, type NativeEngine, type NativeTensor } from '../lib/native.js';

const BEFORE_OP_TABLE = '8e71ad1';
const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const { values } = parseArgs({
  args: process.argv.slice(2),
  options: {
    baseline: { type: 'string', default: BEFORE_OP_TABLE },
    calls: { type: 'string', default: '1000' },
    json: { type: 'boolean', default: false },
  },
});
const calls = Number(values.calls);

function baselineAddon(rev: string): string {
  const dir = join(root, 'build-baseline', rev);
  const addon = join(dir, 'build', 'Release', 'scalekv.node');
  if (existsSync(addon)) return addon;
  mkdirSync(dir, { recursive: true });
  const src = join(dir, 'src');
  const say = (s: string) => process.stderr.write(`op-overhead: ${s}\n`);
  if (!existsSync(src)) {
    say(`checking out ${rev} into ${src}`);
    execFileSync('git', ['-C', root, 'worktree', 'add', '--detach', src, rev], { stdio: 'ignore' });
    symlinkSync(join(root, 'node_modules'), join(src, 'node_modules'));
  }
  say(`building the baseline addon (CPU only; a few minutes on 2 cores)`);
  execFileSync(join(root, 'node_modules', '.bin', 'cmake-js'), ['build', '-d', src, '--out', join(dir, 'build'), '--CDSCALEKV_CUDA=OFF', '--CDSCALEKV_EMU=OFF'], {
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  return addon;
}

interface Subject {
  label: string;
  engine: NativeEngine;
  tensors: NativeTensor[];
}

function subject(label: string, addon: Omit<NativeAddon, 'path'>): Subject {
  const engine = new addon.NativeEngine('cpu', 1);
  const t = (shape: number[]) => {
    const x = engine.tensor('f32', shape, Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => Math.sin(i + 1)));
    return x;
  };
  const tiny = [t([1]), t([1]), t([1]), t([1, 1, 1, 8]), t([1, 1, 8, 8]), t([1, 1, 8, 8]), t([1, 1, 1, 8])];
  // A GEMM of ~1 GFLOP keeps the queue busy for longer than one sample's calls take to issue.
  return { label, engine, tensors: [...tiny, t([512, 1024]), t([1024, 1024]), t([512, 1024])] };
}

const workloads = {
  'add, 1 element': (s: Subject) => {
    const [a, b, out] = s.tensors;
    const add = (s.engine as unknown as { add(args: object): void }).add.bind(s.engine);
    return () => {
      for (let i = 0; i < calls; i++) add({ a, b, out });
    };
  },
  'attention, 1 query over 8 keys': (s: Subject) => {
    const [, , , q, k, v, out] = s.tensors;
    const attention = (s.engine as unknown as { attention(args: object): void }).attention.bind(s.engine);
    return () => {
      for (let i = 0; i < calls; i++) attention({ q, curK: k, curV: v, out, scale: 0.35 });
    };
  },
};

const require = createRequire(import.meta.url);
const current = loadNative();
const baselinePath = baselineAddon(values.baseline!);
const subjects = [subject(`baseline ${values.baseline}`, require(baselinePath)), subject('op table (this build)', current)];

// Two ways to time a call: 'alone' issues the calls while the queue is busy with a large GEMM queued just
// before (untimed), so the time is the binding and the enqueue; 'with the queue' issues them into an idle
// queue and waits for them, as a burst of small ops runs, so the queue's hand-off counts too.
type Mode = 'binding alone' | 'with the queue';
const rows: { workload: string; mode: Mode; baselineNs: number; opTableNs: number; ratio: number }[] = [];
for (const mode of ['binding alone', 'with the queue'] as Mode[])
  for (const [name, make] of Object.entries(workloads)) {
    // Bounded by iterations: in 'binding alone' the untimed GEMM before each sample costs far more than the sample.
    const bench = new Bench({ time: 100, iterations: mode === 'binding alone' ? 40 : 200, warmupTime: 50, warmupIterations: 5 });
    // Alternate the two subjects so drift in the machine's speed does not favour one; medians, not means,
    // so a sample that met a page fault or a descheduling does not decide the ratio.
    for (const round of [1, 2, 3, 4])
      for (const s of subjects) {
        const run = make(s);
        const [x, w, y] = s.tensors.slice(7);
        const busy = (s.engine as unknown as { gemm(args: object): void }).gemm.bind(s.engine);
        if (mode === 'binding alone')
          bench.add(`${s.label} #${round}`, run, {
            beforeEach: () => busy({ x, w, y }),
            afterEach: () => s.engine.sync(),
          });
        else
          bench.add(`${s.label} #${round}`, async () => {
            run();
            await s.engine.sync();
          });
      }
    await bench.run();
    const ns = (label: string) => {
      const tasks = bench.tasks.filter((t) => t.name.startsWith(label));
      const medians = tasks.map((t) => (t.result as { latency: { p50: number } }).latency.p50).sort((a, b) => a - b);
      return (medians[medians.length >> 1] / calls) * 1e6;
    };
    const baselineNs = ns(subjects[0].label);
    const opTableNs = ns(subjects[1].label);
    rows.push({ workload: name, mode, baselineNs, opTableNs, ratio: opTableNs / baselineNs });
  }
for (const s of subjects) {
  for (const t of s.tensors) t.dispose();
  s.engine.dispose();
}

if (values.json) {
  process.stdout.write(JSON.stringify({ baseline: values.baseline, calls, rows }, null, 2) + '\n');
} else {
  process.stdout.write(`per-call overhead: median of ${calls} calls per sample, CPU backend, 1 thread (baseline ${values.baseline})\n`);
  process.stdout.write('| op call | timed | baseline ns/call | op table ns/call | op table / baseline |\n| --- | --- | --- | --- | --- |\n');
  for (const r of rows)
    process.stdout.write(`| ${r.workload} | ${r.mode} | ${r.baselineNs.toFixed(0)} | ${r.opTableNs.toFixed(0)} | ${r.ratio.toFixed(3)} |\n`);
}
