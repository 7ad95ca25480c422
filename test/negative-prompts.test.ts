// Negative prompts (spec sec. 4.2): with CFG the unconditional rows attend to each prompt's negative features at
// their own length instead of cfg_uncond[:len]. Checked on the tiny model against the layout the spec gives, not
// against the loop's own code: cfg_uncond passed as the negatives reproduces the plain run bit for bit, and with
// negatives of other lengths the normalised text rows and cu_seqlens are those of concat(kv_pos, kv_neg).
import test from 'ava';
import { generate } from '../lib/model/generate.js';
import { InfinityModel, TextFeatures } from '../lib/model/infinity.js';
import { scaleSchedule } from '../lib/model/schedule.js';
import { createTinyModel } from '../lib/model/tiny.js';
import { concatTextFeatures } from '../lib/pipeline.js';
import { maxAbs, maxAbsDiff, syntheticText, withEngine } from './helpers.js';

const tiny = createTinyModel(5);
const Ct = tiny.config.textChannels;
const text = concatTextFeatures([syntheticText('a red fox in the snow'), syntheticText('a lake')]);
const schedule = scaleSchedule({ aspect: 1, pn: '0.06M' }).scales.slice(0, 4);

test('negative features equal to cfg_uncond[:len_b] reproduce the run without negatives bit for bit', async (t) => {
  const uncond = tiny.weights.f32('cfg_uncond');
  const negative: TextFeatures = concatTextFeatures(text.lens.map((n) => ({ kv: uncond.slice(0, n * Ct), lens: [n] })));
  await withEngine('cpu', async (e) => {
    const model = await InfinityModel.load(e, tiny.weights, tiny.config);
    try {
      const run = async (negativeText?: TextFeatures) => {
        const r = await generate(model, { textFeatures: text, negativeText, schedule, cfg: 3, seed: 4, capture: { logits: true } });
        r.summedCodes.dispose();
        return r;
      };
      const plain = await run();
      const same = await run(negative);
      for (const [name, v] of plain.captured) t.deepEqual(same.captured.get(name), v, name);
      t.deepEqual(same.bits, plain.bits);
      // Another negative changes the logits (the check above can fail).
      const other = await run(concatTextFeatures([syntheticText('blurry'), syntheticText('dark night sky')]));
      t.notDeepEqual(other.captured.get('s03/logits'), plain.captured.get('s03/logits'));
    } finally {
      model.dispose();
    }
  });
});

test('negatives of their own lengths: unconditional rows after the conditional ones, cu_seqlens [0, l0, l0+l1, +n0, +n1]', async (t) => {
  const negative = concatTextFeatures([syntheticText('blurry'), syntheticText('dark night sky over a sea')]);
  const w = tiny.weights.f32('text_norm.weight');
  await withEngine('cpu', async (e) => {
    const model = await InfinityModel.load(e, tiny.weights, tiny.config);
    try {
      let normed: Float32Array | undefined;
      const ctx = await model.prepareText(text, true, (o) => void (normed = Float32Array.from(o.normedKv)), negative);
      try {
        const [l0, l1] = text.lens;
        const [n0, n1] = negative.lens;
        t.deepEqual(Array.from(ctx.cuSeqlens), [0, l0, l0 + l1, l0 + l1 + n0, l0 + l1 + n0 + n1]);
        t.is(ctx.rows, 4);
        // text_norm (RMSNorm, eps 1e-6) of the rows in order: the prompts, then the negatives.
        const rows = new Float32Array([...text.kv, ...negative.kv]);
        const want = new Float64Array(rows.length);
        for (let r = 0; r < rows.length / Ct; r++) {
          let ss = 0;
          for (let j = 0; j < Ct; j++) ss += rows[r * Ct + j] ** 2;
          const inv = 1 / Math.sqrt(ss / Ct + 1e-6);
          for (let j = 0; j < Ct; j++) want[r * Ct + j] = rows[r * Ct + j] * inv * w[j];
        }
        t.truthy(normed);
        t.true(maxAbsDiff(normed as Float32Array, want) <= 1e-6 * maxAbs(want));
      } finally {
        ctx.dispose();
      }
      // Without CFG there are no unconditional rows: negatives are unused.
      const noCfg = await model.prepareText(text, false, undefined, negative);
      t.deepEqual(Array.from(noCfg.cuSeqlens), [0, text.lens[0], text.lens[0] + text.lens[1]]);
      noCfg.dispose();
      await t.throwsAsync(model.prepareText(text, true, undefined, syntheticText('one only')), { code: 'ERR_INVALID_ARG' });
    } finally {
      model.dispose();
    }
  });
});
