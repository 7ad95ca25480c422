// `scalekv verify` on the golden rope2d, bsq_codes, vae_decode and sampling fixtures, on every backend.
import test from 'ava';
import { verifyFixture, VERIFY_KINDS } from '../lib/verify/index.js';
import { goldenDir, testBackends } from './helpers.js';

const KINDS: { kind: string; minChecks: number; exact: RegExp }[] = [
  { kind: 'rope2d', minChecks: 15, exact: /\/(positions|schedule|start)$/ },
  { kind: 'bsq_codes', minChecks: 15, exact: /\/(codes|schedule)$/ },
  { kind: 'vae_decode', minChecks: 2, exact: /^$/ },
  { kind: 'sampling', minChecks: 12, exact: /\/(masked|keep)$/ },
];

test('the four kinds are registered', (t) => {
  for (const { kind } of KINDS) t.true((VERIFY_KINDS as readonly string[]).includes(kind), kind);
  t.true((VERIFY_KINDS as readonly string[]).includes('update_kv_units'));
});

for (const { kind, minChecks, exact } of KINDS) {
  const dir = goldenDir(kind);
  if (!dir) {
    test(`golden ${kind} (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)`, (t) => {
      t.log(`NOTICE: golden fixture ${kind} not found; its conformance test is skipped`);
      t.pass();
    });
    continue;
  }
  for (const backend of testBackends()) {
    test(`golden ${kind} ${backend}: every recorded quantity within tolerance`, async (t) => {
      const report = await verifyFixture(dir, { backend });
      t.is(report.kind, kind);
      t.is(report.backend, backend);
      for (const c of report.checks) if (!c.pass || c.metric === 'maxRelErr') t.log(`${c.pass ? 'ok' : 'FAIL'} ${c.name}: ${c.metric} ${c.value} ${c.note ?? ''}`);
      t.true(report.checks.length >= minChecks, `only ${report.checks.length} checks ran`);
      t.true(report.pass);
      // Integer-valued quantities are compared exactly.
      for (const c of report.checks.filter((c) => exact.test(c.name))) t.true(c.metric !== 'maxRelErr' || c.value === 0, c.name);
    });
  }
}
