// The prebuilt platform packages (written by scripts/package.mjs, listed as the published package's
// optionalDependencies): which ones fit this machine, and where an installed one's addon is. Shared by the loader
// (lib/native.ts), the install script and the package command, so the three agree on the names.
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

export const PREBUILT_SCOPE = '@scalekv';

/** The platform packages' variants, best first: the loader takes the CUDA one when both are installed. */
export const PREBUILT_VARIANTS = [
  { suffix: '-cuda', backends: ['cpu', 'cuda', 'emu'] },
  { suffix: '', backends: ['cpu', 'emu'] },
];

/** The platforms packages are built for: npm's os/cpu/libc fields of each. */
export const PREBUILT_PLATFORMS = { 'linux-x64': { os: ['linux'], cpu: ['x64'], libc: ['glibc'] } };

/** This machine's platform key ('linux-x64'), or why no prebuilt package can fit it. */
export function currentPlatform() {
  const key = `${process.platform}-${process.arch}`;
  if (!Object.hasOwn(PREBUILT_PLATFORMS, key)) return { key, unsupported: `no prebuilt packages for ${key}` };
  // The packages are linked against glibc: a musl system (Alpine) needs a source build.
  const glibc = process.report.getReport().header.glibcVersionRuntime;
  if (process.platform === 'linux' && !glibc) return { key, unsupported: `no prebuilt packages for ${key} with musl libc` };
  return { key };
}

/** The package names that may hold an addon for this machine, best first (none on an unsupported platform). */
export function prebuiltPackageNames() {
  const platform = currentPlatform();
  if (platform.unsupported) return [];
  return PREBUILT_VARIANTS.map((v) => `${PREBUILT_SCOPE}/${platform.key}${v.suffix}`);
}

/** The addon file of an installed platform package, resolved as `packageRoot`'s dependency; undefined if absent. */
export function prebuiltAddonPath(name, packageRoot) {
  try {
    return join(dirname(createRequire(join(packageRoot, 'package.json')).resolve(`${name}/package.json`)), 'scalekv.node');
  } catch {
    return undefined;
  }
}
