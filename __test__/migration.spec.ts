import test from 'ava'
import diagnostics from 'node:diagnostics_channel'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Destination, MultifdError, RamBlock, Source, migrate, type MigrationState } from '../ts/index.js'
import { MiB, blockPair, fdCount, rawControl, rejectionCode, sameBytes, scribble, sha256, sha256File, spawnPeer, threadCount, until, whenTrue } from './helpers.js'

// Odd sizes: not multiples of a 128-page packet.
const ODD: Array<[string, number]> = [
  ['pc.ram', 8 * MiB + 5 * 4096],
  ['vga.vram', 3 * 4096],
  ['/rom@etc/acpi/tables', (128 * 2 + 7) * 4096],
]

for (const channels of [1, 2, 4, 8, 16]) {
  test(`tcp, ${channels} channel(s): every block arrives byte for byte`, async (t) => {
    t.timeout(30_000)
    const { src, dst } = blockPair(ODD)
    const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
    t.regex(dest.address, /^tcp:127\.0\.0\.1:[1-9]\d*$/)
    const summary = await migrate({ address: dest.address, blocks: src, channels })
    const d = await dest.done
    t.is(summary.status, 'completed')
    t.is(d.status, 'completed')
    t.true(sameBytes(src, dst))
    const pages = ODD.reduce((a, [, size]) => a + size / 4096, 0)
    t.is(summary.pages.normal + summary.pages.zero, pages)
    t.is(d.pages.normal + d.pages.zero, pages)
    t.true(summary.pages.zero > 0, 'every fifth page is zero and goes as an offset only')
    t.is(d.perChannel.length, channels)
    t.is(summary.bytes, d.bytes, 'both sides count the same channel bytes')
    t.deepEqual(summary.perChannel.map((c) => c.packets), d.perChannel.map((c) => c.packets), 'and the same packets per channel, SYNCs included')
  })
}

test('unix socket, 4 channels', async (t) => {
  t.timeout(30_000)
  const dir = mkdtempSync(join(tmpdir(), 'multifd-'))
  try {
    const { src, dst } = blockPair(ODD)
    const dest = Destination.listen({ address: `unix:${join(dir, 'mig.sock')}`, blocks: dst })
    await migrate({ address: dest.address, blocks: src, channels: 4 })
    await dest.done
    t.true(sameBytes(src, dst))
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('five sync rounds with changes between them; destination equals source after each', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair(ODD)
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const destSyncs: number[] = []
  dest.on('sync', (epoch) => destSyncs.push(epoch))
  const source = await Source.connect({ address: dest.address, blocks: src, channels: 4 })
  await source.sendAll()
  t.is(await source.sync(), 1)
  t.true(sameBytes(src, dst))
  for (let round = 2; round <= 5; round++) {
    source.markRound()
    for (const b of src) scribble(b, 20)
    t.true(src.some((b) => b.dirtyPages > 0))
    const sent = await source.sendDirty()
    t.true(sent > 0 && sent <= 60)
    t.is(await source.sync(), round)
    t.true(sameBytes(src, dst), `round ${round}`)
  }
  await source.complete()
  await dest.done
  t.is(dest.round, 4)
  t.deepEqual(destSyncs, [1, 2, 3, 4, 5, 6])
})

test('destination creates blocks for the announced table (mapped files, as the CLI does)', async (t) => {
  t.timeout(30_000)
  const dir = mkdtempSync(join(tmpdir(), 'multifd-'))
  try {
    const { src } = blockPair(ODD)
    const dest = Destination.listen({
      address: 'tcp:127.0.0.1:0',
      blocks: (table) => table.map((b, i) => RamBlock.mapFile({ name: b.name, path: join(dir, `block-${i}.img`), size: b.length })),
    })
    await migrate({ address: dest.address, blocks: src, channels: 3 })
    await dest.done
    t.deepEqual(dest.blocks.map((b) => b.name), ODD.map(([n]) => n))
    for (const [i, b] of src.entries()) t.is(sha256File(join(dir, `block-${i}.img`)), sha256(b))
  } finally {
    rmSync(dir, { recursive: true, force: true })
  }
})

test('states follow QEMU and are published on diagnostics_channel', async (t) => {
  t.timeout(30_000)
  // Other tests run at the same time: keep only this test's sessions (by their address).
  const seen: string[] = []
  let address = ''
  const onState = (m: unknown): void => {
    const { role, to, address: a } = m as { role: string; to: MigrationState; address: string }
    if (a === address) seen.push(`${role}:${to}`)
  }
  diagnostics.subscribe('multifd:state', onState)
  try {
    const { src, dst } = blockPair([['m', MiB]])
    const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
    address = dest.address
    const source = await Source.connect({ address: dest.address, blocks: src })
    t.is(source.state, 'active')
    await source.sendAll()
    await source.complete()
    await dest.done
    t.is(dest.state, 'completed')
    t.deepEqual(seen.filter((s) => s.startsWith('source')), ['source:setup', 'source:active', 'source:device', 'source:completed'])
    t.deepEqual(seen.filter((s) => s.startsWith('destination')), ['destination:setup', 'destination:active', 'destination:device', 'destination:completed'])
  } finally {
    diagnostics.unsubscribe('multifd:state', onState)
  }
})

test('block table mismatch fails both sides with ERR_MULTIFD_BLOCK_MISMATCH, no page written', async (t) => {
  t.timeout(15_000)
  const { src } = blockPair([['pc.ram', 2 * MiB], ['rom', 4096]])
  const dst = [RamBlock.allocate({ name: 'pc.ram', size: MiB }), RamBlock.allocate({ name: 'rom', size: 4096 })]
  const before = dst.map(sha256)
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const started = performance.now()
  const err = await t.throwsAsync(Source.connect({ address: dest.address, blocks: src }), { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_BLOCK_MISMATCH')
  t.true(err?.remote)
  t.regex(err?.message ?? '', /"pc\.ram" is 2097152 bytes on the source, 1048576 here/)
  t.is(await rejectionCode(dest.done), 'ERR_MULTIFD_BLOCK_MISMATCH')
  t.true(performance.now() - started < 5000)
  t.is(dest.state, 'failed')
  t.deepEqual(dst.map(sha256), before)
})

test('channel count mismatch fails both sides with ERR_MULTIFD_CHANNEL_COUNT_MISMATCH', async (t) => {
  t.timeout(15_000)
  const { src, dst } = blockPair([['m', MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, channels: 4 })
  t.is(await rejectionCode(Source.connect({ address: dest.address, blocks: src, channels: 2 })), 'ERR_MULTIFD_CHANNEL_COUNT_MISMATCH')
  t.is(await rejectionCode(dest.done), 'ERR_MULTIFD_CHANNEL_COUNT_MISMATCH')
})

test('destination times out on channels that never arrive', async (t) => {
  t.timeout(15_000)
  const dst = [RamBlock.allocate({ name: 'm', size: MiB })]
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, channelTimeoutMs: 500 })
  const ctl = await rawControl(dest.address)
  ctl.send({ type: 'hello', protocol: 1, session: 'ab'.repeat(16), channels: 3, pageSize: 4096, compression: 'none', blocks: [{ name: 'm', length: MiB }] })
  const frames = [await ctl.next(), await ctl.next()]
  ctl.socket.destroy()
  t.is(frames[0]?.type, 'welcome')
  t.like(frames[1], { type: 'error', code: 'ERR_MULTIFD_TIMEOUT' })
  const err = await t.throwsAsync(dest.done, { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_TIMEOUT')
  t.regex(err?.message ?? '', /\[0, 1, 2\] of 3 never arrived/)
})

test('cancel mid-transfer with 16 channels, then a fresh migration from the same process completes', async (t) => {
  t.timeout(60_000)
  const size = 128 * MiB
  const { src, dst } = blockPair([['big', size]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  // Throttled, as QEMU's cancel test does, so the cancel surely lands mid-transfer.
  const source = await Source.connect({ address: dest.address, blocks: src, channels: 16, maxBandwidth: 32 * MiB })
  // Handle the rejection from the start: it happens while cancel() runs.
  const sending = rejectionCode(source.sendAll())
  await whenTrue(() => source.stats().bytes > MiB, 10_000, 'first bytes')
  await source.cancel()
  t.is(source.state, 'cancelled')
  t.is(source.error?.code, 'ERR_MULTIFD_CANCELLED')
  t.is(await sending, 'ERR_MULTIFD_CANCELLED')
  t.is(await rejectionCode(dest.done), 'ERR_MULTIFD_CANCELLED')
  t.is(dest.state, 'cancelled')
  t.true(source.stats().bytes < size / 2, 'cancelled long before everything was sent')

  const fresh = blockPair([['big', size]]).dst
  const dest2 = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: fresh })
  const summary = await migrate({ address: dest2.address, blocks: src, channels: 16 })
  await dest2.done
  t.is(summary.status, 'completed')
  t.true(sameBytes(src, fresh))
})

test('the destination process killed with SIGKILL: the source fails within 5 s', async (t) => {
  t.timeout(60_000)
  const peer = spawnPeer(['destination', '64'])
  const { address } = (await peer.next('listening')) as { address: string }
  const { src } = blockPair([['big', 64 * MiB]])
  const source = await Source.connect({ address, blocks: src, channels: 4 })
  const failed = new Promise<MultifdError>((resolve) => source.once('failed', resolve))
  const rounds = (async () => {
    for (;;) {
      src[0]!.markAllDirty()
      await source.sendDirty()
      await source.sync()
    }
  })()
  await peer.next('sync')
  const killedAt = performance.now()
  peer.child.kill('SIGKILL')
  const err = await until(failed, 5000, 'source failure')
  t.true(performance.now() - killedAt < 5000)
  t.is(err.code, 'ERR_MULTIFD_CONNECTION_CLOSED')
  t.is(source.state, 'failed')
  t.is(await rejectionCode(rounds), 'ERR_MULTIFD_CONNECTION_CLOSED')
  await peer.exited
})

test('the source process killed with SIGKILL: the destination waits resumeWindowMs for it, then fails within 5 s more', async (t) => {
  t.timeout(60_000)
  const dst = [RamBlock.allocate({ name: 'big', size: 64 * MiB })]
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, resumeWindowMs: 2000 })
  const peer = spawnPeer(['source', dest.address, '64', '4'])
  await peer.next('sync')
  const killedAt = performance.now()
  peer.child.kill('SIGKILL')
  const err = await until(dest.done.then(() => undefined, (e: unknown) => e), 7000, 'destination failure')
  const ms = performance.now() - killedAt
  t.true(ms >= 1900 && ms < 7000, `failed ${Math.round(ms)} ms after the kill`)
  t.true(err instanceof MultifdError)
  t.is((err as MultifdError).code, 'ERR_MULTIFD_CONNECTION_CLOSED')
  t.is(dest.state, 'failed')
  await peer.exited
})

test('several sessions at once in one process', async (t) => {
  t.timeout(30_000)
  const pairs = [blockPair([['a', 16 * MiB]]), blockPair([['a', 16 * MiB]]), blockPair([['b', 4 * MiB]])]
  const dests = pairs.map(({ dst }) => Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst }))
  const summaries = await Promise.all(pairs.map(({ src }, i) => migrate({ address: dests[i]!.address, blocks: src, channels: 2 + i })))
  await Promise.all(dests.map((d) => d.done))
  t.true(summaries.every((s) => s.status === 'completed'))
  t.true(pairs.every(({ src, dst }) => sameBytes(src, dst)))
})

test('bad options are refused with readable zod messages', async (t) => {
  const b = RamBlock.allocate({ name: 'x', size: 4096 })
  const err = await t.throwsAsync(Source.connect({ address: 'tcp:nowhere', blocks: [b], channels: 0 }), { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.regex(err?.message ?? '', /address "tcp:nowhere" has no port \(tcp:HOST:PORT\)[\s\S]*channels/)
  t.throws(() => RamBlock.allocate({ name: 'x', size: 4097 }), { instanceOf: MultifdError, message: /multiple of the page size/ })
  t.throws(() => Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [b], channels: 256 }), { instanceOf: MultifdError })
  t.is(await rejectionCode(Source.connect({ address: 'tcp:127.0.0.1:0', blocks: [b, b] })), 'ERR_MULTIFD_INVALID_ARGUMENT')
})

// Serial: counts the whole process's threads and descriptors (ava runs serial tests first).
test.serial('no thread or file descriptor is left behind after success, failure and cancel', async (t) => {
  t.timeout(60_000)
  const run = async (kind: 'ok' | 'mismatch' | 'cancel'): Promise<void> => {
    const { src, dst } = blockPair([['m', kind === 'cancel' ? 64 * MiB : 4 * MiB]])
    const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: kind === 'mismatch' ? [RamBlock.allocate({ name: 'other', size: 4096 })] : dst })
    if (kind === 'mismatch') {
      await rejectionCode(Source.connect({ address: dest.address, blocks: src, channels: 4 }))
      await rejectionCode(dest.done)
      return
    }
    const source = await Source.connect({ address: dest.address, blocks: src, channels: 8 })
    if (kind === 'ok') {
      await source.sendAll()
      await source.complete()
      await dest.done
    } else {
      const sending = rejectionCode(source.sendAll())
      await source.cancel()
      await sending
      await rejectionCode(dest.done)
    }
  }
  await run('ok') // warm up lazily created threads and descriptors
  const threads = threadCount()
  const fds = fdCount()
  for (const kind of ['ok', 'mismatch', 'cancel', 'ok'] as const) {
    await run(kind)
    t.is(threadCount(), threads, `threads after ${kind}`)
    t.is(fdCount(), fds, `fds after ${kind}`)
  }
})
