/**
 * Hostile input: crafted bytes sent to a real destination, one bad field at a time. A channel
 * of the session (its init packet names the session's UUID) that breaks the protocol must end
 * the session failed with its code within a bounded time; a connection that never identifies
 * itself as the session's (unknown first bytes, another session's UUID) is rejected with its
 * code instead and the session carries on. Either way every block's memory stays unchanged
 * outside the pages the hostile packets legitimately address, no thread or descriptor leaks,
 * and the process can still complete a normal migration.
 */
import test from 'ava'
import { createHash, randomBytes } from 'node:crypto'
import { constants, deflateSync } from 'node:zlib'
import { Destination, MultifdError, RamBlock, encodeInitPacket, encodePacketHeader, migrate, type MultifdErrorCode, type PacketFields } from '../ts/index.js'
import { MiB, blockPair, fdCount, rawChannel, rawControl, rejectionCode, sameBytes, testPki, threadCount, until, type RawTls } from './helpers.js'

const BLOCK = 'pc.ram'
const SIZE = MiB

interface Case {
  name: string
  code: MultifdErrorCode
  compression?: 'none' | 'zlib'
  channels?: number
  /** Bytes per raw channel connection (init packet included unless the case crafts it). */
  channelBytes: (uuid: Buffer) => Buffer[][]
  /** Pages (byte offsets) a hostile packet legitimately addresses: they may change. */
  touches?: number[]
  /** Close the channels after sending (EOF) instead of keeping them open. */
  close?: boolean
}

const init = (uuid: Buffer, channelId = 0): Buffer => encodeInitPacket({ uuid, channelId })
const header = (f: PacketFields): Buffer => encodePacketHeader({ block: BLOCK, ...f })
const patch = (b: Buffer, at: number, v: number, width: 4 | 8 = 4): Buffer => {
  const c = Buffer.from(b)
  if (width === 4) c.writeUInt32BE(v >>> 0, at)
  else c.writeBigUInt64BE(BigInt(v), at)
  return c
}
const page = (fill: number): Buffer => Buffer.alloc(4096, fill)
/** A zlib payload as QEMU's sender makes it: zlib header, deflate, sync flush, no end. */
const zlibPayload = (data: Buffer): Buffer => deflateSync(data, { level: 1, finishFlush: constants.Z_SYNC_FLUSH })

const cases: Case[] = [
  { name: 'init version', code: 'ERR_MULTIFD_BAD_VERSION', channelBytes: (u) => [[patch(init(u), 4, 2)]] },
  { name: 'channel id equal to the count', code: 'ERR_MULTIFD_CHANNEL_ID_RANGE', channelBytes: (u) => [[init(u, 1)]] },
  { name: 'channel id above the count', code: 'ERR_MULTIFD_CHANNEL_ID_RANGE', channelBytes: (u) => [[init(u, 200)]] },
  { name: 'duplicate channel id', code: 'ERR_MULTIFD_CHANNEL_DUPLICATE', channels: 2, channelBytes: (u) => [[init(u, 0)], [init(u, 0)]] },
  { name: 'packet magic', code: 'ERR_MULTIFD_BAD_MAGIC', channelBytes: (u) => [[init(u), patch(header({ normalOffsets: [0n] }), 0, 0x11223345), page(1)]] },
  { name: 'packet version', code: 'ERR_MULTIFD_BAD_VERSION', channelBytes: (u) => [[init(u), patch(header({ normalOffsets: [0n] }), 4, 0)]] },
  { name: 'unknown flags', code: 'ERR_MULTIFD_UNKNOWN_FLAGS', channelBytes: (u) => [[init(u), header({ flags: 0x100, normalOffsets: [0n] }), page(1)]] },
  { name: 'pages_alloc huge', code: 'ERR_MULTIFD_PAGES_ALLOC', channelBytes: (u) => [[init(u), header({ pagesAlloc: 0xffffffff, normalOffsets: [0n] }), page(1)]] },
  { name: 'normal + zero overflowing u32', code: 'ERR_MULTIFD_ZERO_PAGES', channelBytes: (u) => [[init(u), header({ normalOffsets: [0n], zeroPages: 0xffffffff }), page(1)]] },
  { name: 'ramblock without NUL', code: 'ERR_MULTIFD_BLOCK_NAME', channelBytes: (u) => [[init(u), Buffer.from(header({ normalOffsets: [0n] }).fill(0x41, 64, 320)), page(1)]] },
  { name: 'unknown ramblock', code: 'ERR_MULTIFD_UNKNOWN_BLOCK', channelBytes: (u) => [[init(u), header({ block: 'pc.rom', normalOffsets: [0n] }), page(1)]] },
  { name: 'offset unaligned', code: 'ERR_MULTIFD_OFFSET_ALIGN', channelBytes: (u) => [[init(u), header({ normalOffsets: [100n] }), page(1)]] },
  { name: 'offset equal to the block length', code: 'ERR_MULTIFD_OFFSET_RANGE', channelBytes: (u) => [[init(u), header({ normalOffsets: [BigInt(SIZE)] }), page(1)]] },
  { name: 'offset near 2^64', code: 'ERR_MULTIFD_OFFSET_RANGE', channelBytes: (u) => [[init(u), header({ zeroOffsets: [0xffff_ffff_ffff_f000n] })]] },
  { name: 'compressed length above the bound', code: 'ERR_MULTIFD_PAYLOAD_SIZE', compression: 'zlib', channelBytes: (u) => [[init(u), header({ flags: 0x02, normalOffsets: [0n], nextPacketSize: 4 << 20 })]] },
  {
    name: 'payload decompresses short',
    code: 'ERR_MULTIFD_PAYLOAD_SIZE',
    compression: 'zlib',
    channelBytes: (u) => {
      const z = zlibPayload(page(7))
      return [[init(u), header({ flags: 0x02, normalOffsets: [0n, 4096n], nextPacketSize: z.length }), z]]
    },
  },
  {
    name: 'payload decompresses long',
    code: 'ERR_MULTIFD_PAYLOAD_SIZE',
    compression: 'zlib',
    channelBytes: (u) => {
      const z = zlibPayload(Buffer.concat([page(7), page(8)]))
      return [[init(u), header({ flags: 0x02, normalOffsets: [0n], nextPacketSize: z.length }), z]]
    },
  },
  { name: 'payload does not decompress', code: 'ERR_MULTIFD_DECOMPRESS', compression: 'zlib', channelBytes: (u) => [[init(u), header({ flags: 0x02, normalOffsets: [0n], nextPacketSize: 64 }), Buffer.alloc(64, 0xab)]] },
  { name: 'truncated header', code: 'ERR_MULTIFD_CONNECTION_CLOSED', close: true, channelBytes: (u) => [[init(u), header({ normalOffsets: [0n] }).subarray(0, 700)]] },
  { name: 'truncated payload', code: 'ERR_MULTIFD_CONNECTION_CLOSED', close: true, touches: [0], channelBytes: (u) => [[init(u), header({ normalOffsets: [0n] }), page(9).subarray(0, 1000)]] },
  { name: 'SYNC on one channel, then EOF', code: 'ERR_MULTIFD_CONNECTION_CLOSED', channels: 2, close: true, channelBytes: (u) => [[init(u, 0), encodePacketHeader({ flags: 1, packetNum: 1n })], [init(u, 1)]] },
]

/** Connections that never identify themselves as the session's: rejected, never fatal. */
const strangers: Case[] = [
  { name: 'connection magic', code: 'ERR_MULTIFD_UNKNOWN_CHANNEL', channelBytes: () => [[Buffer.from('GET / HTTP/1.1\r\n\r\n')]] },
  { name: 'init session UUID', code: 'ERR_MULTIFD_UUID_MISMATCH', channelBytes: () => [[init(randomBytes(16))]] },
  { name: 'init session UUID and a bad version', code: 'ERR_MULTIFD_UUID_MISMATCH', channelBytes: () => [[patch(init(randomBytes(16)), 4, 2)]] },
]

/** sha256 of every page of `b` except those at `skip` byte offsets. */
function hashExcept(b: RamBlock, skip: number[] = []): string {
  const h = createHash('sha256')
  const v = b.view()
  for (let off = 0; off < b.size; off += b.pageSize) if (!skip.includes(off)) h.update(v.subarray(off, off + b.pageSize))
  return h.digest('hex')
}

/**
 * Every case also runs over mutual TLS, with node:tls (OpenSSL) as an authenticated but
 * hostile source: authentication is no licence to write outside the pages.
 */
const pki = testPki()
const destTls = pki.dest()
const clientTls: RawTls = { ...pki.source(), servername: 'localhost' }
const modes = [
  { name: '', secure: undefined },
  { name: ' over TLS', secure: clientTls },
]

/** How an attack ended: the session's failure, or the connection's rejection (a warning). */
type Outcome = { code: MultifdErrorCode; ms: number; untouched: boolean; failed: boolean; warning?: string; rejected: number }

async function attack(c: Case, secure?: RawTls): Promise<Outcome> {
  const target = RamBlock.allocate({ name: BLOCK, size: SIZE })
  const other = RamBlock.allocate({ name: 'other', size: 64 * 1024 })
  target.view().fill(0x5a)
  other.view().fill(0xa5)
  const before = [hashExcept(target, c.touches), hashExcept(other)]
  // A channel that closes mid-packet looks like a cut one: the destination waits this long for
  // a replacement, then fails with the cause.
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [target, other], channelTimeoutMs: 5000, resumeWindowMs: 1000, ...(secure ? { tls: destTls } : {}) })
  const uuid = randomBytes(16)
  const ctl = await rawControl(dest.address, secure)
  const channels = c.channels ?? 1
  ctl.send({ type: 'hello', protocol: 1, session: uuid.toString('hex'), channels, pageSize: 4096, compression: c.compression ?? 'none', blocks: [{ name: BLOCK, length: SIZE }, { name: 'other', length: 64 * 1024 }] })
  const welcome = await ctl.next()
  if (welcome?.type !== 'welcome') throw new Error(`expected welcome, got ${JSON.stringify(welcome)}`)
  const started = performance.now()
  const sockets = []
  for (const bytes of c.channelBytes(uuid)) sockets.push(await rawChannel(dest.address, bytes, secure))
  if (c.close) for (const s of sockets) s.end()
  const warned = new Promise<MultifdError>((resolve) => dest.once('warning', resolve))
  const ended = await until(Promise.race([rejectionCode(dest.done).then((code) => ({ code, failed: true })), warned.then((w) => ({ code: w.code, failed: false, warning: w.message }))]), 5000, `${c.name}: destination failure or rejection`)
  const ms = performance.now() - started
  const rejected = dest.stats().rejectedConnections
  const failed = ended.failed || dest.error !== undefined
  for (const s of sockets) s.destroy()
  ctl.socket.destroy()
  dest.close()
  return { ...ended, failed, ms, rejected, untouched: hashExcept(target, c.touches) === before[0] && hashExcept(other) === before[1] }
}

for (const mode of modes) for (const c of cases) {
  test(`hostile${mode.name} ${c.name}: ${c.code}, bounded, memory untouched`, async (t) => {
    t.timeout(20_000)
    const r = await attack(c, mode.secure)
    t.is(r.code, c.code)
    t.true(r.failed, 'the session failed')
    t.true(r.ms < 5000, `failed after ${r.ms} ms`)
    t.true(r.untouched, 'no byte changed outside the pages the packets legitimately address')
  })
}

for (const mode of modes) for (const c of strangers) {
  test(`stranger${mode.name} ${c.name}: rejected with ${c.code}, the session unharmed, memory untouched`, async (t) => {
    t.timeout(20_000)
    const r = await attack(c, mode.secure)
    t.is(r.code, c.code)
    t.false(r.failed, 'the session carries on')
    t.is(r.rejected, 1)
    t.regex(r.warning ?? '', /^rejected a connection from 127\.0\.0\.1:\d+: /)
    t.true(r.ms < 5000, `rejected after ${r.ms} ms`)
    t.true(r.untouched, 'no byte changed')
  })
}

// Serial: counts the whole process's threads and descriptors.
test.serial('after every hostile case: no thread or descriptor leaked, and a normal migration completes', async (t) => {
  t.timeout(120_000)
  await attack(cases[0]!) // warm up lazily created threads and descriptors
  const threads = threadCount()
  const fds = fdCount()
  for (const mode of modes) for (const c of [...cases, ...strangers]) await attack(c, mode.secure)
  t.is(threadCount(), threads)
  t.is(fdCount(), fds)
  const { src, dst } = blockPair([[BLOCK, SIZE], ['other', 64 * 1024]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const s = await migrate({ address: dest.address, blocks: src, channels: 4 })
  await dest.done
  t.is(s.status, 'completed')
  t.true(sameBytes(src, dst))
})
