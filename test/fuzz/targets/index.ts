import type { FuzzTarget } from '../harness.js';
import { budgetPlanTarget } from './budget-plan.js';
import { fixtureManifestTarget } from './fixture-manifest.js';
import { kvSpecTarget } from './kv-spec.js';
import { pngTarget } from './png.js';
import { pthTarget } from './pth.js';
import { safetensorsTarget } from './safetensors.js';
import { shardedTarget } from './sharded.js';
import { textFeaturesTarget } from './text-features.js';
import { t5ConfigTarget, tokenizerTarget } from './text.js';

/** Every fuzzed parser, in the order campaigns run them. */
export const TARGETS: readonly FuzzTarget[] = [safetensorsTarget, shardedTarget, pthTarget, budgetPlanTarget, t5ConfigTarget, tokenizerTarget, pngTarget, kvSpecTarget, fixtureManifestTarget, textFeaturesTarget];
