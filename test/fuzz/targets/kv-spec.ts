/**
 * The `--kv` policy spec of the CLI (kvPolicyFromSpec): specs built from the grammar's pieces with hostile numbers
 * (huge digit strings, zero, fractions, percentages past 100), unknown options, Unicode, and `plan=` paths to
 * valid, broken and missing plan files, plus byte-level mutations of valid specs. A spec either builds a policy or
 * fails with a coded error, quickly.
 */
import fc from 'fast-check';
import { writeFileSync } from 'node:fs';
import { kvPolicyFromSpec } from '../../../lib/kv/spec.js';
import { budgetPlanToJson } from '../../../lib/scalekv/budget.js';
import { FuzzTarget, scratchPath } from '../harness.js';
import { byteMutations } from '../mutate.js';

const DEPTH = 4;

let plans: string[] | undefined;
/** Plan files the specs may name: a valid one for this depth, one for another depth, one that is not JSON. */
function planPaths(): string[] {
  if (plans) return plans;
  const scales = [9, 10, 11, 12, 13].map((scale) => ({ scale, drafters: [0], max: 900, min: 300, limit: 4000 }));
  const files: [string, string][] = [
    ['plan-ok.json', budgetPlanToJson({ depth: DEPTH, scales })],
    ['plan-depth.json', budgetPlanToJson({ depth: DEPTH + 1, scales })],
    ['plan-bad.json', '{"Scale 9": '],
  ];
  plans = files.map(([name, text]) => {
    writeFileSync(scratchPath(name), text);
    return scratchPath(name);
  });
  plans.push(scratchPath('missing.json'), '');
  return plans;
}

const number = fc.oneof(fc.nat(5000).map(String), fc.constantFrom('0', '1', '00', '1.5', '100', '101', '0.0001', '9'.repeat(30), '-1', '1e3', ''));
const option = fc.tuple(fc.constantFrom('base', 'window', 'kernel', 'pool', 'sinks', 'x', ''), fc.oneof(number, fc.constantFrom('max', 'avg', 'min'))).map(([k, v]) => `${k}=${v}`);
const head = fc.oneof(
  number,
  number.map((n) => `${n}%`),
  fc.tuple(number, number).map(([a, b]) => `${a}+${b}`),
  fc.nat(4).map((i) => `plan=${planPaths()[i]}`),
  fc.string({ unit: 'binary', maxLength: 8 }),
);
const spec = fc
  .tuple(fc.constantFrom('full', 'scalekv', 'scalekv-paper', 'window', 'streamingllm', 'snapkv', 'pyramidkv', 'h2o', ''), fc.boolean(), head, fc.array(option, { maxLength: 3 }))
  .map(([kind, colon, h, opts]) => (colon ? `${kind}:${[h, ...opts].join(',')}` : kind));

const valid = fc.constantFrom('full', 'scalekv:10%', 'scalekv-paper:4%,window=16', 'window:650', 'streamingllm:4+646', 'snapkv:10%,kernel=7,pool=avg', 'pyramidkv:650');

export const kvSpecTarget: FuzzTarget = {
  name: 'kv-spec',
  codes: ['ERR_INVALID_ARG', 'ERR_FORMAT', 'ERR_BUDGET'],
  inputs: fc.oneof(spec, byteMutations(valid.map((s) => Buffer.from(s)))).map((s) => ({ bytes: typeof s === 'string' ? Buffer.from(s) : s })),
  check: (input) => void kvPolicyFromSpec(Buffer.from(input).toString('utf8'), { depth: DEPTH }),
  allocationBound: () => 1 << 20,
};
