/** End-to-end integrity (negotiated): per-packet digests in a reserved header word, block digests at completion. */
import test from 'ava'
import { randomBytes } from 'node:crypto'
import { Destination, MultifdError, RamBlock, Source, decodePacketHeader, encodeInitPacket, encodePacketHeader, migrate } from '../ts/index.js'
import { MiB, blockPair, rawChannel, rawControl, rejectionCode, sameBytes, until } from './helpers.js'

for (const compression of ['none', 'zstd'] as const) {
  test(`integrity xxh3 with compression ${compression}: every packet and block checked, bytes equal`, async (t) => {
    t.timeout(60_000)
    const { src, dst } = blockPair([['pc.ram', 8 * MiB + 4096], ['rom', 5 * 4096]])
    const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
    const s = await migrate({ address: dest.address, blocks: src, channels: 3, compression, integrity: 'xxh3' })
    await dest.done
    t.is(s.status, 'completed')
    t.true(sameBytes(src, dst))
    t.is(src[0]!.digest(), dst[0]!.digest())
  })
}

test('a packet whose data does not match its digest fails with ERR_MULTIFD_INTEGRITY naming channel, block and pages', async (t) => {
  t.timeout(20_000)
  const dst = [RamBlock.allocate({ name: 'pc.ram', size: MiB })]
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const uuid = randomBytes(16)
  const ctl = await rawControl(dest.address)
  ctl.send({ type: 'hello', protocol: 1, session: uuid.toString('hex'), channels: 1, pageSize: 4096, compression: 'none', blocks: [{ name: 'pc.ram', length: MiB }], integrity: 'xxh3' })
  t.like(await ctl.next(), { type: 'welcome' })
  const ch = await rawChannel(dest.address, [encodeInitPacket({ uuid, channelId: 0 }), encodePacketHeader({ block: 'pc.ram', normalOffsets: [8192n], digest: 12345n }), Buffer.alloc(4096, 7)])
  const err = await until(dest.done.then(() => undefined, (e: unknown) => e), 5000, 'destination failure')
  ch.destroy()
  ctl.socket.destroy()
  t.true(err instanceof MultifdError)
  t.is((err as MultifdError).code, 'ERR_MULTIFD_INTEGRITY')
  t.regex((err as MultifdError).message, /channel 0, block "pc\.ram", packet 0 \(1 data pages from offset 0x2000\): data digest 0x[0-9a-f]{16}, header says 0x0000000000003039/)
})

test('a page changed after it was sent and not sent again fails both sides with ERR_MULTIFD_INTEGRITY naming the block', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', 4 * MiB], ['rom', 4096 * 3]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const source = await Source.connect({ address: dest.address, blocks: src, channels: 2, integrity: 'xxh3' })
  await source.sendAll()
  await source.sync()
  src[0]!.write(12345, Buffer.from([src[0]!.view(12345, 1)[0]! ^ 0xff])) // marked dirty, never sent
  const err = await t.throwsAsync(source.complete(), { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_INTEGRITY')
  t.regex(err?.message ?? '', /block "pc\.ram" differs after the migration/)
  t.is(await rejectionCode(dest.done), 'ERR_MULTIFD_INTEGRITY')
})

test('a page never sent fails both sides with ERR_MULTIFD_INTEGRITY naming the block', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', 4 * MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const source = await Source.connect({ address: dest.address, blocks: src, channels: 2, integrity: 'xxh3' })
  await source.sendBlock(src[0]!, [{ offset: 0, length: 4 * MiB - 4096 }])
  const err = await t.throwsAsync(source.complete(), { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_INTEGRITY')
  t.regex(err?.message ?? '', /block "pc\.ram" differs after the migration/)
  t.is(await rejectionCode(dest.done), 'ERR_MULTIFD_INTEGRITY')
})

test('pages sent again in a later round are digested again on both sides: the migration completes with equal digests', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', 4 * MiB + 8192]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const source = await Source.connect({ address: dest.address, blocks: src, channels: 3, integrity: 'xxh3' })
  await source.sendAll()
  await source.sync()
  src[0]!.write(MiB + 100, randomBytes(5000)) // two pages with new data
  src[0]!.write(3 * MiB, Buffer.alloc(4096)) // a data page that became a zero page
  t.is(await source.sendDirty(), 3)
  const s = await source.complete()
  await dest.done
  t.is(s.status, 'completed')
  t.true(sameBytes(src, dst))
  t.is(src[0]!.digest(), dst[0]!.digest())
})

test('the digest sits in a reserved word: a header carrying it decodes as QEMU would read it', (t) => {
  const bytes = encodePacketHeader({ block: 'pc.ram', normalOffsets: [0n], digest: 0xdead_beef_0123_4567n })
  t.is(bytes.readBigUInt64BE(40), 0xdead_beef_0123_4567n)
  const h = decodePacketHeader(bytes, { blocks: [{ name: 'pc.ram', length: MiB }] })
  t.like(h, { normalPages: 1, zeroPages: 0, block: 'pc.ram' })
  t.is(encodePacketHeader({ block: 'pc.ram', normalOffsets: [0n] }).readBigUInt64BE(40), 0n, 'without integrity the word is 0, as QEMU writes it')
})

test('block digests at completion are native work off the JavaScript thread: the event loop keeps ticking', async (t) => {
  t.timeout(180_000)
  // Never written, so it costs address space rather than memory; both sides hash all of it.
  const size = 4096 * MiB
  const src = [RamBlock.allocate({ name: 'pc.ram', size })]
  src[0]!.write(size - 4096, Buffer.from('the last page carries data'))
  const dst = [RamBlock.allocate({ name: 'pc.ram', size })]
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const source = await Source.connect({ address: dest.address, blocks: src, channels: 2, integrity: 'xxh3' })
  await source.sendAll()
  await source.sync()
  // Only the completion is left: a final sync, then the block digests on both sides.
  let last = performance.now()
  let longest = 0
  const timer = setInterval(() => {
    const now = performance.now()
    longest = Math.max(longest, now - last)
    last = now
  }, 2)
  try {
    const summary = await source.complete()
    await dest.done
    t.is(summary.status, 'completed')
  } finally {
    clearInterval(timer)
  }
  t.is(Buffer.from(dst[0]!.view(size - 4096, 26)).toString(), 'the last page carries data')
  t.true(longest < 250, `the event loop stalled for ${longest.toFixed(0)} ms during the completion`)
  t.log(`longest event-loop gap during the completion: ${longest.toFixed(1)} ms`)
})
