/** Every error the library raises carries a stable `code`, so callers can branch without parsing text. */
export type ErrorCode =
  | 'ERR_INVALID_ARG'
  | 'ERR_SHAPE'
  | 'ERR_DTYPE'
  | 'ERR_DISPOSED'
  | 'ERR_BACKEND_UNAVAILABLE'
  /** No native addon: no source build and no prebuilt platform package for this machine (or one that does not load). */
  | 'ERR_NATIVE_MISSING'
  /** `scalekv build` could not build a backend it was asked for (or one this machine should build). */
  | 'ERR_NATIVE_BUILD'
  | 'ERR_INDEX_RANGE'
  | 'ERR_INDEX_ORDER'
  | 'ERR_BUDGET'
  | 'ERR_DEVICE'
  | 'ERR_OUT_OF_MEMORY'
  | 'ERR_FORMAT'
  /** A pickle (.pth) asked for a global or opcode outside the state-dict whitelist; nothing was executed. */
  | 'ERR_UNSAFE_PICKLE'
  | 'ERR_FIXTURE'
  /** A generation was cancelled through its AbortSignal; everything it allocated was freed. */
  | 'ERR_ABORTED'
  | 'ERR_INTERNAL';

export class ScaleKVError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ScaleKVError';
    this.code = code;
  }
}

/** Re-raises a native Error (which has a `code` property) as a ScaleKVError with the same code. */
export function rethrowNative(e: unknown): never {
  if (e instanceof ScaleKVError) throw e;
  if (e instanceof Error && typeof (e as { code?: unknown }).code === 'string') {
    throw new ScaleKVError((e as unknown as { code: ErrorCode }).code, e.message, { cause: e });
  }
  throw e;
}

export function fail(code: ErrorCode, message: string): never {
  throw new ScaleKVError(code, message);
}
