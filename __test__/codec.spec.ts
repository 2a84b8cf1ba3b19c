import test from 'ava'
import {
  ERROR_CODES,
  MultifdError,
  decodeInitPacket,
  decodePacketHeader,
  encodeInitPacket,
  encodePacketHeader,
  nativeErrorCodes,
  packetHeaderBytes,
  type MultifdErrorCode,
} from '../ts/index.js'

const blocks = [
  { name: 'pc.ram', length: 64 << 20 },
  { name: 'vga.vram', length: 1 << 20 },
]

function codeOf(fn: () => unknown): MultifdErrorCode {
  try {
    fn()
  } catch (e) {
    if (e instanceof MultifdError) return e.code
    throw e
  }
  throw new Error('expected a MultifdError, nothing was thrown')
}

test('TypeScript error codes match the native core exactly', (t) => {
  t.deepEqual([...ERROR_CODES], nativeErrorCodes())
})

test('init packet: spec vector A.1 both ways', (t) => {
  const bytes = encodeInitPacket({ uuid: new Uint8Array(16), channelId: 2 })
  const expected = Buffer.alloc(64)
  expected.set([0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1])
  expected[0x18] = 2
  t.deepEqual(bytes, expected)
  const init = decodeInitPacket(expected)
  t.is(init.channelId, 2)
  t.deepEqual(init.uuid, Buffer.alloc(16))
})

test('init packet: each check has its own code, in QEMU order', (t) => {
  const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex')
  const good = encodeInitPacket({ uuid, channelId: 3 })
  t.is(decodeInitPacket(good, { uuid, channels: 4 }).channelId, 3)

  const badMagic = Buffer.from(good)
  badMagic[3] = 0x45
  t.is(codeOf(() => decodeInitPacket(badMagic)), 'ERR_MULTIFD_BAD_MAGIC')
  const badVersion = Buffer.from(good)
  badVersion[7] = 2
  t.is(codeOf(() => decodeInitPacket(badVersion)), 'ERR_MULTIFD_BAD_VERSION')
  t.is(codeOf(() => decodeInitPacket(good, { uuid: Buffer.alloc(16), channels: 4 })), 'ERR_MULTIFD_UUID_MISMATCH')
  // id == count is out of range (QEMU's seed let it through).
  t.is(codeOf(() => decodeInitPacket(good, { uuid, channels: 3 })), 'ERR_MULTIFD_CHANNEL_ID_RANGE')
  t.is(codeOf(() => decodeInitPacket(good.subarray(0, 63))), 'ERR_MULTIFD_TRUNCATED')
})

test('packet header: spec vector A.3 round trip', (t) => {
  const bytes = encodePacketHeader({
    packetNum: 7n,
    block: 'pc.ram',
    normalOffsets: [0x1000n, 0x3000n],
    zeroOffsets: [0x2000n],
  })
  t.is(bytes.length, 1344)
  t.is(bytes.subarray(0, 0x24).toString('hex'), '11223344000000010000000000000080000000020000200000000000000000070000' + '0001')
  t.is(bytes.subarray(0x40, 0x47).toString('latin1'), 'pc.ram\0')
  const h = decodePacketHeader(bytes, { blocks })
  t.like(h, { flags: 0, sync: false, compression: 'none', pagesAlloc: 128, normalPages: 2, zeroPages: 1, nextPacketSize: 8192, block: 'pc.ram', headerBytes: 1344 })
  t.is(h.packetNum, 7n)
  t.deepEqual(h.normalOffsets, [0x1000n, 0x3000n])
  t.deepEqual(h.zeroOffsets, [0x2000n])
})

test('packet header: SYNC packet, spec vector A.2', (t) => {
  const bytes = encodePacketHeader({ flags: 1, packetNum: 5n })
  t.is(bytes.subarray(0, 32).toString('hex'), '1122334400000001000000010000000000000000000000000000000000000005')
  t.true(bytes.subarray(32).every((b) => b === 0))
  const h = decodePacketHeader(bytes, { blocks, compression: 'zstd' })
  t.true(h.sync)
  t.is(h.block, '')
})

test('packet header: other page sizes change the header length', (t) => {
  t.is(packetHeaderBytes(65536), 320 + 64)
  const bytes = encodePacketHeader({ pageSize: 65536, block: 'pc.ram', normalOffsets: [65536n] })
  t.is(bytes.length, 384)
  t.is(decodePacketHeader(bytes, { pageSize: 65536, blocks }).pagesAlloc, 8)
})

test('packet header: every validation failure has a distinct stable code', (t) => {
  const base = { block: 'pc.ram', normalOffsets: [0n, 4096n], zeroOffsets: [8192n] }
  const cases: Array<[MultifdErrorCode, Buffer, ('none' | 'zlib' | 'zstd')?]> = [
    ['ERR_MULTIFD_BAD_MAGIC', patch(encodePacketHeader(base), 0, 0xdeadbeef)],
    ['ERR_MULTIFD_BAD_VERSION', patch(encodePacketHeader(base), 4, 0)],
    ['ERR_MULTIFD_UNKNOWN_FLAGS', encodePacketHeader({ ...base, flags: 0x80 })],
    ['ERR_MULTIFD_UNSUPPORTED_PACKET', encodePacketHeader({ ...base, flags: 0x40 })],
    ['ERR_MULTIFD_UNSUPPORTED_COMPRESSION', encodePacketHeader({ ...base, flags: 0x08 })],
    ['ERR_MULTIFD_PAGES_ALLOC', encodePacketHeader({ ...base, pagesAlloc: 129 })],
    ['ERR_MULTIFD_NORMAL_PAGES', encodePacketHeader({ ...base, normalPages: 129 })],
    ['ERR_MULTIFD_ZERO_PAGES', encodePacketHeader({ ...base, zeroPages: 0xffffffff })],
    ['ERR_MULTIFD_BLOCK_NAME', Buffer.from(encodePacketHeader(base).fill(0x61, 64, 320))],
    ['ERR_MULTIFD_UNKNOWN_BLOCK', encodePacketHeader({ ...base, block: 'pc.rom' })],
    ['ERR_MULTIFD_OFFSET_ALIGN', encodePacketHeader({ ...base, normalOffsets: [0n, 4095n] })],
    ['ERR_MULTIFD_OFFSET_RANGE', encodePacketHeader({ ...base, zeroOffsets: [BigInt(64 << 20)] })],
    ['ERR_MULTIFD_OFFSET_RANGE', encodePacketHeader({ ...base, zeroOffsets: [0xffff_ffff_ffff_f000n] })],
    ['ERR_MULTIFD_COMPRESSION_MISMATCH', encodePacketHeader(base), 'zlib'],
    ['ERR_MULTIFD_PAYLOAD_SIZE', encodePacketHeader({ ...base, nextPacketSize: 1 })],
    ['ERR_MULTIFD_TRUNCATED', encodePacketHeader(base).subarray(0, 1343)],
  ]
  for (const [code, bytes, compression] of cases) {
    t.is(codeOf(() => decodePacketHeader(bytes, { blocks, compression: compression ?? 'none' })), code)
  }
})

test('errors say what was expected and what arrived', (t) => {
  const err = t.throws(() => decodePacketHeader(encodePacketHeader({ block: 'pc.ram', normalOffsets: [1n << 30n] }), { blocks }), {
    instanceOf: MultifdError,
  })
  t.is(err?.code, 'ERR_MULTIFD_OFFSET_RANGE')
  t.regex(err?.message ?? '', /0x40000000.*"pc\.ram".*0x4000000/)
  t.is(err?.name, 'MultifdError')
})

test('bad arguments are refused by zod with a readable message', (t) => {
  const err = t.throws(() => decodePacketHeader(Buffer.alloc(1344), { pageSize: 3000 }), { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.regex(err?.message ?? '', /power of two/)
  t.is(codeOf(() => encodeInitPacket({ uuid: new Uint8Array(15), channelId: 0 })), 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.is(codeOf(() => encodeInitPacket({ uuid: new Uint8Array(16), channelId: 256 })), 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.is(codeOf(() => decodePacketHeader(Buffer.alloc(1344), { blocks: [{ name: 'x'.repeat(256), length: 0 }] })), 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.is(codeOf(() => encodePacketHeader({ block: 'x'.repeat(256) })), 'ERR_MULTIFD_INVALID_ARGUMENT')
})

function patch(buf: Buffer, at: number, value: number): Buffer {
  const out = Buffer.from(buf)
  out.writeUInt32BE(value, at)
  return out
}
