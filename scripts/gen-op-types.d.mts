// Types of scripts/gen-op-types.mjs for the TypeScript tests that import it.
import type { OpDeclaration } from '../lib/native.js';

export const GENERATED_PATH: string;
export function renderOpTypes(table: readonly OpDeclaration[]): string;
