/**
 * Option schemas shared by the facade, the control protocol and the CLI. Every limit, enum and
 * combination rule comes from the Rust core (`crates/multifd-core/src/limits.rs` and the
 * compression registry) through the binding, so each is stated once: a new compression method
 * or a changed range needs nothing here. docs/LIMITS.md lists them.
 */
import { z } from 'zod'
import { MultifdError } from './errors.js'
import { binding } from './native.js'

/** Every limit and rule, as the core describes them. */
export const LIMITS = binding.limits()

export type IntRange = (typeof LIMITS)['channels']

/** An integer in `r`. */
export const intIn = (r: IntRange): z.ZodInt => z.int().min(r.min).max(r.max)

/** `r` as `min..max`, for messages and help. */
export const rangeText = (r: IntRange): string => `${r.min}..${r.max}`

/** The core's default for `r` (a range the core gives one for). */
function defaultOf(r: IntRange, what: string): number {
  if (r.default == null) throw new Error(`the native limits give no default for ${what}`)
  return r.default
}

export const Channels = intIn(LIMITS.channels)
export const DEFAULT_CHANNELS = defaultOf(LIMITS.channels, 'channels')
/** Connect, handshake and channel-arrival timeouts, in milliseconds. */
export const TimeoutMs = intIn(LIMITS.timeoutMs)
export const DEFAULT_TIMEOUT_MS = defaultOf(LIMITS.timeoutMs, 'timeouts')
export const DEFAULT_PAGE_SIZE = defaultOf(LIMITS.pageSize, 'the page size')
/** `peerTimeoutMs`: 0 disables the no-progress bound, otherwise within the core's range. */
export const PeerTimeoutMs = z.union([z.literal(0), intIn(LIMITS.peerTimeoutMs)])
export const DEFAULT_PEER_TIMEOUT_MS = defaultOf(LIMITS.peerTimeoutMs, 'peerTimeoutMs')
/** Bytes per second over all channels of a session. */
export const Bandwidth = intIn(LIMITS.maxBandwidth)
/** `channelRetries`: redials of a broken connection (a channel or the control connection); 0 fails at the first fault. */
export const ChannelRetries = intIn(LIMITS.channelRetries)
export const DEFAULT_CHANNEL_RETRIES = defaultOf(LIMITS.channelRetries, 'channelRetries')
/** `minChannels`: channels that must remain when one cannot be redialled (at most `channels`, checked with the source's rules). */
export const MinChannels = intIn(LIMITS.channels)
/** `resumeWindowMs`: how long a destination waits for a lost connection's replacement (and `recv --resume` for a restarted source's new session); 0 fails at once. */
export const ResumeWindowMs = intIn(LIMITS.resumeWindowMs)
export const DEFAULT_RESUME_WINDOW_MS = defaultOf(LIMITS.resumeWindowMs, 'resumeWindowMs')

export const PageSize = intIn(LIMITS.pageSize).refine((n) => (n & (n - 1)) === 0, {
  error: `page size must be a power of two from ${LIMITS.pageSize.min} to ${LIMITS.pageSize.max}`,
})

/** `tcp:HOST:PORT` (port 0 to let the system choose, when listening) or `unix:PATH`. */
export const Address = z.string().superRefine((s, ctx) => {
  const problem = binding.checkAddress(s)
  if (problem != null) ctx.addIssue({ code: 'custom', message: problem })
})

const oneOf = (names: string[]): z.ZodEnum<Record<string, string>> => z.enum(names as [string, ...string[]])

/** `none` or a method of the core's registry. */
export const CompressionMethod = oneOf(LIMITS.compression.map((m) => m.name))
export type CompressionMethod = z.infer<typeof CompressionMethod>

export const Integrity = oneOf(LIMITS.integrity)
export const ZeroPageDetection = oneOf(LIMITS.zeroPageDetection)

/** The compression levels, as help text: `zlib 1..9, zstd 1..20 (default 1)`. */
export function compressionLevelsText(): string {
  const withLevels = LIMITS.compression.filter((m) => m.levels)
  const defaults = new Set(withLevels.map((m) => m.levels!.default))
  const ranges = withLevels.map((m) => `${m.name} ${rangeText(m.levels!)}${defaults.size > 1 ? ` (default ${m.levels!.default})` : ''}`).join(', ')
  return defaults.size === 1 ? `${ranges} (default ${[...defaults][0]})` : ranges
}

export const BlockName = z
  .string()
  .min(1)
  .refine((s) => Buffer.byteLength(s) <= LIMITS.blockNameBytes.max && !s.includes('\0'), {
    error: `block names are ${rangeText(LIMITS.blockNameBytes)} bytes of UTF-8 without NUL`,
  })

export const BlockDescriptor = z.strictObject({
  name: BlockName,
  length: z.int().nonnegative(),
})
export type BlockDescriptor = z.infer<typeof BlockDescriptor>

export const Uuid = z.instanceof(Uint8Array).refine((u) => u.length === 16, {
  error: 'a session UUID is 16 bytes',
})

/** What the source-side rules look at, after each option's own checks passed. */
export interface SourceRuleInput {
  address: string
  channels: number
  compression: string
  compressionLevel?: number | undefined
  zeroCopySend: boolean
  tls: boolean
  connectTimeoutMs: number
  peerTimeoutMs?: number | undefined
  maxBandwidth?: number | undefined
  channelRetries: number
  minChannels: number
}

/**
 * Adds an issue for every limit or combination rule `o` breaks, as the core checks them when
 * a source starts (the same function, so the verdicts and messages are the same).
 */
export function checkSourceRules(o: SourceRuleInput, ctx: z.RefinementCtx): void {
  const violations = binding.checkSourceOptions({
    address: o.address,
    channels: o.channels,
    compression: o.compression,
    zeroCopy: o.zeroCopySend,
    tls: o.tls,
    connectTimeoutMs: o.connectTimeoutMs,
    channelRetries: o.channelRetries,
    minChannels: o.minChannels,
    ...(o.compressionLevel === undefined ? {} : { compressionLevel: o.compressionLevel }),
    ...(o.peerTimeoutMs === undefined ? {} : { peerTimeoutMs: o.peerTimeoutMs }),
    ...(o.maxBandwidth === undefined ? {} : { maxBandwidth: o.maxBandwidth }),
  })
  for (const v of violations) ctx.addIssue({ code: 'custom', path: [v.option], message: v.message })
}

/** Parses `input` with `schema`; a failure is a MultifdError naming every problem. */
export function parseOptions<S extends z.ZodType>(schema: S, input: unknown, what: string): z.output<S> {
  const r = schema.safeParse(input)
  if (!r.success) {
    throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', `invalid ${what}:\n${z.prettifyError(r.error)}`, {
      cause: r.error,
    })
  }
  return r.data
}
