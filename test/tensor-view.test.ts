import test from 'ava';
import { Rng, seedFor, testBackends, withEngine } from './helpers.js';
import type { BackendName } from '../lib/engine.js';

for (const backend of [...testBackends(), 'count'] as BackendName[]) {
  test(`${backend}: a view shares the memory of its tensor and outlives it`, async (t) => {
    const rng = new Rng(seedFor(t));
    await withEngine(backend, async (e) => {
      const before = e.memory();
      const [a, b, c] = [rng.int(1, 5), rng.int(1, 6), rng.int(1, 7)];
      const data = rng.normals(a * b * c);
      const base = e.tensor(data, [a, b, c], 'f32');
      const afterAlloc = e.memory();
      const flat = base.view([a * b * c]);
      const swapped = base.view([c, a * b]);
      t.deepEqual(flat.shape, [a * b * c]);
      t.deepEqual(swapped.shape, [c, a * b]);
      t.is(flat.dtype, 'f32');
      t.deepEqual(e.memory(), afterAlloc, 'a view allocates nothing');

      const replacement = rng.normals(a * b * c);
      swapped.write(replacement);
      base.dispose();
      t.is(e.memory().totalInUse, afterAlloc.totalInUse, 'the memory stays while a view is alive');
      if (backend !== 'count') t.deepEqual(await flat.read(), replacement, 'a write through one view is seen through another');
      flat.dispose();
      t.is(e.memory().totalInUse, afterAlloc.totalInUse);
      swapped.dispose();
      t.is(e.memory().totalInUse, before.totalInUse, 'released with the last handle');
    });
  });

  test(`${backend}: a view must keep the element count`, async (t) => {
    await withEngine(backend, async (e) => {
      const x = e.tensor(new Float32Array([1, 2, 3, 4, 5, 6]), [2, 3], 'f32');
      t.throws(() => x.view([4]), { code: 'ERR_SHAPE' });
      t.throws(() => x.view([2, 2, 2]), { code: 'ERR_SHAPE' });
      t.throws(() => x.view([-6]), { code: 'ERR_SHAPE' });
      x.dispose();
      t.throws(() => x.view([6]), { code: 'ERR_DISPOSED' });
    });
  });
}
