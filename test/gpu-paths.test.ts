// The CUDA kernels' paths and the emulator's cost projection: every op of a bf16 Infinity-2B-shaped image (reduced
// depth and pixel budget; the real widths, heads and VAE channels) takes its tensor-core path on the emulator, with
// no slow path noted; and the roofline projection's arithmetic on hand-made counters. The counters are one per
// process (one engine's queue thread at a time): the tests that use them run serially.
import test from 'ava';
import { backendInfo, createEngine, type KernelLaunch } from '../lib/engine.js';
import { infinityConfig } from '../lib/model/presets.js';
import { recordImageOps, projectOps } from '../bench/project-e2e.js';
import { blocksPerSm, DEVICES, projectLaunch, shortKernelName } from '../bench/projection.js';

const emuBuilt = backendInfo().built.includes('emu');
// Why the emulator's kernel tests cannot run: not built, or the sanitized build's AddressSanitizer flavour, which has
// no cost counters (kernels/emu/emu.cmake).
const why = !emuBuilt ? 'emu backend not built'
  : process.env.SCALEKV_SANITIZED ? `the emulator under the ${process.env.SCALEKV_SANITIZED} sanitizers has no cost counters` : '';

test.serial('a bf16 2B-shaped image: every GEMM, convolution and attention runs on tensor cores on emu, no slow path', async (t) => {
  if (why) {
    t.log(`NOTICE: ${why}; skipped`);
    t.pass();
    return;
  }
  t.timeout(600_000);
  const config = infinityConfig({ name: '2b-shaped', depth: 2, embedDim: 2048, numHeads: 16, blockChunks: 2 });
  const ops = await recordImageOps({ config, pn: '0.06M', textTokens: 16 });
  t.true(ops.some((o) => o.name === 'conv2d') && ops.some((o) => o.name === 'attention') && ops.some((o) => o.name === 'gemm'));
  const e = await createEngine({ backend: 'emu', threads: 2 });
  try {
    // Two blocks of each grid suffice to see which kernel a launch takes (results are not checked here: the op
    // tests and the golden fixtures do that).
    const projected = await projectOps(e, ops, DEVICES.h100, new Map(), 2);
    const slow = projected.filter((p) => p.path !== 'kernel').map((p) => `${p.name}:${p.path} ${p.shapes}`);
    t.deepEqual(slow, [], 'slow paths taken');
    const heavy = projected.filter((p) => ['gemm', 'conv2d', 'attention'].includes(p.name) && p.operandDtype === 'bf16');
    t.true(heavy.length > 20, `bf16 GEMMs, convolutions and attentions replayed: ${heavy.length}`);
    for (const p of heavy) t.true(p.tensorFlops > 0, `${p.name} ${p.shapes}: no tensor-core FLOPs`);
  } finally {
    e.dispose();
  }
});

test.serial('a slow path is named in the profile and counted: bf16 gemm with K % 8 != 0 on emu', async (t) => {
  if (why) {
    t.log(`NOTICE: ${why}; skipped`);
    t.pass();
    return;
  }
  const e = await createEngine({ backend: 'emu', threads: 2 });
  try {
    const x = e.tensor(Float32Array.from({ length: 6 * 13 }, (_, i) => Math.sin(i + 1)), [6, 13], 'bf16');
    const w = e.tensor(Float32Array.from({ length: 5 * 13 }, (_, i) => Math.cos(i + 1)), [5, 13], 'bf16');
    const y = e.empty([6, 5], 'f32');
    e.startProfiling({ kernelCounters: true });
    e.ops.gemm({ x, w, y });
    e.ops.gemm({ x, w, y });
    const profile = await e.stopProfiling();
    const gemm = profile.find((p) => p.op === 'gemm');
    t.is(gemm?.path, 'simt (K % 8 != 0)');
    t.is(gemm?.count, 2);
    t.is(gemm?.launches?.length, 2);
    t.true((gemm?.launches?.[0].simtFlops ?? 0) === 2 * 6 * 5 * 13, 'the SIMT launcher declares its FLOPs');
    for (const t2 of [x, w, y]) t2.dispose();
  } finally {
    e.dispose();
  }
});

test('kernel counters are the emulator\'s: another backend refuses them with a coded error', async (t) => {
  const e = await createEngine({ backend: 'cpu', threads: 1 });
  try {
    t.throws(() => e.startProfiling({ kernelCounters: true }), { code: 'ERR_BACKEND_UNAVAILABLE' });
  } finally {
    e.dispose();
  }
});

function launch(o: Partial<KernelLaunch> & { counters: Record<string, number> }): KernelLaunch {
  return { kernel: 'k', grid: [1, 1, 1], block: [128, 1, 1], smemBytes: 0, simtFlops: 0, blocksRun: 1, ...o };
}

test('projection: the largest resource time wins, derated by the grid\'s share of the GPU', (t) => {
  const d = DEVICES.h100;
  // 264 blocks of 128 threads, 64 KiB smem: 3 per SM by smem, so one wave, every SM busy.
  const full = launch({ grid: [264, 1, 1], smemBytes: 64 * 1024, counters: { tensorFlops: 989.4e12 * 1e-3, dramReadBytes: 3.35e12 * 2e-4 } });
  const p = projectLaunch(full, d);
  t.is(p.bound, 'tensor');
  t.true(Math.abs(p.seconds - 1e-3) < 1e-9);
  t.is(p.blocksPerSm, 3);
  // The same work on 66 blocks: half the SMs, twice the time.
  const half = projectLaunch({ ...full, grid: [66, 1, 1] }, d);
  t.true(Math.abs(half.seconds - 2e-3) < 1e-9);
  // Uncoalesced: 4 useful bytes per 32-byte sector, L2-bound.
  const strided = projectLaunch(launch({ grid: [1320, 1, 1], counters: { globalLoadSectors: 1e9, globalLoadBytes: 4e9 } }), d);
  t.is(strided.bound, 'l2');
  t.true(Math.abs(strided.coalescing - 0.125) < 1e-12);
  // Bank conflicts: 32 wavefronts where 1 would do.
  const conflicted = projectLaunch(launch({ grid: [1320, 1, 1], counters: { sharedLoadWavefronts: 32e9, sharedLoadIdealWavefronts: 1e9 } }), d);
  t.is(conflicted.bound, 'smem');
  t.is(conflicted.bankConflictFactor, 32);
  t.true(Math.abs(conflicted.seconds - 32e9 / (d.sms * d.clockHz)) < 1e-9);
  // Tiny work: the launch floor.
  t.is(projectLaunch(launch({ counters: {} }), d).bound, 'launch');
  // Registers limit residency: 255 registers x 256 threads = 2 blocks would need 128K registers; 1 fits.
  t.is(blocksPerSm(launch({ block: [256, 1, 1], counters: {} }), d, 255), 1);
  t.is(shortKernelName('void scalekv::cuda_ops::(anonymous namespace)::attention_mma_kernel<128, 4>(scalekv::cuda_ops::(anonymous namespace)::AttnParams)'), 'attention_mma_kernel<128, 4>');
});
