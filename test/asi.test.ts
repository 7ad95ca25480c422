import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { writeTinyModelFiles } from './checkpoint-writers.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createEngine } from '../lib/engine.js';
import { calibrate, pickDrafters, queryRows, zScores } from '../lib/scalekv/asi.js';
import { InfinityModel } from '../lib/model/infinity.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { syntheticText } from './helpers.js';
import { budgetPlanToJson, parseBudgetPlan } from '../lib/scalekv/budget.js';

const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' }).scales;

async function withTiny<T>(fn: (m: InfinityModel, tiny: ReturnType<typeof createTinyModel>) => Promise<T>): Promise<T> {
  const tiny = createTinyModel(5);
  const e = await createEngine({ backend: 'cpu', threads: 2 });
  try {
    const m = await InfinityModel.load(e, tiny.weights, tiny.config, { dtype: 'f32' });
    try {
      return await fn(m, tiny);
    } finally {
      m.dispose();
    }
  } finally {
    e.dispose();
  }
}

test('query subset: all rows up to the cap, then an even deterministic spread', (t) => {
  t.deepEqual([...queryRows(5, 8)], [0, 1, 2, 3, 4]);
  t.deepEqual([...queryRows(16, 4)], [2, 6, 10, 14]);
  const r = queryRows(4096);
  t.is(r.length, 256);
  t.true(r.every((v, i) => v >= 0 && v < 4096 && (i === 0 || v > r[i - 1])));
});

test('z-scores per scale and the global lowest-N_d cut', (t) => {
  const asi = [
    [0, 0.5, 0.1],
    [0, 0.7, 0.3],
    [0, 0.6, 0.25],
  ];
  const z = zScores(asi);
  t.true(Math.abs(z[0][1] + z[1][1]) < 1e-9 && Math.abs(z[2][1]) < 1e-9);
  t.deepEqual(z.map((r) => r[0]), [0, 0, 0]);
  const d = pickDrafters(z, [1, 2], 2);
  t.deepEqual(d.map((x) => [x.layer, x.scale]), [[0, 2], [0, 1]]);
});

test('calibration on the tiny model: exact kernel probabilities, deterministic, loads as a budget plan', async (t) => {
  const prompts = ['a red fox in snow', 'a lighthouse at dawn'];
  await withTiny(async (m, tiny) => {
    const feats = prompts.map((p) => syntheticText(p));
    const t0 = performance.now();
    // K' larger than any history and no normalisation: history top-K' = all history mass = 1 − current.
    const all = await calibrate(m, { prompts: feats, schedule, topK: 1 << 20, normalizeHistory: false, budget: 0.1 });
    for (let l = 0; l < 4; l++)
      for (let k = 1; k < schedule.length; k++) {
        const c = all.stats.current[l][k];
        const h = all.stats.historyTopK[l][k];
        t.true(c > 0 && c < 1, `current ${c}`);
        t.true(Math.abs(c + h - 1) < 1e-4, `layer ${l} scale ${k}: ${c} + ${h}`);
      }
    t.true(all.stats.current.every((r) => Math.abs(r[0] - 1) < 1e-5), 'scale 0 attends only to itself');
    // Normalised, K' = 8: in (0, 1].
    const a = await calibrate(m, { prompts: feats, schedule, topK: 8, drafters: 3, seed: 2 });
    const b = await calibrate(m, { prompts: feats, schedule, topK: 8, drafters: 3, seed: 2 });
    t.log(`3 calibrations of 2 prompts: ${(performance.now() - t0).toFixed(0)} ms`);
    t.deepEqual(a.stats, b.stats);
    t.deepEqual(a.drafters, b.drafters);
    const json = budgetPlanToJson(a.plan);
    t.is(json, budgetPlanToJson(b.plan));
    t.is(a.drafters.length, 3);
    t.is(a.tokensPerLayer, Math.round(0.1 * 265));
    const plan = parseBudgetPlan(json);
    t.is(plan.depth, 4);
    t.deepEqual(plan, a.plan);
    for (const d of a.drafters) t.true(plan.scales.find((s) => s.scale === d.scale + 1)!.drafters.includes(d.layer));
    for (const s of plan.scales) t.is(s.drafters.length * s.max + (4 - s.drafters.length) * s.min, 4 * a.tokensPerLayer);
    for (let l = 0; l < 4; l++)
      for (let k = 1; k < schedule.length; k++) t.true(a.stats.historyTopK[l][k] > 0 && a.stats.historyTopK[l][k] <= 1 + 1e-9);
  });
});

test('scalekv calibrate CLI writes a loadable plan; eval CLI reports fidelity against the full cache', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'scalekv-cal-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const out = join(dir, 'plan.json');
  const cli = (...args: string[]) => spawnSync(process.execPath, ['--import=tsx', 'lib/cli.ts', ...args], { encoding: 'utf8', timeout: 300_000 });
  const r = cli('calibrate', '--backend', 'cpu', '--prompt', 'a red fox', '--prompt', 'a blue lake', '--drafters', '2', '--top-k', '8', '--out', out);
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /drafters \(N_d = 2\)/);
  const plan = parseBudgetPlan(readFileSync(out, 'utf8'));
  t.is(plan.depth, 4);
  t.is(plan.scales.reduce((n, s) => n + s.drafters.length, 0), 2);
  const e = cli('eval', '--backend', 'cpu', '--seeds', '0', '--prompt', 'a red fox', '--policies', `full,scalekv-paper:plan=${out},base=27,window=4,window:27`, '--json');
  t.is(e.status, 0, e.stderr);
  const rep = JSON.parse(e.stdout);
  t.deepEqual(rep.summary.map((s: { policy: string }) => s.policy), ['full', `scalekv-paper:plan=${out},base=27,window=4`, 'window:27']);
  t.is(rep.summary[0].psnr, 'Infinity');
  t.is(rep.summary[0].ssim, 1);
  t.is(rep.summary[0].differingPixels, 0);
  for (const s of rep.summary.slice(1)) {
    t.true(s.psnr > 10 && s.psnr < 60 && s.ssim > 0 && s.ssim < 1, JSON.stringify(s));
    t.true(s.kvBytes < rep.summary[0].kvBytes);
  }
});

test('calibrate and eval accept checkpoints and text features on disk (like generate)', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'scalekv-cal-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const tiny = createTinyModel(0);
  const files = await writeTinyModelFiles(dir, tiny, ['a red fox', 'a blue lake']);
  const cli = (...args: string[]) => spawnSync(process.execPath, ['--import=tsx', 'lib/cli.ts', ...args], { encoding: 'utf8', timeout: 300_000 });
  const model = ['--preset', 'tiny', '--weights', files.weights, '--text', files.text, '--pn', '0.06M', '--dtype', 'f32', '--backend', 'cpu'];
  // The same prompts through the built-in tiny model give the same calibration.
  const fromDisk = cli('calibrate', ...model, '--drafters', '2', '--json');
  const builtIn = cli('calibrate', '--prompt', 'a red fox', '--prompt', 'a blue lake', '--backend', 'cpu', '--drafters', '2', '--json');
  t.is(fromDisk.status, 0, fromDisk.stderr);
  t.is(builtIn.status, 0, builtIn.stderr);
  t.deepEqual(JSON.parse(fromDisk.stdout).plan, JSON.parse(builtIn.stdout).plan);
  t.deepEqual(JSON.parse(fromDisk.stdout).stats, JSON.parse(builtIn.stdout).stats);
  const e = cli('eval', ...model, '--vae', files.vae, '--seeds', '0', '--policies', 'full,window:20');
  t.is(e.status, 0, e.stderr);
  t.regex(e.stdout, /\| full \| inf \| 1\.0000 \| 0 \/ 131072 \|/);
  t.regex(e.stdout, /\| window:20 \| \d+\.\d\d \| 0\.\d{4} \|/);
  // The prompts as text through the T5 directory: the same table.
  const viaT5 = ['--preset', 'tiny', '--weights', files.weights, '--t5', files.t5, '--prompt', 'a red fox', '--prompt', 'a blue lake', '--pn', '0.06M', '--dtype', 'f32', '--backend', 'cpu'];
  const e2 = cli('eval', ...viaT5, '--vae', files.vae, '--seeds', '0', '--policies', 'full,window:20');
  t.is(e2.status, 0, e2.stderr);
  const table = (out: string) => out.split('\n').filter((l) => l.startsWith('| ')).map((l) => l.split('|').slice(0, 5).join('|'));
  t.deepEqual(table(e2.stdout), table(e.stdout));
  const c2 = cli('calibrate', ...viaT5, '--drafters', '2', '--json');
  t.is(c2.status, 0, c2.stderr);
  t.deepEqual(JSON.parse(c2.stdout).plan, JSON.parse(fromDisk.stdout).plan);
});
