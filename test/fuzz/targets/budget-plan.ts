/**
 * Official ScaleKV budget-plan JSON (`scalekv:plan=<path>`): one field of a valid plan replaced (block flags,
 * High / Max / Min / Limit, scale keys, nesting), hostile documents and byte-level mutations, against a
 * reference validator of the format; a plan that loads must also survive budgetPlanToJson → parseBudgetPlan.
 */
import fc from 'fast-check';
import { BudgetPlan, budgetPlanToJson, parseBudgetPlan } from '../../../lib/scalekv/budget.js';
import { FuzzTarget, FuzzViolation } from '../harness.js';
import { byteMutations, hostileJson, nested } from '../mutate.js';

const FIELDS = ['High', 'Max', 'Min', 'Limit'];

/** The plan the format describes, or why it is not one. */
function reference(text: string): BudgetPlan | string {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return 'not JSON';
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return 'not an object';
  const scales: BudgetPlan['scales'] = [];
  let depth: number | undefined;
  for (const [key, v] of Object.entries(raw)) {
    // Scale numbers are small (13 for the 1M schedule); nine digits keeps them exact.
    const m = /^Scale ([1-9]\d{0,8})$/.exec(key);
    if (!m) return `key ${key}`;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) return `${key} not an object`;
    const e = v as Record<string, unknown>;
    const blocks = Object.keys(e).filter((k) => k.startsWith('Block '));
    for (const b of blocks) if (!/^Block (0|[1-9]\d*)$/.test(b) || Number(b.slice(6)) >= blocks.length) return `${key}: ${b}`;
    if (blocks.length === 0 || (depth !== undefined && blocks.length !== depth)) return `${key}: block count`;
    depth = blocks.length;
    const drafters: number[] = [];
    for (let b = 0; b < blocks.length; b++) {
      if (e[`Block ${b}`] !== 0 && e[`Block ${b}`] !== 1) return `${key}: Block ${b} is not 0 or 1`;
      if (e[`Block ${b}`] === 1) drafters.push(b);
    }
    for (const f of FIELDS) if (!Number.isSafeInteger(e[f]) || (e[f] as number) < 0) return `${key}.${f}`;
    for (const k of Object.keys(e)) if (!k.startsWith('Block ') && !FIELDS.includes(k)) return `${key}: unknown field ${k}`;
    if (e.High !== drafters.length) return `${key}: High`;
    if (scales.some((s) => s.scale === Number(m[1]))) return `${key} twice`;
    scales.push({ scale: Number(m[1]), drafters, max: e.Max as number, min: e.Min as number, limit: e.Limit as number });
  }
  if (!scales.length) return 'no scales';
  scales.sort((a, b) => a.scale - b.scale);
  return { depth: depth!, scales };
}

function check(input: Uint8Array): void {
  const text = Buffer.from(input).toString('utf8');
  const ref = reference(text);
  const plan = parseBudgetPlan(text);
  if (typeof ref === 'string') throw new FuzzViolation(`parsed a plan the reference refuses (${ref})`);
  if (JSON.stringify(plan) !== JSON.stringify(ref)) throw new FuzzViolation('parsed plan differs from the reference');
  if (JSON.stringify(parseBudgetPlan(budgetPlanToJson(plan))) !== JSON.stringify(plan)) throw new FuzzViolation('plan does not survive budgetPlanToJson');
}

const validPlan = fc
  .record({ depth: fc.integer({ min: 1, max: 8 }), scales: fc.uniqueArray(fc.integer({ min: 1, max: 14 }), { minLength: 1, maxLength: 4 }) })
  .chain(({ depth, scales }) =>
    fc.tuple(...scales.map((scale) => fc.record({ scale: fc.constant(scale), drafters: fc.subarray([...Array(depth).keys()]), max: fc.nat(9999), min: fc.nat(9999), limit: fc.nat(9999) }))).map((s) => ({ depth, scales: s })),
  )
  .map((p) => JSON.parse(budgetPlanToJson(p)) as Record<string, Record<string, unknown>>);

const structured = fc
  .tuple(
    validPlan,
    fc.nat(),
    fc.oneof(
      fc.record({ field: fc.constantFrom('Block 0', 'High', 'Max', 'Min', 'Limit', 'Block 99', 'Block 00', 'Extra'), value: hostileJson }),
      fc.record({ rename: fc.constantFrom('Scale 0', 'Scale 01', 'Scale -1', 'Scale 1e3', 'Scale 99999999999999999999', 'scale 2', 'Scale 2 ', '') }),
      fc.record({ remove: fc.constantFrom('Block 0', 'High', 'Max') }),
      fc.record({ whole: hostileJson }),
      fc.record({ deep: fc.integer({ min: 1, max: 100_000 }) }),
    ),
  )
  .map(([plan, at, m]) => {
    const keys = Object.keys(plan);
    const key = keys[at % keys.length];
    if ('field' in m) plan[key][m.field] = m.value;
    if ('remove' in m) delete plan[key][m.remove];
    if ('rename' in m) {
      plan[m.rename] = plan[key];
      if (m.rename !== key) delete plan[key];
    }
    if ('deep' in m) return { bytes: Buffer.from(JSON.stringify(plan).replace(/\}$/, `,"Scale 99":${nested('1', m.deep)}}`)) };
    return { bytes: Buffer.from('whole' in m ? JSON.stringify(m.whole) ?? '' : JSON.stringify(plan)) };
  });

export const budgetPlanTarget: FuzzTarget = {
  name: 'budget-plan',
  codes: ['ERR_FORMAT'],
  inputs: fc.oneof(structured, validPlan.map((p) => ({ bytes: Buffer.from(JSON.stringify(p, null, 1)) })), byteMutations(validPlan.map((p) => Buffer.from(JSON.stringify(p, null, 2)))).map((bytes) => ({ bytes }))),
  check,
  allocationBound: () => 64 << 10,
};
