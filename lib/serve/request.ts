/**
 * The body of `POST /v1/images/generations` and `POST /v1/jobs`: the OpenAI Images API fields (`prompt`, `n`,
 * `size`, `response_format`; `model`, `quality`, `style`, `user` are accepted and ignored) plus scalekv's extensions
 * (`seed`, `cfg`, `tau`, `negative_prompt`, `kv_policy`, `kv_dtype`), checked field by field so that a 400 names the field.
 * Fields this server does not know are ignored, as the OpenAI API's newer fields must not break a client.
 */
import { listAspectRatios, PN_SCALE_COUNTS, scaleSchedule, type PixelBudget } from '../model/schedule.js';
import { ApiError } from './api-error.js';

/** A generation request, checked: what the batcher groups and the runner turns into rows. */
export interface ImageRequest {
  prompt: string;
  negativePrompt?: string;
  /** Images for this prompt. */
  n: number;
  /** Height / width of the aspect template the size maps to, and the pixel budget. */
  aspect: number;
  pn: PixelBudget;
  /** The schedule's image size, "WxH": what comes back (the nearest the model makes to the size asked). */
  size: string;
  /** When given, the request is reproducible: it runs in a batch of its own (see batchKey). */
  seed?: number;
  cfg: number;
  tau: number;
  kvPolicy: string;
  /** 'int8' or 'fp8': the KV cache in 8 bits (PipelineGenerateOptions.kvDtype); absent: the model's dtype. */
  kvDtype?: 'int8' | 'fp8';
}

export interface RequestLimits {
  /** The most images one request may ask for. */
  maxImages: number;
  /** The pixel budgets this model serves, smallest first. */
  pixelBudgets: readonly PixelBudget[];
  /** Checks a KV policy spec against the model (throws a ScaleKVError); absent: checked where it runs. */
  checkKvPolicy?(spec: string): void;
}

/** OpenAI's own cap on a dall-e-3 prompt; longer text is cut at 511 T5 pieces anyway, so this only bounds memory. */
export const MAX_PROMPT_CHARS = 4000;
/** The OpenAI Images API's largest `n`. */
export const OPENAI_MAX_IMAGES = 10;
const MAX_SIDE = 4096;
const MIN_SIDE = 64;

/** The pixel budgets a model serves: the built-in tiny model is meant for small images (what `demo` offers). */
export function pixelBudgetsFor(tiny: boolean): PixelBudget[] {
  return tiny ? ['0.06M', '0.25M'] : (Object.keys(PN_SCALE_COUNTS) as PixelBudget[]);
}

const schedulePixels = (aspect: number, pn: PixelBudget) => scaleSchedule({ aspect, pn }).pixels;

function invalid(param: string, message: string): never {
  throw new ApiError(400, 'invalid_request_error', `${param}: ${message}`, { param });
}

function optionalNumber(body: Record<string, unknown>, name: string, dflt: number, lo: number, hi: number, integer = false): number {
  const v = body[name];
  if (v === undefined || v === null) return dflt;
  if (typeof v !== 'number' || !Number.isFinite(v)) invalid(name, `must be a number, got ${JSON.stringify(v)}`);
  if (integer && !Number.isSafeInteger(v)) invalid(name, `must be an integer, got ${v}`);
  if (v < lo || v > hi) invalid(name, `must be in [${lo}, ${hi}], got ${v}`);
  return v;
}

function optionalString(body: Record<string, unknown>, name: string): string | undefined {
  const v = body[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') invalid(name, `must be a string, got ${typeof v}`);
  return v;
}

/**
 * `size` ("WxH", or "auto": the model's default square) to the nearest aspect template (by h / w) and the pixel
 * budget whose image is nearest in area (by the ratio of areas), among those the model serves.
 */
export function sizeToSchedule(size: string | undefined, budgets: readonly PixelBudget[]): { aspect: number; pn: PixelBudget; size: string } {
  let aspect = 1;
  let pn = budgets.includes('1M') ? '1M' : budgets[0];
  if (size !== undefined && size !== 'auto') {
    const m = /^(\d{1,5})x(\d{1,5})$/.exec(size);
    if (!m) invalid('size', `must be "WIDTHxHEIGHT" (e.g. "1024x1024") or "auto", got ${JSON.stringify(size)}`);
    const [w, h] = [Number(m[1]), Number(m[2])];
    if (w < MIN_SIDE || h < MIN_SIDE || w > MAX_SIDE || h > MAX_SIDE) invalid('size', `each side must be in [${MIN_SIDE}, ${MAX_SIDE}] pixels, got ${size}`);
    const ratios = listAspectRatios();
    aspect = ratios.reduce((best, r) => (Math.abs(r - h / w) < Math.abs(best - h / w) ? r : best), ratios[0]);
    const area = (b: PixelBudget) => {
      const [ph, pw] = schedulePixels(aspect, b);
      return Math.abs(Math.log((ph * pw) / (w * h)));
    };
    pn = budgets.reduce((best, b) => (area(b) < area(best) ? b : best), budgets[0]);
  }
  const [ph, pw] = schedulePixels(aspect, pn);
  return { aspect, pn, size: `${pw}x${ph}` };
}

/** Checks a request body; throws ApiError 400 naming the first field that is wrong. */
export function parseImageRequest(body: unknown, limits: RequestLimits): ImageRequest {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) invalid('body', 'must be a JSON object');
  const b = body as Record<string, unknown>;
  const prompt = optionalString(b, 'prompt');
  if (prompt === undefined) invalid('prompt', 'is required');
  if (!prompt.trim()) invalid('prompt', 'must not be empty');
  if (prompt.length > MAX_PROMPT_CHARS) invalid('prompt', `is longer than ${MAX_PROMPT_CHARS} characters (${prompt.length})`);
  const negativePrompt = optionalString(b, 'negative_prompt');
  if (negativePrompt !== undefined && negativePrompt.length > MAX_PROMPT_CHARS)
    invalid('negative_prompt', `is longer than ${MAX_PROMPT_CHARS} characters (${negativePrompt.length})`);
  const n = optionalNumber(b, 'n', 1, 1, limits.maxImages, true);
  for (const ignored of ['model', 'quality', 'style', 'user']) optionalString(b, ignored);
  const format = optionalString(b, 'response_format');
  if (format !== undefined && format !== 'b64_json') invalid('response_format', `only "b64_json" is served (images are not stored), got ${JSON.stringify(format)}`);
  const outputFormat = optionalString(b, 'output_format');
  if (outputFormat !== undefined && outputFormat !== 'png') invalid('output_format', `only "png" is served, got ${JSON.stringify(outputFormat)}`);
  const { aspect, pn, size } = sizeToSchedule(optionalString(b, 'size'), limits.pixelBudgets);
  const seed = b.seed === undefined || b.seed === null ? undefined : optionalNumber(b, 'seed', 0, 0, 2 ** 31 - 1, true);
  const cfg = optionalNumber(b, 'cfg', 3, 0, 100);
  const tau = optionalNumber(b, 'tau', 1, 0.01, 10);
  const kvPolicy = optionalString(b, 'kv_policy') ?? 'full';
  // A budget-plan file would be read from the server's disk: not a client's to name.
  if (kvPolicy.includes('plan=')) invalid('kv_policy', 'plan files are not accepted over HTTP; use a built-in spec such as "scalekv:10%"');
  if (kvPolicy.length > 200) invalid('kv_policy', 'is too long');
  if (limits.checkKvPolicy) {
    try {
      limits.checkKvPolicy(kvPolicy);
    } catch (e) {
      invalid('kv_policy', (e as Error).message);
    }
  }
  const kvDtype = optionalString(b, 'kv_dtype');
  if (kvDtype !== undefined && kvDtype !== 'int8' && kvDtype !== 'fp8') invalid('kv_dtype', `must be "int8" or "fp8" (absent: the model's dtype), got ${JSON.stringify(kvDtype)}`);
  return { prompt, negativePrompt, n, aspect, pn, size, seed, cfg, tau, kvPolicy, kvDtype };
}

/**
 * Requests with the same key run in one batch: one schedule, one guidance and temperature, one KV policy and KV dtype, negative
 * prompts for every row or none (the unconditional rows attend to them, or to the learned embedding). The sampler
 * draws each image's bits from (seed, row), so a request that gives a seed has no key and runs alone: it gets the
 * images `scalekv demo --seed` gives, whatever else is queued.
 */
export function batchKey(r: ImageRequest): string | undefined {
  if (r.seed !== undefined) return undefined;
  return JSON.stringify([r.aspect, r.pn, r.cfg, r.tau, r.kvPolicy, r.kvDtype, r.negativePrompt !== undefined]);
}
