/**
 * The control protocol: JSON messages in length-prefixed frames on the control connection
 * (docs/PROTOCOL.md). Every frame is validated with zod on receipt.
 */
import { z } from 'zod'
import { ERROR_CODES, MultifdError } from './errors.js'
import { BlockName, Channels, CompressionMethod, Integrity, LIMITS, PageSize } from './options.js'

export const PROTOCOL_VERSION = 1

const BlockEntry = z.strictObject({ name: BlockName, length: z.int().nonnegative() })

export const ControlMessage = z.discriminatedUnion('type', [
  z.object({
    type: z.literal('hello'),
    protocol: z.int(),
    session: z.string().regex(/^[0-9a-f]{32}$/),
    channels: Channels,
    pageSize: z.int(),
    compression: CompressionMethod,
    blocks: z.array(BlockEntry).max(LIMITS.maxBlocks),
    /** End-to-end integrity: per-packet and per-block xxh3-64 digests. Absent = none. */
    integrity: Integrity.optional(),
  }),
  z.object({ type: z.literal('welcome'), protocol: z.int() }),
  z.object({ type: z.literal('round'), round: z.int().nonnegative() }),
  z.object({ type: z.literal('synced'), epoch: z.int().positive(), packetNum: z.number().nonnegative() }),
  z.object({
    type: z.literal('complete'),
    epoch: z.int().nonnegative(),
    /** With integrity: each block's xxh3-64, compared by the destination before it completes. */
    digests: z.array(z.strictObject({ name: z.string(), xxh3: z.string().regex(/^[0-9a-f]{16}$/) })).max(LIMITS.maxBlocks).optional(),
  }),
  z.object({ type: z.literal('completed') }),
  z.object({ type: z.literal('cancel') }),
  /** Liveness: sent every third of `peerTimeoutMs` by a side that has one; ignored otherwise. */
  z.object({ type: z.literal('ping') }),
  z.object({ type: z.literal('error'), code: z.string(), message: z.string() }),
])
export type ControlMessage = z.infer<typeof ControlMessage>
export type Hello = Extract<ControlMessage, { type: 'hello' }>

/**
 * What a destination checks in a hello beyond its shape, before it creates or touches a single
 * block: the page size is one the core supports, every block is a positive multiple of it, and
 * no name comes twice. Throws with the code the first problem calls for.
 */
export function checkAnnouncement(h: Hello): void {
  if (!PageSize.safeParse(h.pageSize).success) throw new MultifdError('ERR_MULTIFD_PROTOCOL', `hello announces page size ${h.pageSize}, not a power of two in ${LIMITS.pageSize.min}..${LIMITS.pageSize.max}`)
  const seen = new Set<string>()
  for (const b of h.blocks) {
    if (seen.has(b.name)) throw new MultifdError('ERR_MULTIFD_DUPLICATE_BLOCK', `hello announces block ${JSON.stringify(b.name)} twice`)
    seen.add(b.name)
    if (b.length === 0 || b.length % h.pageSize !== 0) throw new MultifdError('ERR_MULTIFD_PROTOCOL', `hello announces block ${JSON.stringify(b.name)} of ${b.length} bytes, not a positive multiple of the ${h.pageSize}-byte page`)
  }
}

export function encodeMessage(m: ControlMessage): Buffer {
  return Buffer.from(JSON.stringify(m))
}

export function decodeMessage(frame: Uint8Array): ControlMessage {
  let raw: unknown
  try {
    raw = JSON.parse(Buffer.from(frame).toString('utf8'))
  } catch {
    throw new MultifdError('ERR_MULTIFD_PROTOCOL', `control frame is not JSON (${frame.length} bytes)`)
  }
  const r = ControlMessage.safeParse(raw)
  if (!r.success) throw new MultifdError('ERR_MULTIFD_PROTOCOL', `invalid control message: ${z.prettifyError(r.error)}`)
  return r.data
}

/** The error a peer's `error` message stands for, keeping its code when it is one of ours. */
export function remoteError(m: { code: string; message: string }, peer: string): MultifdError {
  const code = (ERROR_CODES as readonly string[]).includes(m.code) ? (m.code as MultifdError['code']) : 'ERR_MULTIFD_PROTOCOL'
  const e = new MultifdError(code, `${peer} failed: ${m.message}`)
  e.remote = true
  return e
}
