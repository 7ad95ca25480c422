/**
 * Policy specs ('full', 'scalekv:10%', 'window:650', ...) for the plan / calibrate / eval commands, through
 * kvPolicyFromSpec (lib/kv/spec.ts), plus the token count the paper's memory accounting uses for a spec.
 */
import type { KvPolicy } from './policy.js';
import type { PresetName } from '../model/presets.js';
import { budgetTokens } from '../scalekv/budget.js';
import { kvPolicyFromSpec } from './spec.js';

export function resolvePolicy(spec: string, o: { depth: number; preset?: PresetName | string }): KvPolicy {
  return kvPolicyFromSpec(spec, o);
}

const fullHistory = (tokens: readonly number[]) => tokens.slice(0, -1).reduce((a, b) => a + b, 0);

/**
 * Mean history tokens per layer that the last scale reads, for the paper accounting (spec sec. 5.2): the full
 * history for 'full', P % → budgetTokens(P / 100) (650 at 10 %), ':N' and ':S+R' → N and S + R; undefined when the
 * spec does not say (a plan file: the planner then uses the mean history capacity).
 */
export function paperTokensForSpec(spec: string, tokens: readonly number[]): number | undefined {
  const full = fullHistory(tokens);
  if (spec === 'full') return full;
  const head = spec.split(',')[0];
  const pct = /:(\d+(?:\.\d+)?)%$/.exec(head);
  if (pct) return Math.min(full, budgetTokens(Number(pct[1]) / 100, full));
  const n = /:(\d+)(?:\+(\d+))?$/.exec(head);
  if (n) return Math.min(full, Number(n[1]) + Number(n[2] ?? 0));
  return undefined;
}
