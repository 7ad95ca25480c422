// The package as a consumer installs it: a fresh `tsc` build of lib/ in a temporary node_modules/scalekv next to
// this checkout's package.json (so its "exports" map is the one under test) and the native addon's build folders
// (symlinks: dist/native.js looks for the addon next to dist/) and scripts/. Code in `root` imports 'scalekv', 'scalekv/kv', ...
// through Node's package resolution, never through a path into lib/ or dist/.
import { execFile } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';

export const repoRoot = resolve(fileURLToPath(new URL('..', import.meta.url)));
const run = promisify(execFile);

export interface PackageBuild {
  /** A folder whose node_modules holds the package: modules here import it by name. */
  root: string;
  /** root/node_modules/scalekv. */
  pkg: string;
  /** Imports a specifier as a module in `root` would ('scalekv/kv' resolves through the exports map). */
  load(specifier: string): Promise<Record<string, unknown>>;
  /** Removes the folder (the repository is left as it was). */
  remove(): void;
}

let pending: Promise<PackageBuild> | undefined;

/** Runs the TypeScript compiler of this checkout, failing with its output. */
export async function tsc(args: string[], cwd = repoRoot): Promise<void> {
  try {
    await run(process.execPath, [join(repoRoot, 'node_modules', 'typescript', 'bin', 'tsc'), ...args], { cwd, maxBuffer: 1 << 24 });
  } catch (e) {
    const x = e as { stdout?: string; stderr?: string; message: string };
    throw new Error(`tsc ${args.join(' ')} failed:\n${x.stdout ?? ''}${x.stderr ?? ''}${x.stdout || x.stderr ? '' : x.message}`);
  }
}

/** Builds once per test process. */
export function packageBuild(): Promise<PackageBuild> {
  pending ??= (async () => {
    const root = mkdtempSync(join(tmpdir(), 'scalekv-package-'));
    const pkg = join(root, 'node_modules', 'scalekv');
    mkdirSync(pkg, { recursive: true });
    copyFileSync(join(repoRoot, 'package.json'), join(pkg, 'package.json'));
    for (const dir of ['build-cmake', 'build']) if (existsSync(join(repoRoot, dir))) symlinkSync(join(repoRoot, dir), join(pkg, dir), 'dir');
    // dist/ imports the shipped scripts (the prebuilt packages' names, the source build of `scalekv build`).
    symlinkSync(join(repoRoot, 'scripts'), join(pkg, 'scripts'), 'dir');
    // The package's run-time dependencies sit beside it, as npm installs them for a consumer.
    const manifest = JSON.parse(readFileSync(join(repoRoot, 'package.json'), 'utf8')) as { dependencies?: Record<string, string> };
    for (const dep of Object.keys(manifest.dependencies ?? {})) {
      mkdirSync(dirname(join(root, 'node_modules', dep)), { recursive: true });
      symlinkSync(join(repoRoot, 'node_modules', dep), join(root, 'node_modules', dep), 'dir');
    }
    try {
      await tsc(['-p', join(repoRoot, 'tsconfig.json'), '--outDir', join(pkg, 'dist'), '--sourceMap', 'false']);
    } catch (e) {
      rmSync(root, { recursive: true, force: true });
      throw e;
    }
    // A module in `root` that imports on the caller's behalf: its specifiers resolve from `root`.
    writeFileSync(join(root, 'load.mjs'), 'export const load = (specifier) => import(specifier);\n');
    const { load } = (await import(pathToFileURL(join(root, 'load.mjs')).href)) as { load: PackageBuild['load'] };
    return { root, pkg, load, remove: () => rmSync(root, { recursive: true, force: true }) };
  })();
  return pending;
}

/** Removes the build of this process, if one was made (for test.after.always). */
export async function removePackageBuild(): Promise<void> {
  const build = await pending?.catch(() => undefined);
  build?.remove();
}
