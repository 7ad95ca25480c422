// `scalekv verify` on the golden rope2d, bsq_codes, vae_decode, sampling and text_encoder fixtures, on every backend.
import test from 'ava';
import { compareFloats, diffCheck, matchCheck } from '../lib/verify/compare.js';
import { coverage } from '../lib/verify/coverage.js';
import { verifyFixture, VERIFY_KINDS } from '../lib/verify/index.js';
import { goldenDir, testBackends } from './helpers.js';

const KINDS: { kind: string; minChecks: number; exact: RegExp }[] = [
  { kind: 'rope2d', minChecks: 15, exact: /\/(positions|schedule|start)$/ },
  { kind: 'bsq_codes', minChecks: 15, exact: /\/(codes|schedule)$/ },
  { kind: 'vae_decode', minChecks: 2, exact: /^$/ },
  { kind: 'sampling', minChecks: 12, exact: /\/(masked|keep)$/ },
  { kind: 'text_encoder', minChecks: 4, exact: /^(ids|lens)$/ },
];

test('the kinds are registered', (t) => {
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

test('element classes: an error the tensor-wide figure hides shows against the element\'s own magnitude', (t) => {
  const expected = [1000, 1, 0.5, 0.0005, -Infinity];
  const { maxRelErr, elements } = compareFloats([1000.001, 1.1, 0.5, 0.0015, -Infinity], expected);
  t.is(elements.floor, 1);
  t.is(elements.large.count, 2);
  t.true(Math.abs(elements.large.maxRelErr - 0.1) < 1e-12, 'the 10% error on 1');
  t.is(elements.small.count, 2);
  t.true(Math.abs(elements.small.maxAbsErr - 0.001) < 1e-12);
  t.is(elements.nonFinite, 1);
  t.true(Math.abs(maxRelErr - 1e-4) < 1e-12, 'the tensor-wide figure: 0.1 / 1000');
  t.is(compareFloats([1000, 1, 0.5, 0.0005, Infinity], expected).maxRelErr, Infinity, 'a non-finite element must match');
  t.is(compareFloats([1000, NaN, 0.5, 0.0005, -Infinity], expected).maxRelErr, Infinity, 'a NaN fails');
  t.is(diffCheck('k', [1, 2, 3, 4, 5, 7], [1, 2, 3, 4, 5, 6], { listLength: 3 }).note, '1 of 6 entries differ in 1 of 2 lists');
});

test('coverage: a recorded tensor with no role, or an expected one no check compared, fails; unchecked ones carry a reason', (t) => {
  const recorded = ['u00/key_states', 'u00/kept', 'u00/window', 'u00/topk_ties', 'u01/topk_ties', 'u00/surprise'];
  const { unchecked, failures } = coverage('update_kv_units', recorded, [diffCheck('u00/kept', [1], [1])]);
  t.deepEqual(failures.map((f) => f.name), ['recorded tensors without a role', 'recorded tensors not compared']);
  t.true(failures.every((f) => !f.pass));
  t.true(failures[0].note?.includes('u00/surprise'));
  t.true(failures[1].note?.includes('u00/window'));
  t.deepEqual(unchecked.map((u) => u.names), [['u00/topk_ties', 'u01/topk_ties']]);
  t.true(unchecked[0].reason.length > 20);
  // An aggregate check names what it compares.
  const ok = coverage('forward_scalekv', ['kv/L0_s07/kept'], [{ ...matchCheck('kv/*/kept', true), covers: ['kv/L0_s07/kept'] }]);
  t.deepEqual(ok.failures, []);
});
