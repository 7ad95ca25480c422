/**
 * Precomputed T5 features (`--text FEATURES.safetensors`, readTextFeatures): files whose `lens` hold hostile
 * counts (zero, negative, past int32 as I64, sums that miss the rows of `kv`), whose tensors have other dtypes or
 * shapes, or are missing, plus byte-level mutations. A file that loads must hold lens that partition kv's rows.
 */
import fc from 'fast-check';
import { readTextFeatures } from '../../../lib/pipeline.js';
import { safetensors, StTensor } from '../../checkpoint-writers.js';
import { FuzzTarget, FuzzViolation, scratchFile } from '../harness.js';
import { byteMutations } from '../mutate.js';

const CHANNELS = 4;

function check(input: Uint8Array): void {
  const { kv, lens } = readTextFeatures(scratchFile('text.safetensors', input), CHANNELS);
  if (!lens.length || lens.some((n) => !Number.isSafeInteger(n) || n < 1) || lens.reduce((a, b) => a + b, 0) * CHANNELS !== kv.length)
    throw new FuzzViolation(`lens ${JSON.stringify(lens.slice(0, 8))} do not partition ${kv.length / CHANNELS} rows`);
}

const features = fc
  .record({
    lens: fc.array(fc.oneof(fc.integer({ min: 1, max: 4 }), fc.constantFrom(0, -1, 2 ** 31 - 1, -(2 ** 31))), { minLength: 0, maxLength: 4 }),
    rowsDelta: fc.constantFrom(0, 0, 0, 1, -1),
    lensDtype: fc.constantFrom('I32', 'I64', 'F32', 'U8'),
    kvDtype: fc.constantFrom('F32', 'F32', 'BF16', 'I32'),
    channels: fc.constantFrom(CHANNELS, CHANNELS, 3),
    drop: fc.constantFrom(undefined, undefined, 'kv', 'lens'),
  })
  .map(({ lens, rowsDelta, lensDtype, kvDtype, channels, drop }) => {
    const rows = Math.max(0, Math.min(64, lens.reduce((a, b) => a + Math.max(0, b), 0) + rowsDelta));
    const width = { I32: 4, I64: 8, F32: 4, U8: 1, BF16: 2 } as const;
    const lensBytes = Buffer.alloc(lens.length * width[lensDtype as keyof typeof width]);
    lens.forEach((n, i) => (lensDtype === 'I64' ? lensBytes.writeBigInt64LE(BigInt(n), 8 * i) : lensDtype === 'I32' ? lensBytes.writeInt32LE(n, 4 * i) : lensDtype === 'F32' ? lensBytes.writeFloatLE(n, 4 * i) : (lensBytes[i] = n & 0xff)));
    const tensors: StTensor[] = [
      { name: 'kv', dtype: kvDtype as StTensor['dtype'], shape: [rows, channels], data: new Uint8Array(rows * channels * width[kvDtype as keyof typeof width]) },
      { name: 'lens', dtype: lensDtype as StTensor['dtype'], shape: [lens.length], data: lensBytes },
    ];
    return safetensors(tensors.filter((t) => t.name !== drop));
  });

export const textFeaturesTarget: FuzzTarget = {
  name: 'text-features',
  codes: ['ERR_FORMAT', 'ERR_SHAPE'],
  inputs: fc.oneof(features, byteMutations(features)).map((bytes) => ({ bytes })),
  check,
  allocationBound: (input) => input.length * 2 + 4096,
};
