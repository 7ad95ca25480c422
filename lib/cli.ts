#!/usr/bin/env node
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { openCheckpoint } from './checkpoint/index.js';
import { backendInfo, BackendChoice } from './engine.js';
import { ScaleKVError } from './errors.js';
import { BUILD_USAGE, buildCommand } from './cli/build.js';
import { demoCommand, encodeTextCommand, generateCommand, GENERATION_USAGE } from './cli/generation.js';
import { calibrateCommand, evalCommand, KV_USAGE, planCommand } from './cli/kv-commands.js';
import { serveCommand, SERVE_USAGE, workerCommand } from './cli/serve-commands.js';
import { printable } from './cli/common.js';
import { verifyFixture, VERIFY_KINDS } from './verify/index.js';
import { formatElements } from './verify/compare.js';

const OTHER_USAGE: Record<string, string> = {
  verify: `  verify <dir> [--backend auto|cpu|cuda|emu] [--json]
      Run a conformance fixture directory (manifest.json + io.safetensors, the format of the official
      golden fixtures) and print the agreement of every recorded quantity. Exit code 1 when any check is
      outside tolerance. Kinds: ${VERIFY_KINDS.join(', ')}.
      examples:
        scalekv verify ../shared/golden/text_encoder --backend cpu
        scalekv verify ../shared/golden/forward_scalekv --json
`,
  inspect: `  inspect <file|dir> [--prefix P] [--json]
      List the tensors of a checkpoint (.safetensors, a sharded set's directory or model.safetensors.index.json,
      or a torch.save .pth/.pt/.bin, whose nested dicts are flattened to dotted names) with dtype, shape and byte
      size, plus totals. Only headers are read. --prefix keeps the names under P (e.g. 'vae.') and strips it.
      examples:
        scalekv inspect flan-t5-xl
        scalekv inspect infinity_vae_d32_reg.pth --prefix vae.
`,
  info: `  info [--json]
      Backends built into the addon, whether a CUDA device is usable, and what the CPU GEMM and convolution run
      on (oneDNN, or the builtin kernels).
      examples:
        scalekv info --json
`,
};

/** Every command's usage and examples, in the order `scalekv --help` lists them. */
const COMMAND_USAGE: Record<string, string> = { ...GENERATION_USAGE, ...SERVE_USAGE, ...KV_USAGE, ...OTHER_USAGE, ...BUILD_USAGE };

const USAGE = `usage: scalekv <command> [options]     (scalekv <command> --help: that command alone; scalekv --version)

commands:
${Object.values(COMMAND_USAGE).join('')}`;

function packageVersion(): string {
  const pkg = JSON.parse(readFileSync(join(dirname(fileURLToPath(import.meta.url)), '..', 'package.json'), 'utf8')) as { version: string };
  return pkg.version;
}

function formatValue(metric: string, v: number): string {
  if (metric === 'maxRelErr') return Number.isFinite(v) ? v.toExponential(2) : String(v);
  if (metric === 'match') return v ? 'yes' : 'NO';
  return String(v);
}

async function verify(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { backend: { type: 'string', default: 'auto' }, json: { type: 'boolean', default: false } },
  });
  if (positionals.length !== 1) {
    process.stderr.write(USAGE);
    return 2;
  }
  const report = await verifyFixture(positionals[0], { backend: values.backend as BackendChoice });
  if (values.json) {
    process.stdout.write(JSON.stringify(report, (_, v) => (typeof v === 'number' && !Number.isFinite(v) ? String(v) : v), 2) + '\n');
  } else {
    const width = Math.max(...report.checks.map((c) => c.name.length), 8);
    process.stdout.write(`${report.kind} on ${report.backend}: ${report.dir}\n`);
    for (const c of report.checks) {
      const status = c.pass ? 'ok  ' : 'FAIL';
      const tol = c.metric === 'maxRelErr' ? ` (tol ${c.tolerance.toExponential(0)})` : '';
      process.stdout.write(`  ${status} ${c.name.padEnd(width)} ${c.metric.padEnd(11)} ${formatValue(c.metric, c.value)}${tol}${c.note && !c.pass ? `  ${c.note}` : ''}\n`);
      if (c.elements) process.stdout.write(`       ${''.padEnd(width)} per element: ${formatElements(c.elements)}\n`);
    }
    for (const u of report.unchecked) {
      const names = u.names.length > 3 ? `${u.names.slice(0, 3).join(', ')}, ... (${u.names.length})` : u.names.join(', ');
      process.stdout.write(`  unchecked: ${names} — ${u.reason}\n`);
    }
    const failed = report.checks.filter((c) => !c.pass).length;
    process.stdout.write(`${report.checks.length - failed} passed, ${failed} failed\n`);
  }
  return report.pass ? 0 : 1;
}

function inspect(argv: string[]): number {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: { json: { type: 'boolean', default: false }, prefix: { type: 'string' } },
  });
  if (positionals.length !== 1) {
    process.stderr.write(USAGE);
    return 2;
  }
  const ckpt = openCheckpoint(positionals[0], { prefix: values.prefix });
  try {
    const tensors = ckpt.names.map((name) => ({ name, ...ckpt.entry(name) }));
    const byDtype: Record<string, { count: number; bytes: number }> = {};
    let bytes = 0;
    for (const t of tensors) {
      bytes += t.bytes;
      const d = (byDtype[t.dtype] ??= { count: 0, bytes: 0 });
      d.count++;
      d.bytes += t.bytes;
    }
    if (values.json) {
      process.stdout.write(JSON.stringify({ path: ckpt.path, format: ckpt.format, metadata: ckpt.metadata, tensors, total: { count: tensors.length, bytes, byDtype } }, null, 2) + '\n');
      return 0;
    }
    // Names and metadata come from the file: printed escaped, so control characters cannot rewrite the terminal.
    const names = tensors.map((t) => printable(t.name));
    const shapes = tensors.map((t) => `[${t.shape.join(', ')}]`);
    const wName = Math.max(4, ...names.map((n) => n.length));
    const wShape = Math.max(5, ...shapes.map((s) => s.length));
    process.stdout.write(`${printable(ckpt.path)} (${ckpt.format})\n`);
    for (const [k, v] of Object.entries(ckpt.metadata ?? {})) process.stdout.write(`  metadata ${printable(k)}: ${printable(v)}\n`);
    process.stdout.write(`  ${'name'.padEnd(wName)}  dtype  ${'shape'.padEnd(wShape)}  bytes\n`);
    tensors.forEach((t, i) => process.stdout.write(`  ${names[i].padEnd(wName)}  ${t.dtype.padEnd(5)}  ${shapes[i].padEnd(wShape)}  ${t.bytes}\n`));
    const parts = Object.entries(byDtype).map(([d, v]) => `${d}: ${v.count} (${formatBytes(v.bytes)})`);
    process.stdout.write(`${tensors.length} tensors, ${bytes} bytes (${formatBytes(bytes)})${parts.length ? `; ${parts.join(', ')}` : ''}\n`);
    return 0;
  } finally {
    ckpt.close();
  }
}

function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(2)} ${units[i]}`;
}

function info(argv: string[]): number {
  const { values } = parseArgs({ args: argv, options: { json: { type: 'boolean', default: false } } });
  const i = backendInfo();
  if (values.json) process.stdout.write(JSON.stringify(i, null, 2) + '\n');
  else
    process.stdout.write(
      `backends built: ${i.built.join(', ')}\ncuda device: ${i.cuda.available ? 'available' : `unavailable (${i.cuda.reason})`}\n` +
        `cpu gemm and conv2d: ${i.cpu.library ?? 'builtin kernels (oneDNN was not found at build: apt-get install libdnnl-dev, then scalekv build)'}\n` +
        `cpu kernels' instruction set: ${i.cpu.isa}\n`,
    );
  return 0;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command !== undefined && Object.hasOwn(COMMAND_USAGE, command) && (rest.includes('--help') || rest.includes('-h'))) {
    process.stdout.write(`usage: scalekv ${COMMAND_USAGE[command].trimStart()}`);
    return 0;
  }
  switch (command) {
    case '--version':
    case '-v':
      process.stdout.write(`${packageVersion()}\n`);
      return 0;
    case 'encode-text':
      return encodeTextCommand(rest);
    case 'verify':
      return verify(rest);
    case 'info':
      return info(rest);
    case 'demo':
      return demoCommand(rest);
    case 'generate':
      return generateCommand(rest);
    case 'serve':
      return serveCommand(rest);
    case 'worker':
      return workerCommand(rest);
    case 'plan':
      return planCommand(rest);
    case 'calibrate':
      return calibrateCommand(rest);
    case 'eval':
      return evalCommand(rest);
    case 'inspect':
      return inspect(rest);
    case 'build':
      return buildCommand(rest);
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    default:
      process.stderr.write(`scalekv: unknown command '${command}'\n${USAGE}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    // node:util parseArgs rejects unknown or malformed options with its own codes; to a user they are bad arguments.
    const parseError = typeof (e as { code?: unknown })?.code === 'string' && (e as { code: string }).code.startsWith('ERR_PARSE_ARGS_');
    const code = e instanceof ScaleKVError ? ` [${e.code}]` : parseError ? ' [ERR_INVALID_ARG]' : '';
    process.stderr.write(`scalekv: ${printable((e as Error).message, 'message')}${code}\n`);
    process.exitCode = 1;
  },
);
