import test from 'ava';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { decodePng } from '../lib/image/png.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { safetensors, writeTinyModelFiles } from './checkpoint-writers.js';
import { SafetensorsFile } from '../lib/safetensors.js';

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ['--import=tsx', 'lib/cli.ts', ...args], { encoding: 'utf8', timeout: 300_000 });

function tmp(t: { teardown(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'scalekv-cli-'));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function pngs(dir: string) {
  return readdirSync(dir).filter((f) => f.endsWith('.png')).sort().map((f) => decodePng(readFileSync(join(dir, f))));
}

test('demo writes one PNG per prompt, reports on stdout and progress on stderr only', (t) => {
  const out = tmp(t);
  const r = cli('demo', '--backend', 'cpu', '--out', out, '--prompt', 'a red fox', '--prompt', 'a blue lake', '--seed', '7', '--json');
  t.is(r.status, 0, r.stderr);
  const report = JSON.parse(r.stdout);
  t.is(report.images.length, 2);
  t.is(report.scales, 7);
  t.true(report.memory.totalPeak > 0 && report.kvBytes > 0);
  t.regex(r.stderr, /scale 7\/7/);
  const images = pngs(out);
  t.is(images.length, 2);
  for (const img of images) {
    t.deepEqual([img.width, img.height, img.channels], [256, 256, 3]);
    const distinct = new Set(img.data).size;
    t.true(distinct > 32, `a flat image (${distinct} distinct byte values)`);
  }
  t.notDeepEqual(images[0].data, images[1].data, 'two prompts gave the same image');
  // The same seed and prompts give the same pixels.
  const again = tmp(t);
  t.is(cli('demo', '--backend', 'cpu', '--out', again, '--prompt', 'a red fox', '--prompt', 'a blue lake', '--seed', '7').status, 0);
  t.deepEqual(pngs(again).map((i) => i.data), images.map((i) => i.data));
  // A KV policy spec: the cache holds less.
  const windowed = cli('demo', '--backend', 'cpu', '--out', tmp(t), '--prompt', 'a red fox', '--prompt', 'a blue lake', '--seed', '7', '--policy', 'streamingllm:4+60', '--json');
  t.is(windowed.status, 0, windowed.stderr);
  const w = JSON.parse(windowed.stdout);
  t.is(w.policy, 'streamingllm:4+60');
  t.true(w.kvBytes > 0 && w.kvBytes < report.kvBytes, `KV bytes ${w.kvBytes} vs full ${report.kvBytes}`);
  t.is(w.images.length, 2);
  const bad = cli('demo', '--backend', 'cpu', '--out', tmp(t), '--policy', 'nonsense:1');
  t.is(bad.status, 1);
  t.regex(bad.stderr, /ERR_INVALID_ARG/);
});

test('generate runs checkpoints and a text-features file written to disk, and rejects bad ones', async (t) => {
  const dir = tmp(t);
  const tiny = createTinyModel(3);
  const files = await writeTinyModelFiles(dir, tiny, ['a castle in the snow']);
  const out = join(dir, 'out');
  const args = ['generate', '--preset', 'tiny', '--weights', files.weights, '--vae', files.vae,
    '--text', files.text, '--pn', '0.06M', '--dtype', 'f32', '--backend', 'cpu', '--out', out];
  const r = cli(...args, '--seed', '5');
  t.is(r.status, 0, r.stderr);
  t.regex(r.stdout, /wrote .*image-5-0\.png/);
  const [img] = pngs(out);
  t.deepEqual([img.width, img.height], [256, 256]);

  const batch = join(dir, 'batch');
  const b = cli(...args.map((a) => (a === out ? batch : a)), '--batch', '3', '--seed', '5', '--json');
  t.is(b.status, 0, b.stderr);
  t.is(JSON.parse(b.stdout).images.length, 3);
  const three = pngs(batch);
  t.deepEqual(three[0].data, img.data, 'image 0 of a batch differs from the single image of the same seed');
  t.notDeepEqual(three[1].data, three[0].data, 'images of one prompt in a batch must sample their own bits');

  const wrongPreset = cli(...args.map((a) => (a === 'tiny' ? 'infinity-2b' : a)));
  t.is(wrongPreset.status, 1);
  t.regex(wrongPreset.stderr, /ERR_(SHAPE|FORMAT)/);
  writeFileSync(join(dir, 'bad-text.safetensors'), safetensors([{ name: 'kv', dtype: 'F32', shape: [2, 3], data: new Uint8Array(24) }]));
  const badText = cli(...args.map((a) => (a.endsWith('text.safetensors') ? join(dir, 'bad-text.safetensors') : a)));
  t.is(badText.status, 1);
  t.regex(badText.stderr, /ERR_FORMAT/);
});

test('eval reports every policy (ScaleKV and the four baselines) against the full cache', (t) => {
  const r = cli('eval', '--seeds', '0', '--backend', 'cpu', '--json');
  t.is(r.status, 0, r.stderr);
  const report = JSON.parse(r.stdout) as { summary: { policy: string; psnr: number | string; ssim: number; kvBytes: number }[] };
  const names = report.summary.map((s) => s.policy);
  for (const p of ['full', 'scalekv', 'window:', 'streamingllm:', 'snapkv:', 'pyramidkv:']) t.true(names.some((n) => n.startsWith(p)), `${p} missing from ${names}`);
  const full = report.summary[0];
  t.is(full.psnr, 'Infinity');
  for (const s of report.summary.slice(1)) {
    t.true(typeof s.psnr === 'number' && s.psnr > 5, `${s.policy}: PSNR ${s.psnr}`);
    t.true(s.kvBytes < full.kvBytes, `${s.policy} holds no less KV than the full cache`);
  }
});

test('generate --t5 DIR --prompt equals generate --text of the same prompts; encode-text writes the file --text reads', async (t) => {
  const dir = tmp(t);
  const prompts = ['a castle in the snow', 'a blue lake at night'];
  const files = await writeTinyModelFiles(dir, createTinyModel(4), prompts);
  const common = ['generate', '--preset', 'tiny', '--weights', files.weights, '--vae', files.vae, '--pn', '0.06M', '--dtype', 'f32', '--backend', 'cpu', '--seed', '3'];
  const viaText = join(dir, 'via-text');
  const a = cli(...common, '--text', files.text, '--out', viaText);
  t.is(a.status, 0, a.stderr);
  const viaT5 = join(dir, 'via-t5');
  const b = cli(...common, '--t5', files.t5, '--prompt', prompts[0], '--prompt', prompts[1], '--out', viaT5, '--json');
  t.is(b.status, 0, b.stderr);
  t.true(JSON.parse(b.stdout).timings.textMs > 0);
  t.deepEqual(pngs(viaT5).map((i) => i.data), pngs(viaText).map((i) => i.data));
  // A negative prompt for every prompt changes the images.
  const viaNeg = join(dir, 'via-neg');
  t.is(cli(...common, '--t5', files.t5, '--prompt', prompts[0], '--prompt', prompts[1], '--negative-prompt', 'dark', '--out', viaNeg).status, 0);
  t.notDeepEqual(pngs(viaNeg)[0].data, pngs(viaT5)[0].data);

  const feats = join(dir, 'feats.safetensors');
  const enc = cli('encode-text', '--t5', files.t5, '--prompt', prompts[0], '--prompt', prompts[1], '--out', feats, '--backend', 'cpu', '--json');
  t.is(enc.status, 0, enc.stderr);
  const report = JSON.parse(enc.stdout);
  t.deepEqual(report.truncated, [false, false]);
  t.deepEqual(new SafetensorsFile(feats).i32('lens'), new SafetensorsFile(files.text).i32('lens'));
  t.deepEqual(new SafetensorsFile(feats).f32('kv'), new SafetensorsFile(files.text).f32('kv'));

  const both = cli(...common, '--t5', files.t5, '--text', files.text, '--prompt', 'x', '--out', join(dir, 'x'));
  t.is(both.status, 1);
  t.regex(both.stderr, /ERR_INVALID_ARG/);
  const noPrompt = cli(...common, '--t5', files.t5, '--out', join(dir, 'y'));
  t.regex(noPrompt.stderr, /--t5 needs at least one --prompt/);
  const missing = cli('encode-text', '--t5', join(dir, 'nowhere'), '--prompt', 'a', '--out', join(dir, 'z.safetensors'), '--backend', 'cpu');
  t.is(missing.status, 1);
  t.regex(missing.stderr, /ERR_INVALID_ARG/);
});

test('every command answers --help with its own usage and examples; --version prints the package version', (t) => {
  const version = JSON.parse(readFileSync('package.json', 'utf8')).version as string;
  const v = cli('--version');
  t.is(v.status, 0);
  t.is(v.stdout.trim(), version);
  for (const command of ['demo', 'generate', 'encode-text', 'serve', 'worker', 'plan', 'calibrate', 'eval', 'verify', 'inspect', 'info', 'build']) {
    const r = cli(command, '--help');
    t.is(r.status, 0, `${command}: ${r.stderr}`);
    t.true(r.stdout.startsWith(`usage: scalekv ${command}`), `${command}: ${r.stdout.slice(0, 80)}`);
    t.regex(r.stdout, new RegExp(`examples:\\n\\s+scalekv ${command}`), command);
    t.is(r.stderr, '', `${command} --help writes nothing to stderr`);
  }
  const unknown = cli('generate', '--bogus');
  t.is(unknown.status, 1);
  t.regex(unknown.stderr, /^scalekv: Unknown option '--bogus'.*\[ERR_INVALID_ARG\]\n$/s);
  const missingValue = cli('inspect', 'x', '--prefix');
  t.regex(missingValue.stderr, /--prefix.*\[ERR_INVALID_ARG\]\n$/s);
});

test('build: an unknown --backend is a coded argument error, before anything is built', (t) => {
  const r = cli('build', '--backend', 'cpu,tpu');
  t.is(r.status, 1);
  t.regex(r.stderr, /unknown backend 'tpu' \(choose from cpu, cuda, emu\) \[ERR_INVALID_ARG\]/);
  t.is(r.stdout, '');
});
