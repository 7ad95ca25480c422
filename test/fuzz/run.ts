/**
 * `npm run fuzz -- [--minutes N] [--runs N] [--parser name] [--seed S] [--corpus DIR]`: a long campaign over every
 * fuzzed parser (or one), the time split evenly between them. Prints per parser the executions, executions per
 * second, inputs rejected and the distinct outcomes; writes the first input of each outcome to the corpus directory
 * (default fuzz-corpus/, gitignored) and a failing input to fuzz-corpus/<parser>/FAILURE.bin. Exit code 1 on a bug.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { campaign } from './harness.js';
import { TARGETS } from './targets/index.js';

const { values } = parseArgs({
  options: { minutes: { type: 'string' }, runs: { type: 'string' }, parser: { type: 'string' }, seed: { type: 'string' }, corpus: { type: 'string', default: 'fuzz-corpus' } },
});
const targets = values.parser ? TARGETS.filter((t) => t.name === values.parser) : TARGETS;
if (!targets.length) {
  process.stderr.write(`fuzz: no parser '${values.parser}' (parsers: ${TARGETS.map((t) => t.name).join(', ')})\n`);
  process.exit(2);
}
const seed = values.seed !== undefined ? Number(values.seed) : (Math.random() * 2 ** 31) >>> 0;
const minutes = values.minutes !== undefined ? Number(values.minutes) : values.runs === undefined ? 1 : undefined;
const runs = values.runs !== undefined ? Number(values.runs) : undefined;
if ((minutes !== undefined && !(minutes > 0)) || (runs !== undefined && !(Number.isSafeInteger(runs) && runs > 0)) || !Number.isSafeInteger(seed)) {
  process.stderr.write('fuzz: --minutes must be a positive number, --runs a positive integer, --seed an integer\n');
  process.exit(2);
}
process.stdout.write(`fuzz: seed ${seed}, ${minutes !== undefined ? `${minutes} min` : `${runs} inputs per parser`} over ${targets.map((t) => t.name).join(', ')}\n`);
let total = 0;
let failed = false;
for (const target of targets) {
  const stats = await campaign(target, { seed, runs, ms: minutes !== undefined ? (minutes * 60_000) / targets.length : undefined });
  total += stats.executions;
  const dir = join(values.corpus!, target.name);
  mkdirSync(dir, { recursive: true });
  const kinds = [...stats.kinds].sort((a, b) => b[1].count - a[1].count);
  kinds.forEach(([, k], i) => writeFileSync(join(dir, `kept-${String(i).padStart(3, '0')}.bin`), k.input));
  const rate = stats.executions / (stats.ms / 1000);
  process.stdout.write(
    `\n${target.name}: ${stats.executions} executions in ${(stats.ms / 1000).toFixed(1)} s (${rate.toFixed(0)}/s), ${stats.rejected} rejected, ` +
      `${stats.kinds.size} distinct outcomes, corpus ${dir}/ (${kinds.length} files)\n`,
  );
  for (const [kind, k] of kinds) process.stdout.write(`  ${String(k.count).padStart(8)}  ${kind}\n`);
  if (stats.failure) {
    failed = true;
    writeFileSync(join(dir, 'FAILURE.bin'), stats.failure.input);
    process.stdout.write(`  BUG (seed ${stats.failure.seed}, path ${stats.failure.path}): ${stats.failure.error}\n  input: ${join(dir, 'FAILURE.bin')}\n`);
  }
}
process.stdout.write(`\nfuzz: ${total} executions in all; ${failed ? 'BUGS FOUND' : 'no bugs found'}\n`);
process.exitCode = failed ? 1 : 0;
