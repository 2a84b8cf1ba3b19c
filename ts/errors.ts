/**
 * Every failure the package reports is a `MultifdError` with a stable `code`. The codes come
 * from the Rust core (`crates/multifd-core/src/error.rs`); a test keeps this list in step.
 */
export const ERROR_CODES = [
  'ERR_MULTIFD_BAD_MAGIC',
  'ERR_MULTIFD_BAD_VERSION',
  'ERR_MULTIFD_UUID_MISMATCH',
  'ERR_MULTIFD_CHANNEL_ID_RANGE',
  'ERR_MULTIFD_CHANNEL_DUPLICATE',
  'ERR_MULTIFD_PAGES_ALLOC',
  'ERR_MULTIFD_NORMAL_PAGES',
  'ERR_MULTIFD_ZERO_PAGES',
  'ERR_MULTIFD_BLOCK_NAME',
  'ERR_MULTIFD_UNKNOWN_BLOCK',
  'ERR_MULTIFD_OFFSET_ALIGN',
  'ERR_MULTIFD_OFFSET_RANGE',
  'ERR_MULTIFD_UNKNOWN_FLAGS',
  'ERR_MULTIFD_UNSUPPORTED_COMPRESSION',
  'ERR_MULTIFD_UNSUPPORTED_PACKET',
  'ERR_MULTIFD_COMPRESSION_MISMATCH',
  'ERR_MULTIFD_PAYLOAD_SIZE',
  'ERR_MULTIFD_TRUNCATED',
  'ERR_MULTIFD_INVALID_ARGUMENT',
  'ERR_MULTIFD_IO',
  'ERR_MULTIFD_CONNECTION_CLOSED',
  'ERR_MULTIFD_TIMEOUT',
  'ERR_MULTIFD_CANCELLED',
  'ERR_MULTIFD_BLOCK_MISMATCH',
  'ERR_MULTIFD_CHANNEL_COUNT_MISMATCH',
  'ERR_MULTIFD_PROTOCOL',
  'ERR_MULTIFD_UNKNOWN_CHANNEL',
  'ERR_MULTIFD_STATE',
  'ERR_MULTIFD_ZERO_COPY_UNAVAILABLE',
  'ERR_MULTIFD_DECOMPRESS',
  'ERR_MULTIFD_FILE_FORMAT',
  'ERR_MULTIFD_INCOMPLETE',
  'ERR_MULTIFD_NO_SPACE',
  'ERR_MULTIFD_NO_CONVERGENCE',
  'ERR_MULTIFD_INTEGRITY',
  'ERR_MULTIFD_TLS_CONFIG',
  'ERR_MULTIFD_TLS_HANDSHAKE',
  'ERR_MULTIFD_TLS_UNTRUSTED',
  'ERR_MULTIFD_TLS_EXPIRED',
  'ERR_MULTIFD_TLS_NAME_MISMATCH',
  'ERR_MULTIFD_TLS_NOT_ALLOWED',
  'ERR_MULTIFD_TLS_REJECTED',
  'ERR_MULTIFD_TLS_REQUIRED',
  'ERR_MULTIFD_TLS_UNAVAILABLE',
  'ERR_MULTIFD_DUPLICATE_BLOCK',
  'ERR_MULTIFD_OUTPUT_EXISTS',
  'ERR_MULTIFD_SOURCE_TRUNCATED',
  'ERR_MULTIFD_QEMU_STREAM',
  'ERR_MULTIFD_OUT_OF_SEQUENCE',
  'ERR_MULTIFD_RESUME_MISMATCH',
  'ERR_MULTIFD_RESUME_JOURNAL',
] as const

export type MultifdErrorCode = (typeof ERROR_CODES)[number]

const KNOWN = new Set<string>(ERROR_CODES)

export function isCode(s: unknown): s is MultifdErrorCode {
  return typeof s === 'string' && KNOWN.has(s)
}

/** A code from the native layer or a peer; one this version does not know is a protocol error. */
export function codeOf(s: string): MultifdErrorCode {
  return isCode(s) ? s : 'ERR_MULTIFD_PROTOCOL'
}

export class MultifdError extends Error {
  override readonly name = 'MultifdError'
  readonly code: MultifdErrorCode
  /** True when the peer reported this failure over the control connection. */
  remote = false
  /** Errors that happened after this one, kept for diagnosis (first error wins). */
  secondary: unknown[] = []

  constructor(code: MultifdErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.code = code
  }
}

/** A failure carried by a native event. */
export function nativeError(e: { code: string; message: string }): MultifdError {
  return new MultifdError(codeOf(e.code), e.message)
}

/**
 * Turns an error thrown by the native addon into a `MultifdError`: every binding throws errors
 * whose `code` property is the stable code and whose message is the core's message. A napi
 * refusal of an argument's type (its `code` is napi's status, such as `NumberExpected`) is an
 * invalid argument. Anything else is returned unchanged.
 */
export function fromNative(e: unknown): unknown {
  if (!(e instanceof Error) || e instanceof MultifdError) return e
  const code = 'code' in e ? e.code : undefined
  if (isCode(code)) return new MultifdError(code, e.message, { cause: e })
  if (typeof code === 'string' && NAPI_ARGUMENT_STATUS.has(code)) return new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', e.message, { cause: e })
  return e
}

/** napi statuses that mean JavaScript passed a value of the wrong type. */
const NAPI_ARGUMENT_STATUS = new Set(['InvalidArg', 'ObjectExpected', 'StringExpected', 'NameExpected', 'FunctionExpected', 'NumberExpected', 'BooleanExpected', 'ArrayExpected', 'BigintExpected', 'DateExpected', 'ArrayBufferExpected', 'DetachableArraybufferExpected'])

/** Any thrown value as a MultifdError (unknown failures become ERR_MULTIFD_IO). */
export function asMultifdError(e: unknown): MultifdError {
  const converted = fromNative(e)
  if (converted instanceof MultifdError) return converted
  return new MultifdError('ERR_MULTIFD_IO', converted instanceof Error ? converted.message : String(converted), { cause: converted })
}

/** Calls into the addon, converting its errors. */
export function native<T>(call: () => T): T {
  try {
    return call()
  } catch (e) {
    throw fromNative(e)
  }
}
