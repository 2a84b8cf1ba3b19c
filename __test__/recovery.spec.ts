/**
 * Channel recovery (issue 16, part 1): a multifd channel whose connection is cut mid-migration
 * is redialled, admitted in place of the old one and sends again what it sent since the last
 * acknowledged sync; the migration completes byte-identical. Cuts go through
 * `fault-proxy.ts` (connection 0 is the control connection, 1..N the channels).
 */
import test from 'ava'
import diagnostics from 'node:diagnostics_channel'
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { Destination, RamBlock, Source, encodeInitPacket, encodePacketHeader, migrate, type Recovery } from '../ts/index.js'
import { MiB, blockPair, fdCount, rawChannel, rawControl, rejectionCode, sameBytes, seeded, testPki, threadCount, until, whenTrue } from './helpers.js'
import { faultProxy } from './fault-proxy.js'
import { startDirtier } from './dirtier.js'
import { cli, lastJson, receiver, sha, workdir } from './cli-helpers.js'

const pki = testPki()
const tlsModes = {
  plain: { dest: {}, source: {} },
  tls: { dest: { tls: pki.dest() }, source: { tls: pki.source('source', 'ca.pem', 'localhost') } },
} as const

const SEED = Number(process.env.RECOVERY_SEED ?? Date.now() % 1_000_000)

interface CutRun {
  compression: 'none' | 'zstd'
  tls: keyof typeof tlsModes
  size: number
  channels: number
  /** Proxy connection to cut (1..channels). */
  connection: number
  /** Source-to-destination bytes it carries before the RST. */
  after: number
}

/** One migration through the proxy with one channel cut by a RST mid-transfer. */
async function cutOnce(r: CutRun): Promise<{ source: Recovery[]; dest: Recovery[]; same: boolean; seconds: number }> {
  const mode = tlsModes[r.tls]
  const { src, dst } = blockPair([['pc.ram', r.size]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, ...mode.dest })
  const p = await faultProxy(dest.address)
  try {
    const source = await Source.connect({
      address: p.address,
      blocks: src,
      channels: r.channels,
      compression: r.compression,
      integrity: 'xxh3',
      // Throttled so the cut lands mid-transfer (about 1 s for the whole block).
      maxBandwidth: r.size,
      ...mode.source,
    })
    await whenTrue(() => p.accepted() === r.channels + 1, 10_000, 'every channel through the proxy')
    p.cutAfter(r.connection, r.after)
    const summary = await until(source.sendAll().then(() => source.complete()), 30_000, 'the migration')
    const d = await until(dest.done, 10_000, 'the destination')
    return { source: summary.recoveries, dest: d.recoveries, same: sameBytes(src, dst), seconds: summary.seconds }
  } finally {
    dest.close()
    await p.close()
  }
}

test.serial('20 channel cuts with a RST at a random point: every migration completes byte-identical, each repair reported on both sides', async (t) => {
  t.timeout(180_000)
  t.log(`seed ${SEED} (replay with RECOVERY_SEED=${SEED})`)
  const random = seeded(SEED)
  const combos = [
    { compression: 'none', tls: 'plain' },
    { compression: 'zstd', tls: 'plain' },
    { compression: 'none', tls: 'tls' },
    { compression: 'zstd', tls: 'tls' },
  ] as const
  const repairs: string[] = []
  for (let i = 0; i < 20; i++) {
    const combo = combos[i % combos.length]!
    const channels = 2 + Math.floor(random() * 3)
    const size = (16 + 16 * Math.floor(random() * 3)) * MiB
    const run: CutRun = {
      ...combo,
      size,
      channels,
      connection: 1 + Math.floor(random() * channels),
      // Somewhere between the first packets and most of the channel's share.
      after: Math.floor(256 * 1024 + random() * (size / channels) * 0.25),
    }
    const what = `run ${i}: ${run.compression}, ${run.tls}, ${channels} channels, ${size / MiB} MiB, connection ${run.connection} cut after ${run.after} bytes`
    const r = await cutOnce(run)
    t.true(r.same, `${what}: whole-block hashes differ`)
    t.is(r.source.length, 1, `${what}: one repair on the source, got ${JSON.stringify(r.source)}`)
    t.is(r.dest.length, 1, `${what}: one repair on the destination, got ${JSON.stringify(r.dest)}`)
    const [s, d] = [r.source[0]!, r.dest[0]!]
    t.is(s.side, 'source')
    t.is(d.side, 'destination')
    t.true(typeof s.connection === 'number' && s.connection < channels, what)
    t.is(d.connection, s.connection, `${what}: both sides name the same channel`)
    t.is(s.cause.code, 'ERR_MULTIFD_CONNECTION_CLOSED', `${what}: ${s.cause.message}`)
    t.is(d.cause.code, 'ERR_MULTIFD_CONNECTION_CLOSED', `${what}: ${d.cause.message}`)
    t.true(s.pagesResent > 0, `${what}: pages sent again`)
    t.is(d.pagesResent, s.pagesResent, `${what}: the destination was told how many pages come again`)
    t.true(s.ms >= 0 && s.ms < 5000, `${what}: repaired in ${s.ms} ms`)
    repairs.push(`${what}: repaired in ${s.ms.toFixed(1)} ms, ${s.pagesResent} pages (${((s.pagesResent * 4096) / MiB).toFixed(1)} MiB) sent again; ${r.seconds.toFixed(2)} s in all`)
  }
  t.log(repairs.join('\n'))
})

test.serial('a cut channel: the recovery event, multifd:recovery, stats().recoveries and the channel state agree; no thread or descriptor is left behind', async (t) => {
  t.timeout(60_000)
  const { src, dst } = blockPair([['pc.ram', 32 * MiB]])
  // Warm up lazily created threads and descriptors (thread pools, the addon).
  const warm = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: blockPair([['pc.ram', 32 * MiB]]).dst })
  await migrate({ address: warm.address, blocks: src, channels: 2 })
  await warm.done
  const threads = threadCount()
  const fds = fdCount()
  const published: unknown[] = []
  const onRecovery = (m: unknown): void => void published.push(m)
  diagnostics.subscribe('multifd:recovery', onRecovery)
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const p = await faultProxy(dest.address)
  try {
    const source = await Source.connect({ address: p.address, blocks: src, channels: 4, maxBandwidth: 32 * MiB })
    const events: Recovery[] = []
    source.on('recovery', (r) => events.push(r))
    const sending = source.sendAll().then(() => source.complete())
    await whenTrue(() => p.accepted() === 5 && source.stats().bytes > 4 * MiB, 10_000, 'traffic on every channel')
    t.true(p.cut(3), 'connection 3 is a channel')
    await whenTrue(() => events.length === 1, 10_000, 'the recovery event')
    const summary = await until(sending, 30_000, 'the migration')
    const d = await dest.done
    t.true(sameBytes(src, dst))
    t.deepEqual(summary.recoveries, events)
    t.deepEqual(source.stats().recoveries, events)
    t.is(d.recoveries.length, 1)
    t.deepEqual(
      published.map((m) => (m as { role: string }).role).sort(),
      ['destination', 'source'],
      'multifd:recovery carries both sides',
    )
    t.true(summary.perChannel.every((c) => c.state === 'up'))
    t.is(p.accepted(), 6, 'one replacement connection')
  } finally {
    diagnostics.unsubscribe('multifd:recovery', onRecovery)
    dest.close()
    await p.close()
  }
  t.is(threadCount(), threads, 'every thread joined')
  t.is(fdCount(), fds, 'every descriptor closed')
})

test('live migration with a writer running: a channel cut during round 1 is repaired, it converges and the destination equals the source', async (t) => {
  t.timeout(60_000)
  const size = 32 * MiB
  const { src, dst } = blockPair([['state', size]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const p = await faultProxy(dest.address)
  t.teardown(() => p.close())
  const dirtier = await startDirtier(src, 1000)
  let cut = false
  try {
    const summary = await migrate({
      address: p.address,
      blocks: src,
      channels: 2,
      live: true,
      downtimeLimitMs: 50,
      maxBandwidth: 16_000_000,
      onSource: (s) =>
        s.on('round', (r) => {
          // Round 0 ended: cut channel connection 1 once round 1 has put some bytes on it.
          if (r.round === 0 && !cut) {
            cut = true
            p.cutAfter(1, p.connections().find((c) => c.index === 1)!.upBytes() + 256 * 1024)
          }
        }),
      onSwitchover: async () => void (await dirtier.pause()),
    })
    const d = await dest.done
    t.true(cut)
    t.is(summary.status, 'completed')
    t.is(d.status, 'completed')
    t.true(summary.converged)
    t.is(summary.recoveries.length, 1, JSON.stringify(summary.recoveries))
    t.is(d.recoveries.length, 1)
    t.true(sameBytes(src, dst), 'sha256 of the whole block is the same on both sides')
  } finally {
    await dirtier.stop()
  }
})

test('a channel the proxy refuses to let back: given up after channelRetries with a warning, the migration finishes on the other channels byte-identical', async (t) => {
  t.timeout(60_000)
  const { src, dst } = blockPair([['pc.ram', 64 * MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, resumeWindowMs: 5000 })
  const p = await faultProxy(dest.address)
  t.teardown(() => p.close())
  const source = await Source.connect({ address: p.address, blocks: src, channels: 4, maxBandwidth: 32 * MiB, channelRetries: 3 })
  const warnings: string[] = []
  source.on('warning', (w) => warnings.push(`${w.code}: ${w.message}`))
  const destWarnings: string[] = []
  dest.on('warning', (w) => destWarnings.push(w.message))
  const sending = source.sendAll().then(() => source.complete())
  await whenTrue(() => p.accepted() === 5 && source.stats().bytes > 2 * MiB, 10_000, 'traffic on every channel')
  p.refuseWhen((i) => i >= 5)
  t.true(p.cut(2))
  const summary = await until(sending, 30_000, 'the migration')
  const d = await until(dest.done, 10_000, 'the destination')
  t.is(summary.status, 'completed')
  t.is(d.status, 'completed')
  t.true(sameBytes(src, dst), 'whole-block hashes equal')
  t.is(p.accepted(), 8, 'three redials, all refused')
  t.is(warnings.length, 1, warnings.join('\n'))
  t.regex(warnings[0]!, /^ERR_MULTIFD_CONNECTION_CLOSED: .*given up, the migration goes on with 3 of 4 channels.*gave up after 3 redial/)
  t.is(destWarnings.length, 1)
  t.is(summary.perChannel.filter((c) => c.state === 'lost').length, 1)
  t.is(d.perChannel.filter((c) => c.state === 'lost').length, 1)
  t.deepEqual(summary.recoveries, [], 'nothing was repaired')
  t.is(summary.syncs, 2, 'the final sync and the one after the given-up channel\'s pages, on every remaining channel')
})

test('a channel given up while the final sync is out: its pages are delivered before the migration completes', async (t) => {
  t.timeout(60_000)
  const { src, dst } = blockPair([['pc.ram', 64 * MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const p = await faultProxy(dest.address)
  t.teardown(() => p.close())
  const source = await Source.connect({ address: p.address, blocks: src, channels: 4, maxBandwidth: 32 * MiB, channelRetries: 3, integrity: 'xxh3' })
  const sending = source.sendAll().then(() => source.complete())
  // Late: every page is queued and the other channels write the final SYNC while this one is
  // still being redialled (350 ms of backoff). Its pages then go out after that SYNC.
  // Every fifth page is zero (fillRandom): 0.8 of the block goes as data; wait for 90% of that.
  await whenTrue(() => p.accepted() === 5 && source.stats().bytes > 0.9 * 0.8 * 64 * MiB, 10_000, 'most of the block sent')
  p.refuseWhen((i) => i >= 5)
  t.true(p.cut(2))
  const summary = await until(sending, 30_000, 'the migration')
  await until(dest.done, 10_000, 'the destination')
  t.is(summary.status, 'completed')
  t.true(sameBytes(src, dst), 'whole-block hashes equal')
  t.is(summary.perChannel.filter((c) => c.state === 'lost').length, 1)
})

test('with minChannels equal to the channel count, a channel that cannot come back fails the migration with the cause code within bounded time, on both sides', async (t) => {
  t.timeout(60_000)
  const { src, dst } = blockPair([['pc.ram', 64 * MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, resumeWindowMs: 5000 })
  const p = await faultProxy(dest.address)
  t.teardown(() => p.close())
  const source = await Source.connect({ address: p.address, blocks: src, channels: 4, maxBandwidth: 32 * MiB, channelRetries: 3, minChannels: 4 })
  const sending = rejectionCode(source.sendAll().then(() => source.complete()))
  await whenTrue(() => p.accepted() === 5 && source.stats().bytes > 2 * MiB, 10_000, 'traffic on every channel')
  p.refuseWhen((i) => i >= 5)
  const cutAt = performance.now()
  t.true(p.cut(2))
  t.is(await until(sending, 10_000, 'source failure'), 'ERR_MULTIFD_CONNECTION_CLOSED')
  // 3 redials: 50 + 100 + 200 ms of backoff, each refused at once.
  const ms = performance.now() - cutAt
  t.true(ms >= 350 && ms < 5000, `gave up after ${ms} ms`)
  t.is(p.accepted(), 8, 'three redials')
  t.is(await until(rejectionCode(dest.done), 5000, 'destination failure'), 'ERR_MULTIFD_CONNECTION_CLOSED')
  t.true(source.stats().channels.some((c) => c.state === 'lost'))
  t.regex(source.error!.message, /gave up after 3 redial/)
})

test('the destination waits resumeWindowMs for a lost channel, then fails with its cause', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', 64 * MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, resumeWindowMs: 1000 })
  const p = await faultProxy(dest.address)
  t.teardown(() => p.close())
  const source = await Source.connect({ address: p.address, blocks: src, channels: 2, maxBandwidth: 32 * MiB })
  const sending = rejectionCode(source.sendAll().then(() => source.complete()))
  await whenTrue(() => p.accepted() === 3 && source.stats().bytes > 2 * MiB, 10_000, 'traffic on every channel')
  // Replacements never arrive (the proxy resets them): the source keeps redialling (5 times,
  // 3.1 s of backoff), the destination gives up first, after its window.
  p.refuseWhen((i) => i >= 3)
  const cutAt = performance.now()
  p.cut(1)
  await whenTrue(() => dest.stats().channels.some((c) => c.state === 'lost'), 5000, 'a lost channel at the destination')
  t.is(await until(rejectionCode(dest.done), 5000, 'destination failure'), 'ERR_MULTIFD_CONNECTION_CLOSED')
  const ms = performance.now() - cutAt
  t.true(ms >= 1000 && ms < 3000, `failed after ${ms} ms`)
  t.regex(dest.error!.message, /not replaced within 1000 ms/)
  t.is(await until(sending, 10_000, 'source failure'), 'ERR_MULTIFD_CONNECTION_CLOSED')
})

test('a source that fails on its own: the destination reports the source code, not the closed channels', async (t) => {
  t.timeout(30_000)
  const dir = mkdtempSync(join(tmpdir(), 'multifd-recovery-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const file = join(dir, 'ram.img')
  writeFileSync(file, randomBytes(32 * MiB))
  const block = RamBlock.mapFile({ name: 'pc.ram', path: file })
  const target = RamBlock.allocate({ name: 'pc.ram', size: 32 * MiB })
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [target] })
  const source = await Source.connect({ address: dest.address, blocks: [block], channels: 4, maxBandwidth: 16 * MiB })
  const sending = rejectionCode(source.sendAll().then(() => source.complete()))
  await whenTrue(() => source.stats().bytes > 2 * MiB, 10_000, 'traffic')
  truncateSync(file, 4 * MiB)
  t.is(await until(sending, 10_000, 'source failure'), 'ERR_MULTIFD_SOURCE_TRUNCATED')
  t.is(await until(rejectionCode(dest.done), 10_000, 'destination failure'), 'ERR_MULTIFD_SOURCE_TRUNCATED')
  t.true(dest.error!.remote)
})

test('a replacement is admitted in place of a connection that still looks alive and reads on from there; a second channel 0 without the marker is still a duplicate', async (t) => {
  t.timeout(30_000)
  const target = RamBlock.allocate({ name: 'pc.ram', size: MiB })
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [target] })
  const uuid = randomBytes(16)
  const ctl = await rawControl(dest.address)
  ctl.send({ type: 'hello', protocol: 1, session: uuid.toString('hex'), channels: 1, pageSize: 4096, compression: 'none', blocks: [{ name: 'pc.ram', length: MiB }] })
  t.like(await ctl.next(), { type: 'welcome' })
  const packet = (offset: bigint, fill: number, packetNum: bigint): Buffer[] => [encodePacketHeader({ block: 'pc.ram', normalOffsets: [offset], packetNum }), Buffer.alloc(4096, fill)]
  const first = await rawChannel(dest.address, [encodeInitPacket({ uuid, channelId: 0 }), ...packet(0n, 7, 0n)])
  const firstClosed = new Promise<void>((r) => first.once('close', () => r()))
  await whenTrue(() => dest.stats().normalPages === 1, 5000, 'the first page')
  // The same channel again, with the replacement marker: acknowledged, the old one shut down.
  const marker = Buffer.from(encodeInitPacket({ uuid, channelId: 0 }))
  marker.write('RPLC', 25, 'latin1')
  marker.writeBigUInt64BE(0n, 29)
  marker.writeBigUInt64BE(1n, 37)
  const replacement = await rawChannel(dest.address, [marker])
  const ack = await until(new Promise<Buffer>((r) => replacement.once('data', r)), 5000, 'the acknowledgement')
  t.is(ack.toString('latin1'), 'MFDRPLOK')
  await until(firstClosed, 5000, 'the old connection shut down by the destination')
  await whenTrue(() => dest.stats().recoveries.length > 0, 5000, 'the recovery event')
  const recoveries = dest.stats().recoveries
  t.is(recoveries.length, 1)
  t.like(recoveries[0], { connection: 0, side: 'destination', pagesResent: 1, cause: { code: 'ERR_MULTIFD_CONNECTION_CLOSED' } })
  t.regex(recoveries[0]!.cause.message, /still looked alive/)
  // The replacement carries pages and the SYNC the barrier counts.
  for (const b of [...packet(0n, 8, 1n), ...packet(4096n, 9, 2n), encodePacketHeader({ flags: 1, packetNum: 3n })]) replacement.write(b)
  t.like(await ctl.next(), { type: 'synced', epoch: 1 })
  t.is(target.view()[0], 8)
  t.is(target.view()[4096], 9)
  const duplicate = await rawChannel(dest.address, [encodeInitPacket({ uuid, channelId: 0 })])
  t.is(await until(rejectionCode(dest.done), 5000, 'the duplicate refused'), 'ERR_MULTIFD_CHANNEL_DUPLICATE')
  for (const s of [replacement, duplicate, ctl.socket]) s.destroy()
})

test('an idle channel whose connection is closed is noticed and repaired before anything is written on it', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', 8 * MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const p = await faultProxy(dest.address)
  t.teardown(() => p.close())
  const source = await Source.connect({ address: p.address, blocks: src, channels: 2 })
  await source.sendAll()
  await source.sync()
  // Nothing is queued: only the watcher of the channel sockets can see this close.
  t.true(p.cut(1, 'close'))
  await whenTrue(() => source.stats().recoveries.length === 1, 5000, 'the repair of an idle channel')
  t.is(source.stats().recoveries[0]!.pagesResent, 0, 'everything it sent was acknowledged')
  const summary = await until(source.complete(), 10_000, 'completion')
  await dest.done
  t.is(summary.recoveries.length, 1)
  t.true(sameBytes(src, dst))
})

test('multifd send/recv through a cut channel: completes, a line per repair, recoveries in --json', async (t) => {
  t.timeout(90_000)
  const d = workdir(t)
  const image = join(d, 'a.img')
  writeFileSync(image, randomBytes(16 * MiB))
  const rx = await receiver(['--out', join(d, 'a.out'), '--json'])
  const p = await faultProxy(rx.address)
  t.teardown(() => p.close())
  const tx = cli(['send', p.address, image, '--channels', '2', '--max-bandwidth', '16M'])
  await whenTrue(() => p.accepted() === 3, 20_000, 'every channel through the proxy')
  p.cutAfter(2, MiB)
  const [sent, received] = [await tx.done, await rx.done]
  t.is(sent.code, 0, sent.stderr)
  t.is(received.code, 0, received.stderr)
  t.regex(sent.stdout, /recovered channel [01] in \d+ ms after ERR_MULTIFD_CONNECTION_CLOSED \(\d+ page\(s\) sent again\)/)
  const j = lastJson(received.stdout) as { recoveries: Recovery[] }
  t.is(j.recoveries.length, 1)
  t.like(j.recoveries[0], { side: 'destination', cause: { code: 'ERR_MULTIFD_CONNECTION_CLOSED' } })
  t.is(sha(join(d, 'a.out')), sha(image))
})
