/** ScaleKV: the policy (reference and paper modes), budget plans, the official observation window, ASI calibration. */
export { ScaleKvPolicy, cacheSizesFromPlan } from './policy.js';
export type { ScaleKvLayerState, ScaleKvOptions } from './policy.js';
export { budgetPlanToJson, budgetTokens, layerBudget, linearDecayPlan, officialRulePlan, parseBudgetPlan, planEntry } from './budget.js';
export type { BudgetPlan, PlanOptions, ScaleBudget } from './budget.js';
export { observationWindow, SCALE_TOKENS_1M_SQUARE } from './window.js';
export type { ObservationWindow } from './window.js';
export { AsiProfiler, calibrate, pickDrafters, queryRows, tokensForBudget, zScores } from './asi.js';
export type { AsiOptions, AsiStats, CalibrateOptions, CalibrationResult } from './asi.js';
