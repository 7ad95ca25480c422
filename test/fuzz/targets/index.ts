import type { FuzzTarget } from '../harness.js';
import { budgetPlanTarget } from './budget-plan.js';
import { pthTarget } from './pth.js';
import { safetensorsTarget } from './safetensors.js';
import { shardedTarget } from './sharded.js';

/** Every fuzzed parser, in the order campaigns run them. */
export const TARGETS: readonly FuzzTarget[] = [safetensorsTarget, shardedTarget, pthTarget, budgetPlanTarget];
