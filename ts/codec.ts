/**
 * QEMU's multifd channel bytes, decoded and built by the Rust codec. Useful for tools that
 * read captured channel streams and for tests that craft packets.
 */
import { z } from 'zod'
import { binding } from './native.js'
import { native } from './errors.js'
import { BlockDescriptor, Channels, CompressionMethod, DEFAULT_PAGE_SIZE, PageSize, Uuid, parseOptions } from './options.js'

export const MULTIFD_MAGIC = 0x11223344
export const MULTIFD_VERSION = 1
export const INIT_PACKET_BYTES = 64
/** Payload bytes of a full packet; pages per packet = this / page size. */
export const PACKET_SIZE = 512 * 1024
export const FLAG_SYNC = 0x01
export const FLAG_ZLIB = 0x02
export const FLAG_ZSTD = 0x04

/** Header bytes of a RAM packet: 320 + 8 x (512 KiB / pageSize); 1344 for 4 KiB pages. */
export function packetHeaderBytes(pageSize = 4096): number {
  parseOptions(PageSize, pageSize, 'page size')
  return 320 + 8 * (PACKET_SIZE / pageSize)
}

export interface InitPacket {
  /** Session UUID, 16 bytes. */
  uuid: Buffer
  channelId: number
}

const InitExpectation = z.strictObject({ uuid: Uuid, channels: Channels })
export type InitExpectation = z.input<typeof InitExpectation>

/**
 * Decodes a 64-byte init packet, checking magic and version; with `expect`, also the session
 * UUID and `channelId < channels`. Throws `MultifdError` with the failing check's code.
 */
export function decodeInitPacket(bytes: Uint8Array, expect?: InitExpectation): InitPacket {
  const e = expect === undefined ? undefined : parseOptions(InitExpectation, expect, 'init expectation')
  return native(() => binding.decodeInitPacket(bytes, e))
}

export function encodeInitPacket(init: { uuid: Uint8Array; channelId: number }): Buffer {
  const { uuid, channelId } = parseOptions(
    z.strictObject({ uuid: Uuid, channelId: z.int().min(0).max(255) }),
    init,
    'init packet',
  )
  return native(() => binding.encodeInitPacket(uuid, channelId))
}

const HeaderContext = z.strictObject({
  pageSize: PageSize.default(DEFAULT_PAGE_SIZE),
  compression: CompressionMethod.default('none'),
  blocks: z.array(BlockDescriptor).optional(),
})
export type HeaderContext = z.input<typeof HeaderContext>

export interface PacketHeader {
  flags: number
  sync: boolean
  /** The method the flags name. */
  compression: CompressionMethod
  pagesAlloc: number
  normalPages: number
  zeroPages: number
  nextPacketSize: number
  packetNum: bigint
  /** Block name; empty when the packet lists no pages. */
  block: string
  normalOffsets: bigint[]
  zeroOffsets: bigint[]
  /** Bytes of header this packet occupies. */
  headerBytes: number
}

/**
 * Decodes one RAM packet header and validates it in QEMU's order. With `blocks`, the block
 * name, offsets, method and payload size are checked against them and `compression`;
 * without, only the checks that need no session run.
 */
export function decodePacketHeader(bytes: Uint8Array, context: HeaderContext = {}): PacketHeader {
  const c = parseOptions(HeaderContext, context, 'header context')
  const { blocks, ...rest } = c
  const h = native(() => binding.decodePacketHeader(bytes, blocks === undefined ? rest : { ...rest, blocks }))
  return { ...h, compression: h.compression as CompressionMethod }
}

const u64 = z.bigint().min(0n).max(0xffff_ffff_ffff_ffffn)
const u32 = z.int().min(0).max(0xffff_ffff)

const PacketFields = z.strictObject({
  flags: u32.default(0),
  pagesAlloc: u32.optional(),
  normalOffsets: z.array(u64).default([]),
  zeroOffsets: z.array(u64).default([]),
  /** Overrides the counts derived from the offset arrays (to build hostile packets). */
  normalPages: u32.optional(),
  zeroPages: u32.optional(),
  nextPacketSize: u32.optional(),
  packetNum: u64.default(0n),
  /** The integrity digest word (bytes 40..48); 0 as QEMU writes it. */
  digest: u64.default(0n),
  block: z.string().default(''),
  pageSize: PageSize.default(DEFAULT_PAGE_SIZE),
})
export type PacketFields = z.input<typeof PacketFields>

/**
 * Builds a RAM packet header. Counts, `pagesAlloc` (pages per packet when pages are listed,
 * else 0) and `nextPacketSize` (normal pages x page size) are derived unless given; given
 * values are written verbatim, valid or not.
 */
export function encodePacketHeader(fields: PacketFields): Buffer {
  const f = parseOptions(PacketFields, fields, 'packet fields')
  const listed = f.normalOffsets.length + f.zeroOffsets.length
  const normalPages = f.normalPages ?? f.normalOffsets.length
  return native(() =>
    binding.encodePacketHeader(
      {
        flags: f.flags,
        pagesAlloc: f.pagesAlloc ?? (listed > 0 ? PACKET_SIZE / f.pageSize : 0),
        normalPages,
        zeroPages: f.zeroPages ?? f.zeroOffsets.length,
        nextPacketSize: f.nextPacketSize ?? normalPages * f.pageSize,
        packetNum: f.packetNum,
        digest: f.digest,
        block: f.block,
        offsets: [...f.normalOffsets, ...f.zeroOffsets],
      },
      f.pageSize,
    ),
  )
}

/** The error codes the native core defines (a test checks they match `ERROR_CODES`). */
export function nativeErrorCodes(): string[] {
  return binding.errorCodes()
}

const RebuildOptions = z.strictObject({
  pageSize: PageSize.default(DEFAULT_PAGE_SIZE),
  /** Refuse blocks larger than this (a hostile capture cannot make it allocate more). */
  maxBlockBytes: z.int().positive().default(2 ** 34),
})
export type RebuildOptions = z.input<typeof RebuildOptions>

export interface CapturedChannel {
  channelId: number
  uuid: Buffer
  compression: CompressionMethod
  packets: number
  syncs: number
  normalPages: number
  zeroPages: number
  payloadBytes: number
}

/**
 * Rebuilds the blocks carried by captured multifd channel streams (QEMU's or ours; one
 * buffer per channel, each starting with its init packet; any compression). Pages of
 * different channels are ordered by their SYNC packets, as a destination applies them.
 */
export function rebuildFromCaptures(captures: Uint8Array[], options: RebuildOptions = {}): { blocks: Array<{ name: string; data: Buffer }>; channels: CapturedChannel[] } {
  const o = parseOptions(RebuildOptions, options, 'rebuild options')
  const r = native(() => binding.rebuildFromStreams(captures.map((c) => Buffer.from(c.buffer, c.byteOffset, c.byteLength)), o.pageSize, o.maxBlockBytes))
  return { blocks: r.blocks, channels: r.channels.map((c) => ({ ...c, compression: c.compression as CompressionMethod })) }
}
