import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createEngine, BackendChoice } from '../engine.js';
import { fail } from '../errors.js';
import { SafetensorsFile } from '../safetensors.js';
import type { Check } from './compare.js';
import { coverage, Unchecked } from './coverage.js';
import { UnitManifest, verifyUpdateKvUnits } from './update-kv-units.js';
import { BsqCodesManifest, verifyBsqCodes } from './bsq-codes.js';
import { Rope2dManifest, verifyRope2d } from './rope2d.js';
import { SamplingManifest, verifySampling } from './sampling.js';
import { VaeDecodeManifest, verifyVaeDecode } from './vae-decode.js';
import { ForwardFullcacheManifest, verifyForwardFullcache } from './forward-fullcache.js';
import { ForwardScalekvManifest, verifyForwardScalekv } from './forward-scalekv.js';
import { TextEncoderManifest, verifyTextEncoder } from './text-encoder.js';
import type { Engine } from '../engine.js';

export type { Check, ElementErrors } from './compare.js';
export type { Unchecked } from './coverage.js';

export interface VerifyReport {
  dir: string;
  kind: string;
  backend: string;
  checks: Check[];
  /** Recorded tensors deliberately left unchecked, with the reason. */
  unchecked: Unchecked[];
  pass: boolean;
}

/** The fixture kinds this build can verify. */
export const VERIFY_KINDS = ['update_kv_units', 'rope2d', 'bsq_codes', 'vae_decode', 'sampling', 'forward_fullcache', 'forward_scalekv', 'text_encoder'] as const;

/** One verifier per kind: the engine, the parsed manifest.json and the fixture directory. */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
const VERIFIERS: Record<string, (engine: Engine, manifest: any, dir: string) => Promise<Check[]>> = {
  update_kv_units: async (engine, manifest: UnitManifest, dir) => {
    const io = new SafetensorsFile(join(dir, 'io.safetensors'));
    try {
      return await verifyUpdateKvUnits(engine, manifest, io);
    } finally {
      io.close();
    }
  },
  rope2d: (engine, manifest: Rope2dManifest, dir) => verifyRope2d(engine, manifest, dir),
  bsq_codes: (engine, manifest: BsqCodesManifest, dir) => verifyBsqCodes(engine, manifest, dir),
  vae_decode: (engine, manifest: VaeDecodeManifest, dir) => verifyVaeDecode(engine, manifest, dir),
  sampling: (engine, manifest: SamplingManifest, dir) => verifySampling(engine, manifest, dir),
  forward_fullcache: (engine, manifest: ForwardFullcacheManifest, dir) => verifyForwardFullcache(engine, manifest, dir),
  forward_scalekv: (engine, manifest: ForwardScalekvManifest, dir) => verifyForwardScalekv(engine, manifest, dir),
  text_encoder: (engine, manifest: TextEncoderManifest, dir) => verifyTextEncoder(engine, manifest, dir),
};

/**
 * The manifest.json of a fixture directory and its kind: ERR_FIXTURE when it is missing, not a JSON object or of a
 * kind this build cannot verify.
 */
export function readFixtureManifest(dir: string): { kind: (typeof VERIFY_KINDS)[number]; manifest: Record<string, unknown> } {
  const manifestPath = join(dir, 'manifest.json');
  if (!existsSync(manifestPath)) fail('ERR_FIXTURE', `${dir}: no manifest.json`);
  let manifest: unknown;
  try {
    manifest = JSON.parse(readFileSync(manifestPath, 'utf8'));
  } catch (e) {
    fail('ERR_FIXTURE', `${manifestPath}: not JSON (${(e as Error).message})`);
  }
  if (manifest === null || typeof manifest !== 'object' || Array.isArray(manifest)) fail('ERR_FIXTURE', `${manifestPath}: not a JSON object`);
  const kind = (manifest as { case?: unknown }).case ?? '';
  if (typeof kind !== 'string' || !(VERIFY_KINDS as readonly string[]).includes(kind))
    fail('ERR_FIXTURE', `${dir}: fixture kind ${JSON.stringify(kind).slice(0, 60)} is not supported yet (supported: ${VERIFY_KINDS.join(', ')})`);
  return { kind: kind as (typeof VERIFY_KINDS)[number], manifest: manifest as Record<string, unknown> };
}

/** Runs one fixture directory (manifest.json + io.safetensors, the ../shared/golden format) on an engine. */
export async function verifyFixture(dir: string, opts: { backend?: BackendChoice } = {}): Promise<VerifyReport> {
  const { kind, manifest } = readFixtureManifest(dir);
  const verifier = VERIFIERS[kind];
  if (!verifier) fail('ERR_FIXTURE', `${dir}: no verifier registered for kind '${kind}'`);
  const engine = await createEngine({ backend: opts.backend ?? 'auto' });
  try {
    const checks = await verifier(engine, manifest, dir);
    const io = new SafetensorsFile(join(dir, 'io.safetensors'));
    const recorded = io.names;
    io.close();
    const { unchecked, failures } = coverage(kind, recorded, checks);
    checks.push(...failures);
    return { dir, kind, backend: engine.backend, checks, unchecked, pass: checks.length > 0 && checks.every((c) => c.pass) };
  } finally {
    engine.dispose();
  }
}
