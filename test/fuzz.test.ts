/**
 * A short seeded fuzz campaign per parser of user files (test/fuzz/targets), and the replay of every input a
 * campaign ever found failing (test/fuzz/regressions/<parser>/). `npm run fuzz` runs the long campaigns.
 */
import test from 'ava';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { campaign, runInput } from './fuzz/harness.js';
import { TARGETS } from './fuzz/targets/index.js';
import { seedFor } from './helpers.js';

// Serial: the allocation guard instruments Buffer for the whole process while one input runs.
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
