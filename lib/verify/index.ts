import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createEngine, BackendChoice } from '../engine.js';
import { fail } from '../errors.js';
import { SafetensorsFile } from '../safetensors.js';
import type { Check } from './compare.js';
import { UnitManifest, verifyUpdateKvUnits } from './update-kv-units.js';

export type { Check } from './compare.js';

export interface VerifyReport {
  dir: string;
  kind: string;
  backend: string;
  checks: Check[];
  pass: boolean;
}

/** The fixture kinds this build can verify. */
export const VERIFY_KINDS = ['update_kv_units'] as const;

/** Runs one fixture directory (manifest.json + io.safetensors, the ../shared/golden format) on an engine. */
export async function verifyFixture(dir: string, opts: { backend?: BackendChoice } = {}): Promise<VerifyReport> {
  const manifestPath = join(dir, 'manifest.json');
  if (!existsSync(manifestPath)) fail('ERR_FIXTURE', `${dir}: no manifest.json`);
  const manifest = JSON.parse(readFileSync(manifestPath, 'utf8')) as { case?: string };
  const kind = manifest.case ?? '';
  if (!(VERIFY_KINDS as readonly string[]).includes(kind))
    fail('ERR_FIXTURE', `${dir}: fixture kind '${kind}' is not supported yet (supported: ${VERIFY_KINDS.join(', ')})`);
  const engine = await createEngine({ backend: opts.backend ?? 'auto' });
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  try {
    const checks = await verifyUpdateKvUnits(engine, manifest as UnitManifest, io);
    return { dir, kind, backend: engine.backend, checks, pass: checks.length > 0 && checks.every((c) => c.pass) };
  } finally {
    io.close();
    engine.dispose();
  }
}
