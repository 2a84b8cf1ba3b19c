import test from 'ava'
import { randomBytes, randomFillSync } from 'node:crypto'
import { Destination, RamBlock, Source, encodeInitPacket, encodePacketHeader, type CompressionMethod } from '../ts/index.js'
import { MiB, rawChannel, rawControl, rejectionCode, rss, sameBytes, scribble, sha256 } from './helpers.js'

type Mix = 'random' | 'zero' | 'text' | 'mixed'

function fill(block: RamBlock, mix: Mix): void {
  const v = block.view()
  const text = Buffer.from('multifd moves memory between processes over parallel channels; ')
  for (let p = 0; p < v.length / 4096; p++) {
    const page = v.subarray(p * 4096, (p + 1) * 4096)
    const kind = mix === 'mixed' ? (['random', 'zero', 'text'] as const)[p % 3]! : mix
    if (kind === 'random') randomFillSync(page)
    else if (kind === 'text') for (let i = 0; i < 4096; i += text.length) text.copy(page, i, 0, Math.min(text.length, 4096 - i))
    else page.fill(0)
  }
}

const methods: CompressionMethod[] = ['none', 'zlib', 'zstd']
const mixes: Mix[] = ['random', 'zero', 'text', 'mixed']

for (const compression of methods) {
  for (const mix of mixes) {
    test(`${compression}, ${mix} pages: destination equals source over two rounds`, async (t) => {
      t.timeout(60_000)
      const size = 8 * MiB + 3 * 4096
      const src = RamBlock.allocate({ name: 'pc.ram', size })
      fill(src, mix)
      const dst = RamBlock.allocate({ name: 'pc.ram', size })
      const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })
      const source = await Source.connect({ address: dest.address, blocks: [src], channels: 2, compression })
      await source.sendAll()
      await source.sync()
      t.true(sameBytes([src], [dst]))
      scribble(src, 40)
      const dirty = src.dirtyPages
      await source.sendDirty()
      const summary = await source.complete()
      const d = await dest.done
      t.true(sameBytes([src], [dst]))
      t.is(d.pages.normal, summary.pages.normal)
      t.is(d.pages.zero, summary.pages.zero)
      t.is(d.bytes, summary.bytes)
      const raw = summary.pages.normal * 4096
      if (mix === 'zero') t.is(summary.pages.normal, dirty, 'only the scribbled pages carry data')
      if (compression !== 'none' && mix === 'text') t.true(summary.bytes < raw / 10, `text compresses: ${summary.bytes} wire bytes for ${raw}`)
      if (compression === 'none') t.true(summary.bytes >= raw, 'uncompressed: every data byte on the wire')
    })
  }
}

test('zeroPageDetection none sends every page as data', async (t) => {
  const src = RamBlock.allocate({ name: 'm', size: 4 * MiB })
  const dst = RamBlock.allocate({ name: 'm', size: 4 * MiB })
  dst.view().fill(0xee)
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })
  const source = await Source.connect({ address: dest.address, blocks: [src], zeroPageDetection: 'none' })
  await source.sendAll()
  const s = await source.complete()
  await dest.done
  t.is(s.pages.zero, 0)
  t.is(s.pages.normal, 1024)
  t.true(sameBytes([src], [dst]), 'zero data overwrote the 0xee bytes')
})

// Serial: measures the whole process's resident memory.
test.serial('zero pages do not fault in untouched destination memory; they do overwrite stale data', async (t) => {
  t.timeout(60_000)
  const size = 128 * MiB
  const src = RamBlock.allocate({ name: 'z', size })
  src.view(0, 4096).fill(1) // one data page, the rest zero
  const dst = RamBlock.allocate({ name: 'z', size })
  const before = rss()
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })
  const source = await Source.connect({ address: dest.address, blocks: [src], channels: 2 })
  await source.sendAll()
  await source.sync()
  const grown = rss() - before
  t.true(grown < 32 * MiB, `destination RSS grew ${grown} bytes for a 128 MiB all-zero block`)
  // Round 2: a page that held data becomes zero; the zero page must now be written.
  src.view(0, 4096).fill(0)
  src.markDirty(0, 4096)
  await source.sendDirty()
  await source.complete()
  await dest.done
  t.is(dst.view(0, 4096).reduce((a, b) => a + b, 0), 0)
})

test('compression levels are validated per method', async (t) => {
  const b = RamBlock.allocate({ name: 'x', size: 4096 })
  for (const [compression, level] of [['zlib', 0], ['zlib', 10], ['zstd', 21], ['none', 3]] as const) {
    t.is(await rejectionCode(Source.connect({ address: 'tcp:127.0.0.1:1', blocks: [b], compression, compressionLevel: level })), 'ERR_MULTIFD_INVALID_ARGUMENT')
  }
})

test('zlib level 9 and zstd level 19 work end to end', async (t) => {
  for (const [compression, compressionLevel] of [['zlib', 9], ['zstd', 19]] as const) {
    const src = RamBlock.allocate({ name: 'l', size: 2 * MiB })
    fill(src, 'mixed')
    const dst = RamBlock.allocate({ name: 'l', size: 2 * MiB })
    const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })
    const source = await Source.connect({ address: dest.address, blocks: [src], compression, compressionLevel, channels: 3 })
    await source.sendAll()
    await source.complete()
    await dest.done
    t.true(sameBytes([src], [dst]), `${compression} ${compressionLevel}`)
  }
})

/** A destination for a raw, hand-made zlib channel; returns its failure code and block. */
async function hostile(packet: (uuid: Buffer) => Uint8Array[]): Promise<{ code: string; changed: boolean }> {
  const dst = RamBlock.allocate({ name: 'pc.ram', size: MiB })
  dst.view().fill(0x5a)
  const before = sha256(dst)
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })
  const uuid = randomBytes(16)
  const ctl = await rawControl(dest.address)
  ctl.send({ type: 'hello', protocol: 1, session: uuid.toString('hex'), channels: 1, pageSize: 4096, compression: 'zlib', blocks: [{ name: 'pc.ram', length: MiB }] })
  const welcome = await ctl.next()
  if (welcome?.type !== 'welcome') throw new Error(`expected welcome, got ${JSON.stringify(welcome)}`)
  const ch = await rawChannel(dest.address, [encodeInitPacket({ uuid, channelId: 0 }), ...packet(uuid)])
  const code = await rejectionCode(dest.done)
  ch.destroy()
  ctl.socket.destroy()
  return { code, changed: sha256(dst) !== before }
}

test('hostile compressed payloads: garbage, oversized, data without pages; no page written', async (t) => {
  t.timeout(30_000)
  const header = (fields: Parameters<typeof encodePacketHeader>[0]): Buffer => encodePacketHeader({ block: 'pc.ram', flags: 0x02, ...fields })
  const garbage = Buffer.alloc(100, 0xab)
  let r = await hostile(() => [header({ normalOffsets: [0n], nextPacketSize: garbage.length }), garbage])
  t.is(r.code, 'ERR_MULTIFD_DECOMPRESS')
  t.false(r.changed)
  r = await hostile(() => [header({ normalOffsets: [0n], nextPacketSize: 2 * 1024 * 1024 })])
  t.is(r.code, 'ERR_MULTIFD_PAYLOAD_SIZE')
  t.false(r.changed)
  r = await hostile(() => [header({ zeroOffsets: [0n], nextPacketSize: 64 }), Buffer.alloc(64)])
  t.is(r.code, 'ERR_MULTIFD_PAYLOAD_SIZE')
  t.false(r.changed)
  // A nocomp packet on a zlib session.
  r = await hostile(() => [encodePacketHeader({ block: 'pc.ram', normalOffsets: [0n] }), Buffer.alloc(4096)])
  t.is(r.code, 'ERR_MULTIFD_COMPRESSION_MISMATCH')
  t.false(r.changed)
})
