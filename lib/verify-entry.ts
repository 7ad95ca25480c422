/**
 * `scalekv/verify`: conformance against the official fixtures (the golden format: a directory with manifest.json and
 * io.safetensors). `verifyFixture` runs one directory of any supported kind on a fresh engine; the per-kind runners
 * take an engine of your own; the comparison helpers state what "agrees" means (max relative error with an element
 * floor, or the number of differing entries).
 *
 * ```ts
 * import { verifyFixture } from 'scalekv/verify';
 * const report = await verifyFixture('../shared/golden/rope2d', { backend: 'cpu' });
 * console.log(report.pass, report.checks.map((c) => c.name));
 * ```
 */
export { verifyFixture, VERIFY_KINDS } from './verify/index.js';
export type { Check, ElementErrors, Unchecked, VerifyReport } from './verify/index.js';
export { compareFloats, diffCheck, differences, ELEMENT_FLOOR, formatElements, matchCheck, maxRelErr, relCheck } from './verify/compare.js';
export { F32_TOLERANCE, verifyUpdateKvUnits } from './verify/update-kv-units.js';
/** verifyUpdateKvUnits reads the fixture's io.safetensors through this reader. */
export { SafetensorsFile } from './safetensors.js';
export type { UnitManifest } from './verify/update-kv-units.js';
export { ROPE_TOLERANCE, verifyRope2d } from './verify/rope2d.js';
export type { Rope2dManifest } from './verify/rope2d.js';
export { BSQ_TOLERANCE, verifyBsqCodes } from './verify/bsq-codes.js';
export type { BsqCodesManifest } from './verify/bsq-codes.js';
export { VAE_TOLERANCE, verifyVaeDecode } from './verify/vae-decode.js';
export type { VaeDecodeManifest } from './verify/vae-decode.js';
export { verifySampling } from './verify/sampling.js';
export type { SamplingManifest } from './verify/sampling.js';
export { FORWARD_F32_TOLERANCE, IMAGE_U8_MAX_FRACTION, verifyForwardFullcache } from './verify/forward-fullcache.js';
export type { ForwardFullcacheManifest, ForwardFullcacheOptions } from './verify/forward-fullcache.js';
export { verifyForwardScalekv } from './verify/forward-scalekv.js';
export type { ForwardScalekvManifest, ForwardScalekvOptions } from './verify/forward-scalekv.js';
