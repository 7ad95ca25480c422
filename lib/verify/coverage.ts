/**
 * What `scalekv verify` does with every tensor a fixture records: feeds it in, compares ours with it, or leaves it
 * unchecked for a stated reason. A recorded tensor with no role, or an expected one that no check compared, fails
 * the run: nothing recorded is skipped silently, whatever our side produced.
 */
import { Check, matchCheck } from './compare.js';

export type TensorRole =
  | { match: RegExp; role: 'input' }
  | { match: RegExp; role: 'expected' }
  | { match: RegExp; role: 'unchecked'; reason: string };

const CU_SEQLENS = 'the prefix sums of text/lens, which the loop derives itself from text/lens';

/** Roles of the recorded tensors per fixture kind (first match wins). */
export const TENSOR_ROLES: Record<string, TensorRole[]> = {
  update_kv_units: [
    { match: /^u\d+\/(key_states|value_states|query_states|query_row_index|query_rows)$/, role: 'input' },
    { match: /^u\d+\/(kept|window|pooled_scores|out_key|out_value)$/, role: 'expected' },
    { match: /^u\d+\/kept_torch_cpu$/, role: 'unchecked', reason: "torch 1.13 CPU top-k's implementation-defined tie order; expected ties go to the lowest index (golden README item 8), as u*/kept" },
    { match: /^u\d+\/topk_ties$/, role: 'unchecked', reason: 'diagnostic of the top-k boundary; the kept lists it explains are compared exactly' },
  ],
  forward_scalekv: [
    { match: /^(s\d+\/bits|text\/(kv_compact|lens))$/, role: 'input' },
    { match: /^text\/cu_seqlens_k$/, role: 'unchecked', reason: CU_SEQLENS },
    { match: /^(s\d+\/(logits|logits_fullcache)|kv\/L\d+_s\d+\/(kept|window)|kv\/(cache_len_before|cache_len_after|compressed))$/, role: 'expected' },
    { match: /^kv\/L\d+_s\d+\/topk_ties$/, role: 'unchecked', reason: 'diagnostic of the top-k boundary; the kept lists it explains are compared exactly' },
  ],
  forward_fullcache: [
    { match: /^(s\d+\/bits|text\/(kv_compact|lens))$/, role: 'input' },
    { match: /^text\/cu_seqlens_k$/, role: 'unchecked', reason: CU_SEQLENS },
    {
      match: /^(s\d+\/(x_in|logits|next_codes|word_embed)|hidden\/s\d+_layer\d+|text\/(normed_kv|cond_BD|cond_gss|ca_kv)|summed_codes|image_float|image_uint8_bgr)$/,
      role: 'expected',
    },
  ],
  bsq_codes: [
    { match: /^[^/]+\/s\d+\/bits$/, role: 'input' },
    { match: /^[^/]+\/s\d+\/(codes|summed|next_input)$/, role: 'expected' },
    { match: /^[^/]+\/s\d+\/next_input_area$/, role: 'unchecked', reason: "the training-side quantizer's area down-sampling (z_interplote_down); inference never runs it" },
    { match: /^msbsq\//, role: 'unchecked', reason: 'MultiScaleBSQ.forward on a random latent: the encoder-side quantizer, which inference does not run (optional in the fixture)' },
  ],
  rope2d: [
    { match: /^apply\/.+\/(q_in|k_in)$/, role: 'input' },
    { match: /^(grid\/.+\/(positions|cos_sin)|apply\/.+\/(q_out|k_out))$/, role: 'expected' },
  ],
  sampling: [
    { match: /^[^/]+\/logits$/, role: 'input' },
    { match: /^[^/]+\/(masked|keep)$/, role: 'expected' },
  ],
  text_encoder: [
    { match: /^(ids|lens|kv|hidden_padded_first)$/, role: 'expected' },
  ],
  vae_decode: [
    { match: /^z_[^/]+$/, role: 'input' },
    { match: /^raw_[^/]+$/, role: 'expected' },
  ],
};

export interface Unchecked {
  /** The recorded tensors left unchecked for this reason. */
  names: string[];
  reason: string;
}

/**
 * Accounts for every recorded tensor of a fixture of `kind`: the unchecked ones grouped by reason, and failing checks
 * for tensors without a role and expected tensors no check compared.
 */
export function coverage(kind: string, recorded: readonly string[], checks: readonly Check[]): { unchecked: Unchecked[]; failures: Check[] } {
  const roles = TENSOR_ROLES[kind] ?? [];
  const compared = new Set<string>();
  for (const c of checks) {
    compared.add(c.name);
    for (const n of c.covers ?? []) compared.add(n);
  }
  const unchecked = new Map<string, string[]>();
  const noRole: string[] = [];
  const notCompared: string[] = [];
  for (const name of recorded) {
    const r = roles.find((x) => x.match.test(name));
    if (!r) noRole.push(name);
    else if (r.role === 'expected' && !compared.has(name)) notCompared.push(name);
    else if (r.role === 'unchecked') unchecked.set(r.reason, [...(unchecked.get(r.reason) ?? []), name]);
  }
  const failures: Check[] = [];
  const list = (names: string[]) => `${names.slice(0, 4).join(', ')}${names.length > 4 ? `, ... (${names.length})` : ''}`;
  if (noRole.length) failures.push(matchCheck('recorded tensors without a role', false, `neither fed in, compared nor listed as unchecked: ${list(noRole)}`));
  if (notCompared.length) failures.push(matchCheck('recorded tensors not compared', false, `expected, but no check compared: ${list(notCompared)}`));
  return { unchecked: [...unchecked].map(([reason, names]) => ({ names, reason })), failures };
}
