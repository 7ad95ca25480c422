// Conformance of Infinity's text stage (spec sec. 4.1) against the `text_encoder` golden fixture: a tiny T5 in the
// Hugging Face layout. The prompts' ids through tokenizer.json (exact), then the encoder's last hidden state on
// the real tokens of every prompt (kv), and the unpadded run of prompt 0 against the padded, masked row the
// official encoder produced (hidden_padded_first, on its real tokens).
import { join } from 'node:path';
import type { Engine } from '../engine.js';
import { SafetensorsFile } from '../safetensors.js';
import { loadTextEncoder } from '../text/t5-encoder.js';
import { T5_MAX_LENGTH, T5Tokenizer } from '../text/tokenizer.js';
import { Check, diffCheck, relCheck } from './compare.js';

/** The fixture's tolerance on kv: 1e-4 relative to max |kv| (fp32). */
export const TEXT_ENCODER_TOLERANCE = 1e-4;

export interface TextEncoderManifest {
  case: string;
  prompts: string[];
  max_length?: number;
}

export async function verifyTextEncoder(engine: Engine, manifest: TextEncoderManifest, dir: string): Promise<Check[]> {
  const io = new SafetensorsFile(join(dir, 'io.safetensors'));
  let want: { ids: Int32Array; lens: Int32Array; kv: Float32Array; padded: Float32Array };
  try {
    want = { ids: io.i32('ids'), lens: io.i32('lens'), kv: io.f32('kv'), padded: io.f32('hidden_padded_first') };
  } finally {
    io.close();
  }
  const encoder = await loadTextEncoder(dir, engine, { dtype: 'f32' });
  try {
    const tokenizer = T5Tokenizer.fromFile(dir, { maxLength: manifest.max_length ?? T5_MAX_LENGTH });
    const tokens = tokenizer.encodeBatch(manifest.prompts);
    const checks: Check[] = [
      diffCheck('ids', tokens.ids, want.ids, { note: `${manifest.prompts.length} prompts through tokenizer.json` }),
      diffCheck('lens', tokens.lens, want.lens, { note: tokens.truncated.some(Boolean) ? `truncated: prompts ${tokens.truncated.flatMap((t, i) => (t ? [i] : [])).join(', ')}` : undefined }),
    ];
    // The official ids feed the encoder, so a tokenizer difference cannot hide behind (or cause) a kv failure.
    const lens = Array.from(want.lens);
    const kv = await encoder.encodeIds(want.ids, lens);
    checks.push(relCheck('kv', kv, want.kv, TEXT_ENCODER_TOLERANCE, 'every prompt packed on its real tokens only (no padding)'));
    const first = await encoder.encodeIds(want.ids.subarray(0, lens[0]), [lens[0]]);
    const d = encoder.config.dModel;
    checks.push(
      relCheck('hidden_padded_first', first, want.padded.subarray(0, lens[0] * d), TEXT_ENCODER_TOLERANCE,
        `prompt 0 alone, unpadded, against its ${lens[0]} real rows of the padded, masked official run (the ${want.padded.length / d - lens[0]} padding rows are no token's features)`),
    );
    return checks;
  } finally {
    encoder.dispose();
  }
}
