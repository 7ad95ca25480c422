// `scalekv build`: rebuilds the native addon in place from the package's own sources (scripts/build-native.mjs, the
// install script's builder), for a machine no prebuilt package fits or to get a backend the prebuilt lacks.
import { parseArgs } from 'node:util';
import { BACKENDS, buildablePrerequisites, buildFromSource, NativeBuildError } from '../../scripts/build-native.mjs';
import { fail } from '../errors.js';

export const BUILD_USAGE: Record<string, string> = {
  build: `  build [--backend ${BACKENDS.join(',')}] [--jobs N]
      Rebuild the native addon from the package's sources into its build-cmake/ folder, which the package then loads
      before any prebuilt platform package. Needs CMake and a C++17 compiler; nvcc (CUDA toolkit) for cuda,
      libboost-context-dev for emu, libdnnl-dev for the fast CPU GEMM and convolution (optional). Without --backend:
      every backend this machine can build, and it says why any was skipped; with it: exactly those, or an error
      saying what is missing. Prints the backends built.
      examples:
        scalekv build
        scalekv build --backend cpu,cuda --jobs 8
`,
};

export function buildCommand(argv: string[]): number {
  const { values } = parseArgs({ args: argv, options: { backend: { type: 'string' }, jobs: { type: 'string' } } });
  const backends = values.backend?.split(',').map((b) => b.trim()).filter(Boolean);
  for (const b of backends ?? []) if (!BACKENDS.includes(b)) fail('ERR_INVALID_ARG', `--backend: unknown backend '${b}' (choose from ${BACKENDS.join(', ')})`);
  const pre = buildablePrerequisites();
  process.stdout.write(`building the scalekv addon from source (cmake: ${pre.cmake ?? 'not found'}, nvcc: ${pre.nvcc ?? 'not found'}); this takes minutes\n`);
  try {
    const r = buildFromSource({ backends, jobs: values.jobs });
    process.stdout.write(`built with ${r.tool}: backends ${r.backends.join(', ')}\n`);
    for (const note of r.notes) process.stdout.write(`  ${note}\n`);
    return 0;
  } catch (e) {
    if (e instanceof NativeBuildError) fail('ERR_NATIVE_BUILD', e.message);
    throw e;
  }
}
