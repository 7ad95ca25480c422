/**
 * An error the HTTP API answers with, in the OpenAI error shape (`{ error: { message, type, param, code } }`, what
 * the official clients parse): a status, a type, the request field at fault when there is one.
 */
export type ApiErrorType = 'invalid_request_error' | 'not_found' | 'rate_limit_exceeded' | 'server_unavailable' | 'timeout' | 'cancelled' | 'server_error';

export class ApiError extends Error {
  readonly status: number;
  readonly type: ApiErrorType;
  readonly param: string | null;
  /** Seconds a client should wait before retrying (429 and 503). */
  readonly retryAfter?: number;
  constructor(status: number, type: ApiErrorType, message: string, o: { param?: string; retryAfter?: number } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.type = type;
    this.param = o.param ?? null;
    this.retryAfter = o.retryAfter;
  }

  toJSON(): { error: { message: string; type: ApiErrorType; param: string | null; code: ApiErrorType } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.type } };
  }
}

/** The answer to a request that arrives, or still waits, while the server or worker drains. */
export function shuttingDown(): ApiError {
  return new ApiError(503, 'server_unavailable', 'the server is shutting down', { retryAfter: 1 });
}
