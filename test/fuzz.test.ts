/**
 * A short seeded fuzz campaign per parser of user files (test/fuzz/targets), and the replay of every input a
 * campaign ever found failing (test/fuzz/regressions/<parser>/). `npm run fuzz` runs the long campaigns.
 */
import test from 'ava';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { ScaleKVError } from '../lib/errors.js';
import { campaign, type FuzzTarget, runInput } from './fuzz/harness.js';
import { TARGETS } from './fuzz/targets/index.js';
import { seedFor } from './helpers.js';

// Serial: each campaign's time and external-memory bounds measure the whole process.
/** Inputs per parser in CI: about 30 s for all ten parsers on a loaded 2-core machine (SCALEKV_FUZZ_RUNS overrides). */
const CI_RUNS = Number(process.env.SCALEKV_FUZZ_RUNS ?? 2500);
const REGRESSIONS = join(import.meta.dirname, 'fuzz', 'regressions');

for (const target of TARGETS) {
  test.serial(`fuzz ${target.name}: ${CI_RUNS} seeded inputs load as the reference says or fail with a coded error`, async (t) => {
    const seed = seedFor(t);
    const stats = await campaign(target, { seed, runs: CI_RUNS });
    t.log(`${stats.executions} executions (${(stats.executions / (stats.ms / 1000)).toFixed(0)}/s), ${stats.rejected} rejected, ${stats.kinds.size} distinct outcomes`);
    if (stats.failure) t.fail(`seed ${seed}, path ${stats.failure.path}: ${stats.failure.error}\ninput (base64): ${Buffer.from(stats.failure.input).toString('base64').slice(0, 4000)}`);
    // Both branches must be reached, or the campaign tests nothing: valid inputs load, hostile ones are refused.
    t.true(stats.kinds.has('ok'), 'no input loaded');
    t.true(stats.rejected > 0, 'no input was rejected');
  });

  const dir = join(REGRESSIONS, target.name);
  const files = existsSync(dir) ? readdirSync(dir).sort() : [];
  if (files.length)
    test.serial(`fuzz ${target.name}: the ${files.length} regression inputs fail with a coded error`, async (t) => {
      for (const file of files) {
        const outcome = await runInput(target, { bytes: readFileSync(join(dir, file)) });
        t.false(outcome.ok, `${file} loaded`);
      }
    });
}

/** A planted target: each check allocates `checkBytes` (bound: `bound`) after `delayMs`; inputs allocate `inputBytes`. */
function plantedTarget(opts: { delayMs: number; checkBytes: number; inputBytes: number; bound: number }): FuzzTarget {
  return {
    name: 'planted',
    codes: ['ERR_FORMAT'],
    inputs: fc.constant(null).map(() => ({ bytes: new Uint8Array(Buffer.alloc(opts.inputBytes, 7)) })),
    async check() {
      await new Promise((r) => setTimeout(r, opts.delayMs));
      Buffer.alloc(opts.checkBytes);
      throw new ScaleKVError('ERR_FORMAT', 'planted');
    },
    allocationBound: () => opts.bound,
  };
}

test.serial('fuzz harness: a forged allocation is a violation, inside the check and only there', async (t) => {
  const forged = await campaign(plantedTarget({ delayMs: 0, checkBytes: 1 << 20, inputBytes: 16, bound: 1024 }), { seed: 1, runs: 5 });
  t.regex(forged.failure?.error ?? '', /allocation of 1048576 bytes exceeds the bound of 1024/);
  // Input generation (here 1 MiB per input) is not the parser's doing and is never bounded.
  const generous = await campaign(plantedTarget({ delayMs: 0, checkBytes: 16, inputBytes: 1 << 20, bound: 1024 }), { seed: 1, runs: 5 });
  t.is(generous.failure, undefined);
  t.is(generous.executions, 5);
});

test.serial('fuzz harness: a check the time limit abandons is awaited, and its bound does not leak into the next campaign', async (t) => {
  // fast-check races an async run against its time limit; the slow check is still running when campaign() would
  // return, and then allocates past its bound.
  const slow = await campaign(plantedTarget({ delayMs: 300, checkBytes: 1 << 20, inputBytes: 16, bound: 1024 }), { seed: 2, ms: 100 });
  t.regex(slow.failure?.error ?? '', /time limit came.*exceeds the bound/);
  const next = await campaign(plantedTarget({ delayMs: 0, checkBytes: 16, inputBytes: 1 << 20, bound: 1024 }), { seed: 2, runs: 20 });
  t.is(next.failure, undefined, next.failure?.error);
  t.is(next.executions, 20);
});
