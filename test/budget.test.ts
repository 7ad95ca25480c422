import test from 'ava';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { budgetPlanToJson, budgetTokens, layerBudget, linearDecayPlan, officialRulePlan, parseBudgetPlan } from '../lib/scalekv/budget.js';

const specDir = [process.env.SCALEKV_SPEC, resolve('..', 'shared', 'spec')].find((d) => d && existsSync(join(d, 'budgets')));

if (!specDir) {
  test('official budget files (skipped: ../shared/spec/budgets not found)', (t) => {
    t.log('NOTICE: official budget files not found; generator reproduction not checked');
    t.pass();
  });
} else {
  for (const [file, depth] of [['2b_10%_budget.json', 32], ['8b_10%_budget.json', 40]] as const) {
    test(`${file}: load/save round-trips byte for byte and the generator reproduces it field for field`, (t) => {
      const text = readFileSync(join(specDir, 'budgets', file), 'utf8');
      const plan = parseBudgetPlan(text);
      t.is(plan.depth, depth);
      t.is(budgetPlanToJson(plan), text);
      const drafters = Object.fromEntries(plan.scales.map((s) => [s.scale, s.drafters]));
      const generated = officialRulePlan({ depth, tokensPerLayer: budgetTokens(0.1), drafters });
      t.deepEqual(generated, plan);
      t.is(budgetPlanToJson(generated), text);
      for (const s of plan.scales) t.is(s.drafters.length * s.max + (depth - s.drafters.length) * s.min, depth * 650);
    });
  }
}

test('layerBudget maps 0-based scales to "Scale si+2" and drafters to Max', (t) => {
  const plan = officialRulePlan({ depth: 4, tokensPerLayer: 650, drafters: [0, 3] });
  t.is(plan.scales[0].scale, 9);
  t.is(layerBudget(plan, 0, 7), plan.scales[0].max);
  t.is(layerBudget(plan, 1, 7), plan.scales[0].min);
  t.is(layerBudget(plan, 1, 6), undefined);
});

test('generators cover budgets from 1% to 50% and any depth, keeping the per-scale total', (t) => {
  for (const fraction of [0.01, 0.04, 0.1, 0.2, 0.33, 0.5]) {
    for (const depth of [4, 12, 32, 40, 58]) {
      const B = budgetTokens(fraction);
      const plan = officialRulePlan({ depth, tokensPerLayer: B, drafters: [0, Math.floor(depth / 2)] });
      for (const s of plan.scales) {
        t.true(s.max <= s.limit, `${fraction} ${depth} Scale ${s.scale}: Max ${s.max} > Limit ${s.limit}`);
        t.true(s.min >= 1);
        const sum = 2 * s.max + (depth - 2) * s.min;
        t.true(sum <= depth * B, `${fraction} ${depth}: total ${sum} > ${depth * B}`);
      }
      const decay = linearDecayPlan({ depth, tokensPerLayer: B, drafters: [0], refinerStart: Math.round(B * 0.9), delta: Math.max(1, Math.round(B / 10)) });
      for (let i = 1; i < decay.scales.length; i++) t.true(decay.scales[i].min <= decay.scales[i - 1].min);
    }
  }
  t.is(budgetTokens(0.04), 265);
  t.is(budgetTokens(0.2), 1300);
  t.throws(() => budgetTokens(0), { code: 'ERR_BUDGET' });
});

test('malformed plans are rejected with ERR_FORMAT', (t) => {
  t.throws(() => parseBudgetPlan('{}'), { code: 'ERR_FORMAT' });
  t.throws(() => parseBudgetPlan({ 'Scale 9': { 'Block 0': 1, High: 2, Max: 5, Min: 1, Limit: 9 } }), { code: 'ERR_FORMAT' });
  t.throws(() => parseBudgetPlan({ Scale: {} }), { code: 'ERR_FORMAT' });
  t.throws(() => parseBudgetPlan({ 'Scale 9': { 'Block 0': 1, 'Block 2': 0, High: 1, Max: 5, Min: 1, Limit: 9 } }), { code: 'ERR_FORMAT' });
});
