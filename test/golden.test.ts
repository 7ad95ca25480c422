import test from 'ava';
import { verifyFixture } from '../lib/verify/index.js';
import { goldenDir, testBackends } from './helpers.js';

const unitDir = goldenDir('update_kv_units');

if (!unitDir) {
  test('golden update_kv_units (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; conformance tests skipped');
    t.pass();
  });
} else {
  for (const backend of testBackends()) {
    test(`golden update_kv_units ${backend}: every official update_kv call is reproduced`, async (t) => {
      const report = await verifyFixture(unitDir, { backend });
      for (const c of report.checks.filter((c) => !c.pass)) t.log(`${c.name}: ${c.metric} ${c.value} ${c.note ?? ''}`);
      t.true(report.checks.length >= 40, `only ${report.checks.length} checks ran`);
      t.true(report.pass);
      // Every call contributes, and the index sets are compared exactly.
      for (const id of ['u00', 'u05', 'u06', 'u09', 'u10', 'u11', 'u12']) t.true(report.checks.some((c) => c.name.startsWith(`${id}/`)), id);
      t.true(report.checks.filter((c) => c.name.endsWith('/kept')).every((c) => c.metric === 'differences' && c.value === 0));
    });
  }
}
