import { readFileSync } from 'node:fs';
import { fail } from '../errors.js';
import { BudgetPlan, budgetTokens, officialRulePlan, parseBudgetPlan } from '../scalekv/budget.js';
import { ScaleKvPolicy } from '../scalekv/policy.js';
import { FullKvPolicy, PyramidKvPolicy, SlidingWindowPolicy, SnapKvPolicy, StreamingLlmPolicy } from './baselines.js';
import type { KvPolicy } from './policy.js';
import type { Pooling, SelectionPolicyOptions } from './selection.js';

/** Drafter layers of the shipped 10 % files, per official scale number (spec §2.3). */
export const BUILTIN_DRAFTERS: Record<string, { depth: number; drafters: Record<number, number[]> }> = {
  'infinity-2b': { depth: 32, drafters: { 9: [0, 23], 10: [0, 23], 11: [0, 23], 12: [0, 23], 13: [0] } },
  'infinity-8b': { depth: 40, drafters: { 9: [0, 1, 2], 10: [0, 1, 2], 11: [0, 1, 2], 12: [0, 1, 2], 13: [0, 1, 2] } },
};

/**
 * A budget plan for a preset at a budget fraction: the official rule (officialRulePlan) with the preset's shipped
 * drafter sets, which reproduces budgets/2b_10%_budget.json and 8b_10%_budget.json exactly at 10 %. Other depths
 * (or presets without shipped files) use layer 0 as the only drafter.
 */
export function builtinPlan(preset: string | undefined, depth: number, fraction: number): BudgetPlan {
  const b = preset ? BUILTIN_DRAFTERS[preset] : undefined;
  const drafters = b && b.depth === depth ? b.drafters : [0];
  return officialRulePlan({ depth, tokensPerLayer: budgetTokens(fraction), drafters });
}

function parseTokens(s: string, what: string): number {
  const pct = /^(\d+(?:\.\d+)?)%$/.exec(s);
  if (pct) return budgetTokens(Number(pct[1]) / 100);
  if (!/^\d+$/.test(s) || Number(s) < 1) fail('ERR_INVALID_ARG', `${what}: '${s}' is not a positive token count or a percentage`);
  return Number(s);
}

function parseOptions(parts: string[], allowed: string[], spec: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const p of parts) {
    const m = /^([a-z]+)=(.+)$/.exec(p);
    if (!m || !allowed.includes(m[1])) fail('ERR_INVALID_ARG', `KV policy '${spec}': unknown option '${p}' (allowed: ${allowed.join(', ')})`);
    out[m[1]] = m[2];
  }
  return out;
}

function intOpt(v: string | undefined, what: string, spec: string): number | undefined {
  if (v === undefined) return undefined;
  if (!/^\d+$/.test(v) || Number(v) < 1) fail('ERR_INVALID_ARG', `KV policy '${spec}': ${what} must be a positive integer, got '${v}'`);
  return Number(v);
}

function poolOpt(v: string | undefined, spec: string): Pooling | undefined {
  if (v === undefined) return undefined;
  if (v === 'max' || v === 'maxpool') return 'maxpool';
  if (v === 'avg' || v === 'avgpool') return 'avgpool';
  return fail('ERR_INVALID_ARG', `KV policy '${spec}': pool must be max or avg, got '${v}'`);
}

/**
 * Builds a KV policy from a command-line spec. Grammar (options after commas, in any order):
 *
 *   full                                   keep everything
 *   scalekv:<P>%[,opts]                    ScaleKV reference mode (the released update_kv), built-in plan at P %
 *   scalekv:plan=<path.json>[,opts]        ScaleKV reference mode with an official-format budget JSON
 *   scalekv-paper:<P>% | :plan=<path>      ScaleKV paper mode (attention q, softmax, avg pooling, grid window)
 *   window:<B>                             sliding window: the most recent B tokens per layer
 *   streamingllm:<S>+<R>                   S sink tokens + the most recent R
 *   snapkv:<B>[,opts]                      SnapKV, uniform B per layer
 *   pyramidkv:<B>[,opts]                   PyramidKV, per-layer budgets 1.5B → 0.5B linearly with depth, total L×B
 *
 * B may be a token count or a percentage (P % of the largest history, 10 % = 650). ScaleKV options: base=<tokens>
 * (base capacity; default the plan's per-layer average for P %, 650 for plan files), window=<n>, kernel=<odd n>,
 * pool=max|avg. SnapKV/PyramidKV options: window, kernel, pool. The built-in plan for infinity-2b / infinity-8b
 * uses the shipped drafter sets; other presets use layer 0 as the drafter. Bad specs throw ERR_INVALID_ARG.
 */
export function kvPolicyFromSpec(spec: string, opts: { depth: number; preset?: string } & SelectionPolicyOptions): KvPolicy {
  if (typeof spec !== 'string' || !spec.trim()) fail('ERR_INVALID_ARG', 'KV policy spec must be a non-empty string');
  const depth = opts.depth;
  if (!Number.isSafeInteger(depth) || depth < 1) fail('ERR_INVALID_ARG', `depth must be a positive integer, got ${depth}`);
  const s = spec.trim();
  const colon = s.indexOf(':');
  const kind = colon < 0 ? s : s.slice(0, colon);
  const arg = colon < 0 ? '' : s.slice(colon + 1);
  const policyOpts: SelectionPolicyOptions = { trace: opts.trace, traceKept: opts.traceKept, traceScores: opts.traceScores, traceLastScale: opts.traceLastScale };
  const needArg = () => {
    if (!arg) fail('ERR_INVALID_ARG', `KV policy '${spec}': '${kind}' needs an argument (e.g. ${kind}:650)`);
  };
  switch (kind) {
    case 'full':
      if (arg) fail('ERR_INVALID_ARG', `KV policy '${spec}': 'full' takes no argument`);
      return new FullKvPolicy();
    case 'scalekv':
    case 'scalekv-paper': {
      needArg();
      const [head, ...rest] = arg.split(',');
      const o = parseOptions(rest, ['base', 'window', 'kernel', 'pool'], spec);
      let plan: BudgetPlan;
      let base: number;
      if (head.startsWith('plan=')) {
        const path = head.slice(5);
        if (!path) fail('ERR_INVALID_ARG', `KV policy '${spec}': plan= needs a path`);
        let text: string;
        try {
          text = readFileSync(path, 'utf8');
        } catch (e) {
          return fail('ERR_INVALID_ARG', `KV policy '${spec}': cannot read ${path}: ${(e as Error).message}`);
        }
        plan = parseBudgetPlan(text);
        base = 650;
      } else {
        const m = /^(\d+(?:\.\d+)?)%$/.exec(head);
        if (!m) fail('ERR_INVALID_ARG', `KV policy '${spec}': expected <P>% or plan=<path>`);
        const fraction = Number(m[1]) / 100;
        if (!(fraction > 0 && fraction <= 1)) fail('ERR_INVALID_ARG', `KV policy '${spec}': budget must be in (0, 100] %`);
        base = budgetTokens(fraction);
        plan = builtinPlan(opts.preset, depth, fraction);
      }
      if (plan.depth !== depth) fail('ERR_INVALID_ARG', `KV policy '${spec}': the plan has ${plan.depth} layers, the model ${depth}`);
      return new ScaleKvPolicy({
        ...policyOpts,
        mode: kind === 'scalekv' ? 'reference' : 'paper',
        plan,
        baseCapacity: intOpt(o.base, 'base', spec) ?? base,
        windowSize: intOpt(o.window, 'window', spec),
        kernelSize: intOpt(o.kernel, 'kernel', spec),
        pooling: poolOpt(o.pool, spec),
      });
    }
    case 'window':
      needArg();
      return new SlidingWindowPolicy(parseTokens(arg, spec), policyOpts);
    case 'streamingllm': {
      needArg();
      const m = /^(\d+)\+(\d+)$/.exec(arg);
      if (!m || Number(m[2]) < 1) fail('ERR_INVALID_ARG', `KV policy '${spec}': expected streamingllm:<sinks>+<recent>, e.g. streamingllm:4+646`);
      return new StreamingLlmPolicy(Number(m[1]), Number(m[2]), policyOpts);
    }
    case 'snapkv':
    case 'pyramidkv': {
      needArg();
      const [head, ...rest] = arg.split(',');
      const o = parseOptions(rest, ['window', 'kernel', 'pool'], spec);
      const b = parseTokens(head, spec);
      const so = { ...policyOpts, windowSize: intOpt(o.window, 'window', spec), kernelSize: intOpt(o.kernel, 'kernel', spec), pooling: poolOpt(o.pool, spec) };
      if (so.kernelSize !== undefined && so.kernelSize % 2 !== 1) fail('ERR_INVALID_ARG', `KV policy '${spec}': kernel must be odd`);
      return kind === 'snapkv' ? SnapKvPolicy.uniform(depth, b, so) : new PyramidKvPolicy(depth, b, so);
    }
    default:
      return fail('ERR_INVALID_ARG', `unknown KV policy '${kind}' (full, scalekv, scalekv-paper, window, streamingllm, snapkv, pyramidkv)`);
  }
}
