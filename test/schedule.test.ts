import test from 'ava';
import { join } from 'node:path';
import { rope2dPositions } from '../lib/model/rope2d.js';
import { listAspectRatios, officialTriples, PixelBudget, scaleSchedule } from '../lib/model/schedule.js';
import { SafetensorsFile } from '../lib/safetensors.js';
import { goldenDir } from './helpers.js';

test('1:1 1M schedule: grids, starts and total of spec sec. 3', (t) => {
  const s = scaleSchedule({ aspect: 1, pn: '1M' });
  t.deepEqual(s.scales.map(([h]) => h), [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]);
  t.true(s.scales.every(([h, w]) => h === w));
  t.deepEqual(s.starts, [0, 1, 5, 21, 57, 121, 265, 521, 921, 1497, 2521, 4121, 6425]);
  t.deepEqual(s.tokensPerScale, [1, 4, 16, 36, 64, 144, 256, 400, 576, 1024, 1600, 2304, 4096]);
  t.is(s.total, 10521);
  t.deepEqual(s.pixels, [1024, 1024]);
  t.deepEqual(s.final1M, [64, 64]);
  t.deepEqual(s.vaeScales, s.scales);
  t.deepEqual(officialTriples(s)[12], [1, 64, 64]);
});

test('pn prefixes: 7 / 10 / 12 / 13 scales and the 1:1 totals', (t) => {
  const want: [PixelBudget, number, number][] = [['0.06M', 7, 521], ['0.25M', 10, 2521], ['0.60M', 12, 6425], ['1M', 13, 10521]];
  for (const [pn, n, total] of want) {
    const s = scaleSchedule({ aspect: 1, pn });
    t.is(s.scales.length, n, pn);
    t.is(s.total, total, pn);
    t.deepEqual(s.final1M, [64, 64], `${pn}: RoPE normalises on the 1M grid`);
  }
});

test('1M totals and final grids of the non-square templates (spec sec. 3)', (t) => {
  const want: [number, number, [number, number]][] = [
    [1.25, 10774, [70, 56]], [1.333, 10973, [72, 54]], [1.5, 10997, [78, 52]], [1.75, 11252, [84, 48]],
    [2.0, 11269, [90, 45]], [2.5, 10805, [100, 40]], [3.0, 11123, [111, 37]],
  ];
  for (const [r, total, last] of want) {
    const s = scaleSchedule({ aspect: r, pn: '1M' });
    t.is(s.template, r);
    t.is(s.total, total, `ratio ${r}`);
    t.deepEqual(s.scales[12], last, `ratio ${r}`);
  }
  t.deepEqual(scaleSchedule({ aspect: 1.25, pn: '1M' }).scales, [[1, 1], [2, 2], [3, 3], [5, 4], [10, 8], [15, 12], [20, 16], [25, 20], [30, 24], [35, 28], [45, 36], [55, 44], [70, 56]]);
  t.deepEqual(scaleSchedule({ aspect: 3, pn: '1M' }).pixels, [1776, 592]);
});

test('15 templates; transposes swap h and w and have the same totals', (t) => {
  const ratios = listAspectRatios();
  t.deepEqual(ratios, [1, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2, 0.5, 2.5, 0.4, 3, 0.333]);
  const pairs: [number, number][] = [[1.25, 0.8], [1.333, 0.75], [1.5, 0.666], [1.75, 0.571], [2, 0.5], [2.5, 0.4], [3, 0.333]];
  for (const [tall, wide] of pairs)
    for (const pn of ['0.06M', '0.25M', '0.60M', '1M'] as PixelBudget[]) {
      const a = scaleSchedule({ aspect: tall, pn });
      const b = scaleSchedule({ aspect: wide, pn });
      t.is(b.template, wide);
      t.deepEqual(b.scales, a.scales.map(([h, w]) => [w, h]));
      t.deepEqual(b.final1M, [a.final1M[1], a.final1M[0]]);
      t.is(b.total, a.total);
    }
});

test('nearest template by absolute difference (first on ties, official order)', (t) => {
  t.is(scaleSchedule({ aspect: 1.1, pn: '1M' }).template, 1);
  t.is(scaleSchedule({ aspect: 1.2, pn: '1M' }).template, 1.25);
  t.is(scaleSchedule({ aspect: 1.125, pn: '1M' }).template, 1, 'exact tie between 1.0 and 1.25: the first');
  t.is(scaleSchedule({ aspect: 9 / 16, pn: '1M' }).template, 0.571);
  t.is(scaleSchedule({ aspect: 16 / 9, pn: '1M' }).template, 1.75);
  t.is(scaleSchedule({ aspect: 100, pn: '1M' }).template, 3);
  t.is(scaleSchedule({ aspect: 0.01, pn: '1M' }).template, 0.333);
  t.throws(() => scaleSchedule({ aspect: 0, pn: '1M' }), { message: /aspect/ });
  t.throws(() => scaleSchedule({ aspect: 1, pn: '2M' as PixelBudget }), { message: /pn/ });
});

test('patchify: the VAE schedule doubles each grid; the transformer schedule is unchanged', (t) => {
  const s = scaleSchedule({ aspect: 1, pn: '1M', patchify: true });
  t.deepEqual(s.vaeScales[12], [128, 128]);
  t.deepEqual(s.vaeScales.map(([h, w], i) => [h / 2, w / 2]), s.scales);
  t.is(s.total, 10521);
  t.deepEqual(s.pixels, [1024, 1024]);
});

const ropeDir = goldenDir('rope2d');
if (!ropeDir) {
  test('rope2d positions from scaleSchedule (skipped: no ../shared/golden and no $SCALEKV_GOLDEN)', (t) => {
    t.log('NOTICE: golden fixtures not found; schedule/RoPE agreement skipped');
    t.pass();
  });
} else {
  test('rope2dPositions(scaleSchedule) equals the golden rope2d positions', (t) => {
    const io = new SafetensorsFile(join(ropeDir, 'io.safetensors'));
    try {
      const cases: [string, number, PixelBudget][] = [['grid/r1.0_1M_hd64', 1, '1M'], ['grid/r1.333_0.06M_hd64', 1.333, '0.06M'], ['grid/r1.0_1M_hd128', 1, '1M']];
      for (const [name, aspect, pn] of cases) {
        const s = scaleSchedule({ aspect, pn });
        const want = io.i32(`${name}/positions`);
        t.is(want.length, 2 * s.total, name);
        t.deepEqual(rope2dPositions(s.scales, s.final1M), want, name);
        t.deepEqual(rope2dPositions(s.scales, aspect), want, `${name} (by ratio)`);
      }
      // A prefix schedule's positions are the prefix of the 1M ones (same normalising grid).
      const short = scaleSchedule({ aspect: 1, pn: '0.06M' });
      t.deepEqual(rope2dPositions(short.scales, short.final1M), io.i32('grid/r1.0_1M_hd64/positions').subarray(0, 2 * short.total));
    } finally {
      io.close();
    }
  });
}
