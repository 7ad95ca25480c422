/**
 * The fuzz harness shared by the ava campaign (test/fuzz.test.ts) and `npm run fuzz`: a target is a parser of user
 * files with a fast-check arbitrary of inputs (structure-aware mutations of valid files plus byte-level ones) and a
 * `check` that runs the parser and compares with a reference. Every input must either load to what the reference
 * says or fail with a ScaleKVError whose code the target allows; anything else (another exception type, a
 * disagreement with the reference, a run over the time bound, a Buffer allocation larger than the input justifies)
 * is a violation that fast-check shrinks to a small failing input.
 */
import fc from 'fast-check';
import { AsyncLocalStorage } from 'node:async_hooks';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ErrorCode, ScaleKVError } from '../../lib/errors.js';

/**
 * What a generated input must do beyond the general rule: `same` (a semantic no-op of a valid file) loads to
 * exactly these tensors; `error` fails, with `code` when given. Regression files replay with no expectation.
 */
export type Expectation = { kind: 'same'; tensors: Map<string, ExpectedTensor> } | { kind: 'error'; code?: ErrorCode };

export interface ExpectedTensor {
  dtype: string;
  shape: number[];
  bytes: Uint8Array;
}

export interface FuzzCase {
  bytes: Uint8Array;
  expect?: Expectation;
}

/** What one input did: loaded, or failed with a coded error. */
export type Outcome = { ok: true } | { ok: false; code: ErrorCode; message: string };

export interface FuzzTarget {
  /** Short name: `--parser` selects by it, regression files live under regressions/<name>/. */
  readonly name: string;
  /** Codes a rejected input may carry. */
  readonly codes: readonly ErrorCode[];
  /** Inputs: file bytes (what a user could hand the parser), with what generation knows they must do. */
  readonly inputs: fc.Arbitrary<FuzzCase>;
  /**
   * Runs the parser on `input`; returns the tensors it loaded (after comparing with the reference, throwing a
   * FuzzViolation on a mismatch) and lets the parser's error escape otherwise.
   */
  check(input: Uint8Array): Map<string, ExpectedTensor> | void | Promise<Map<string, ExpectedTensor> | void>;
  /** Largest Buffer one input may allocate: a forged length must never buy more than the file itself holds. */
  allocationBound(input: Uint8Array): number;
}

/** An invariant broken: the input is a bug, whatever the parser threw. */
export class FuzzViolation extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FuzzViolation';
  }
}

/** External (ArrayBuffer) memory one input may leave behind beyond its allocation bound. */
const EXTERNAL_SLACK = 16 << 20;

/** Wall time one input may take; generous for a shared 2-core CI machine, far below any real hang. */
export const TIME_BOUND_MS = 2000;

/** The allocation bound of the check running in this async context; code outside a check is not bounded. */
const allocationBound = new AsyncLocalStorage<number>();

/**
 * Buffer.alloc / allocUnsafe / allocUnsafeSlow, patched once: a request over the bound of the check that makes it
 * throws a FuzzViolation before the memory is taken, so a forged 4 GB length is reported, not allocated. The bound
 * follows the check's async context, not a global window: fast-check's time limit abandons an async check mid-way
 * (it races the run against a timer), and the next campaign's input generation must not inherit that check's bound.
 */
function installAllocationGuard(): void {
  const guard = <F extends (size: number, ...rest: never[]) => Buffer>(f: F): F =>
    ((size: number, ...rest: never[]) => {
      const bound = allocationBound.getStore();
      if (bound !== undefined && size > bound) throw new FuzzViolation(`allocation of ${size} bytes exceeds the bound of ${bound} bytes for this input`);
      return f.call(Buffer, size, ...rest);
    }) as F;
  Buffer.alloc = guard(Buffer.alloc);
  Buffer.allocUnsafe = guard(Buffer.allocUnsafe);
  Buffer.allocUnsafeSlow = guard(Buffer.allocUnsafeSlow);
}
installAllocationGuard();

/** Runs one input through a target and classifies it; throws a FuzzViolation (or the unexpected error) on a bug. */
export async function runInput(target: FuzzTarget, { bytes: input, expect }: FuzzCase): Promise<Outcome> {
  const start = performance.now();
  const external = process.memoryUsage().arrayBuffers;
  let outcome: Outcome;
  try {
    const loaded = await allocationBound.run(target.allocationBound(input), () => target.check(input));
    if (expect?.kind === 'error') throw new FuzzViolation(`loaded an input that must fail${expect.code ? ` with ${expect.code}` : ''}`);
    if (expect?.kind === 'same') sameTensors(loaded, expect.tensors);
    outcome = { ok: true };
  } catch (e) {
    if (e instanceof FuzzViolation) throw e;
    if (!(e instanceof ScaleKVError)) throw new FuzzViolation(`uncoded ${(e as Error)?.name ?? typeof e}: ${(e as Error)?.stack ?? e}`);
    if (!target.codes.includes(e.code)) throw new FuzzViolation(`code ${e.code} is not one of ${target.codes.join(', ')}: ${e.message}`);
    if (expect?.kind === 'same') throw new FuzzViolation(`refused a semantic no-op of a valid file: [${e.code}] ${e.message}`);
    if (expect?.kind === 'error' && expect.code && e.code !== expect.code) throw new FuzzViolation(`failed with ${e.code}, not ${expect.code}: ${e.message}`);
    outcome = { ok: false, code: e.code, message: e.message };
  }
  // Memory taken outside Buffer.alloc (zlib output, typed arrays) shows here, as garbage not yet collected.
  const grown = process.memoryUsage().arrayBuffers - external;
  if (grown > target.allocationBound(input) + EXTERNAL_SLACK) throw new FuzzViolation(`external memory grew by ${grown} bytes for an input of ${input.length}`);
  const ms = performance.now() - start;
  if (ms > TIME_BOUND_MS) throw new FuzzViolation(`took ${ms.toFixed(0)} ms (bound ${TIME_BOUND_MS} ms)`);
  return outcome;
}

/** Throws a FuzzViolation unless `got` holds exactly the tensors of `want` (names, dtypes, shapes, bytes). */
export function sameTensors(got: Map<string, ExpectedTensor> | void, want: Map<string, ExpectedTensor>): void {
  if (!got) throw new FuzzViolation('the target returned no tensors to compare');
  const names = (m: Map<string, ExpectedTensor>) => JSON.stringify([...m.keys()].sort());
  if (names(got) !== names(want)) throw new FuzzViolation(`tensor names ${names(got)} differ from the reference's ${names(want)}`);
  for (const [name, w] of want) {
    const g = got.get(name)!;
    if (g.dtype !== w.dtype || JSON.stringify(g.shape) !== JSON.stringify(w.shape))
      throw new FuzzViolation(`${JSON.stringify(name)}: ${g.dtype} [${g.shape}] where the reference has ${w.dtype} [${w.shape}]`);
    if (!Buffer.from(g.bytes).equals(Buffer.from(w.bytes))) throw new FuzzViolation(`${JSON.stringify(name)}: bytes differ from the reference's`);
  }
}

/**
 * An error's message with its variable parts (paths, numbers, names, quoted values: every word that is not plain
 * letters) elided, so inputs failing the same way share one kind.
 */
export function errorKind(o: Outcome): string {
  if (o.ok) return 'ok';
  const words = o.message.split(/\s+/).map((w) => (/^[A-Za-z_-]+[,.:;]?$/.test(w) ? w : '…'));
  return `${o.code}: ${words.filter((w, i) => w !== '…' || words[i - 1] !== '…').join(' ')}`.slice(0, 140);
}

export interface CampaignStats {
  target: string;
  executions: number;
  rejected: number;
  ms: number;
  /** Distinct outcomes ('ok' or an error kind), each with its count and the first input that produced it. */
  kinds: Map<string, { count: number; input: Uint8Array }>;
  /** The failing input (shrunk) and what it broke, when the campaign found a bug. */
  failure?: { input: Uint8Array; error: string; seed: number; path?: string };
}

export interface CampaignOptions {
  seed: number;
  /** Stop after this many inputs … */
  runs?: number;
  /** … or after this long, whichever comes first. */
  ms?: number;
}

/** A seeded campaign on one target: fast-check generates, runs and (on a violation) shrinks. */
export async function campaign(target: FuzzTarget, opts: CampaignOptions): Promise<CampaignStats> {
  const stats: CampaignStats = { target: target.name, executions: 0, rejected: 0, ms: 0, kinds: new Map() };
  const start = performance.now();
  // The input fast-check's time limit may abandon mid-run: awaited before the campaign returns, so no check of
  // this target overlaps the next campaign's (its time and external-memory bounds would measure both).
  // A violation it finds after the limit is still a failure.
  let inFlight: Promise<{ input: Uint8Array; error: unknown } | undefined> = Promise.resolve(undefined);
  const details = await fc.check(
    fc.asyncProperty(target.inputs, async (input) => {
      const run = runInput(target, input);
      inFlight = run.then(
        () => undefined,
        (error: unknown) => ({ input: input.bytes, error }),
      );
      const o = await run;
      const bytes = input.bytes;
      stats.executions++;
      if (!o.ok) stats.rejected++;
      const kind = errorKind(o);
      const seen = stats.kinds.get(kind);
      if (seen) seen.count++;
      else stats.kinds.set(kind, { count: 1, input: bytes });
    }),
    {
      seed: opts.seed,
      numRuns: opts.runs ?? Number.MAX_SAFE_INTEGER,
      interruptAfterTimeLimit: opts.ms,
      markInterruptAsFailure: false,
    },
  );
  const abandoned = await inFlight;
  stats.ms = performance.now() - start;
  if (details.failed && details.counterexample) {
    const err = details.errorInstance as Error | undefined;
    stats.failure = { input: details.counterexample[0].bytes, error: err?.message ?? String(err), seed: details.seed, path: details.counterexamplePath ?? undefined };
  } else if (abandoned) {
    const err = abandoned.error as Error | undefined;
    stats.failure = { input: abandoned.input, error: `(the input running when the time limit came) ${err?.message ?? String(err)}`, seed: details.seed };
  }
  return stats;
}

let scratch: string | undefined;

/** A path in this process's scratch directory (removed at exit): parsers that take paths read their input from it. */
export function scratchPath(name: string): string {
  if (!scratch) {
    // In memory where the system has it: a campaign writes one file per input, and a disk-backed open costs more
    // than most parsers' whole run.
    const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'scalekv-fuzz-'));
    process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
    scratch = dir;
  }
  return join(scratch, name);
}

/** Writes `input` to the scratch file `name` and returns its path. */
export function scratchFile(name: string, input: Uint8Array): string {
  const path = scratchPath(name);
  writeFileSync(path, input);
  return path;
}
