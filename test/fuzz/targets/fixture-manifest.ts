/**
 * Conformance-fixture manifests (manifest.json of `scalekv verify`), as far as they are read before an engine runs:
 * the document and its `case`. Hostile documents, kinds and byte-level mutations of each supported kind's header.
 */
import fc from 'fast-check';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { readFixtureManifest, VERIFY_KINDS } from '../../../lib/verify/index.js';
import { FuzzTarget, FuzzViolation, scratchFile, scratchPath } from '../harness.js';
import { byteMutations, hostileJson } from '../mutate.js';

function check(input: Uint8Array): void {
  const dir = scratchPath('fixture');
  mkdirSync(dir, { recursive: true });
  scratchFile(join('fixture', 'manifest.json'), input);
  const { kind } = readFixtureManifest(dir);
  if ((JSON.parse(Buffer.from(input).toString('utf8')) as { case: unknown }).case !== kind) throw new FuzzViolation(`kind ${kind} is not the manifest's case`);
}

const valid = fc.constantFrom(...VERIFY_KINDS).map((kind) => Buffer.from(JSON.stringify({ case: kind, seed: 0, dtype: 'float32' }, null, 2)));

export const fixtureManifestTarget: FuzzTarget = {
  name: 'fixture-manifest',
  codes: ['ERR_FIXTURE'],
  inputs: fc
    .oneof(
      valid,
      fc.oneof(hostileJson, fc.constantFrom(...VERIFY_KINDS).map((k) => k.toUpperCase())).map((c) => Buffer.from(JSON.stringify({ case: c }))),
      hostileJson.map((v) => Buffer.from(JSON.stringify(v) ?? '')),
      byteMutations(valid),
    )
    .map((bytes) => ({ bytes })),
  check,
  allocationBound: () => 64 << 10,
};
