/**
 * The control connection is repaired, not fatal: a fault proxy cuts it with a RST (connection
 * 0 is the control connection) while a 4-channel migration runs, the source reconnects with
 * the session's UUID, and the migration completes with both sides' bytes equal and a control
 * `Recovery` reported on both sides. The cut lands after a seeded random amount of traffic
 * (the seed is printed), while a sync is awaited (its acknowledgement must not be lost), and
 * during `complete`. A control connection that never comes back fails each side within bounded
 * time with the cause's code.
 */
import test, { type ExecutionContext } from 'ava'
import { Destination, Source, type MultifdErrorCode, type Recovery } from '../ts/index.js'
import { type FaultProxy, faultProxy } from './fault-proxy.js'
import { MiB, blockPair, fdCount, rejectionCode, sameBytes, seeded, testPki, threadCount, until } from './helpers.js'

const pki = testPki()
const ROUNDS = 4

/** Collects both sides' repairs; on a failure, nothing may keep the test process alive. */
function watch(t: ExecutionContext, source: Source, dest: Destination, proxy: FaultProxy): Recovery[] {
  t.teardown(async () => {
    await source.cancel()
    dest.close()
    await proxy.close()
  })
  const recoveries: Recovery[] = []
  source.on('recovery', (x) => recoveries.push(x))
  dest.on('recovery', (x) => recoveries.push(x))
  return recoveries
}

type Where = 'traffic' | 'sync' | 'complete'

interface Run {
  title: string
  compression: 'none' | 'zstd'
  tls: boolean
  where: Where
}

const runs: Run[] = [
  { title: 'after a random amount of traffic', compression: 'none', tls: false, where: 'traffic' },
  { title: 'after a random amount of traffic', compression: 'zstd', tls: true, where: 'traffic' },
  { title: 'while a sync is awaited (its acknowledgement is lost with the connection)', compression: 'zstd', tls: false, where: 'sync' },
  { title: 'while a sync is awaited (its acknowledgement is lost with the connection)', compression: 'none', tls: true, where: 'sync' },
  { title: 'during complete (the complete is lost with the connection)', compression: 'zstd', tls: true, where: 'complete' },
]

async function cutRun(t: ExecutionContext, r: Run, seed: number): Promise<void> {
  const random = seeded(seed)
  const { src, dst } = blockPair([['pc.ram', 8 * MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, ...(r.tls ? { tls: pki.dest() } : {}) })
  const proxy = await faultProxy(dest.address)
  const source = await Source.connect({ address: proxy.address, blocks: src, channels: 4, compression: r.compression, integrity: 'xxh3', ...(r.tls ? { tls: { ...pki.source(), name: 'localhost' } } : {}) })
  const recoveries = watch(t, source, dest, proxy)
  const control = proxy.connections()[0]!
  const cutRound = 1 + Math.floor(random() * (ROUNDS - 1))
  let cut = ''
  for (let round = 0; round < ROUNDS; round++) {
    await source.sendAll()
    if (round === cutRound && r.where === 'traffic') {
      // A `round` frame is about 30 bytes: the RST lands a random number of bytes into it.
      const into = 1 + Math.floor(random() * 20)
      proxy.cutAfter(0, control.upBytes() + into)
      source.markRound()
      cut = `${into} bytes into the round ${round} frame`
    }
    if (round === cutRound && r.where === 'sync') {
      // Whatever the destination says next on the control connection (the `synced` this sync
      // waits for) is never delivered: the RST comes instead.
      proxy.cutAfterDown(0, control.downBytes() + 1)
      cut = `while sync ${round + 1} was awaited`
    }
    await until(source.sync(), 20_000, `sync ${round + 1}`)
  }
  if (r.where === 'complete') {
    // `complete` is the next thing the source says: one byte of it passes, then the RST.
    proxy.cutAfter(0, control.upBytes() + 1)
    cut = 'one byte into the complete frame'
  }
  const summary = await until(source.complete(), 30_000, 'the source completing')
  const destSummary = await until(dest.done, 30_000, 'the destination completing')
  t.log(`${r.compression}${r.tls ? ', TLS' : ''}: seed ${seed}, cut ${cut}; repairs: ${recoveries.map((x) => `${x.side} ${x.ms.toFixed(0)} ms (${x.cause.code})`).join(', ')}`)
  t.is(summary.status, 'completed')
  t.is(destSummary.status, 'completed')
  t.true(sameBytes(src, dst), 'destination equals source')
  for (const side of ['source', 'destination'] as const) {
    const repaired = recoveries.filter((x) => x.side === side)
    t.true(repaired.length >= 1 && repaired.every((x) => x.connection === 'control'), `${side}: a control recovery`)
    t.true(repaired.every((x) => x.cause.code === 'ERR_MULTIFD_CONNECTION_CLOSED'), `${side}: the cause is the reset`)
  }
  t.deepEqual(source.stats().recoveries, summary.recoveries)
  t.is(summary.recoveries.length, recoveries.filter((x) => x.side === 'source').length)
  t.is(destSummary.recoveries.length, recoveries.filter((x) => x.side === 'destination').length)
  t.true(proxy.accepted() >= 6, 'the control connection was redialled')
  await proxy.close()
}

test.serial('control connection cuts: every run completes byte-identical with a control recovery on both sides, and nothing is left behind', async (t) => {
  t.timeout(180_000)
  const base = Number(process.env.MULTIFD_CUT_SEED ?? Date.now() % 100_000)
  // Warm up lazily created threads and descriptors, with TLS and zstd.
  await cutRun(t, { ...runs[1]!, where: 'traffic' }, base)
  const [threads, fds] = [threadCount(), fdCount()]
  for (const [i, r] of runs.entries()) await cutRun(t, r, base + i)
  t.is(threadCount(), threads, 'threads')
  t.is(fdCount(), fds, 'descriptors')
})

test('a destination whose control connection never comes back fails after resumeWindowMs with the cause\'s code', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, resumeWindowMs: 1000 })
  const proxy = await faultProxy(dest.address)
  t.teardown(() => proxy.close())
  // The source keeps redialling (refused) longer than the destination waits: six redials,
  // 50 ms doubling, are 3.15 s of backoff.
  const source = await Source.connect({ address: proxy.address, blocks: src, channels: 2, channelRetries: 6 })
  const sourceCode = rejectionCode(source.done)
  await source.sendAll()
  await source.sync()
  proxy.refuseWhen(() => true)
  const cutAt = performance.now()
  t.true(proxy.cut(0))
  const code: MultifdErrorCode = await until(rejectionCode(dest.done), 10_000, 'the destination giving up')
  const took = performance.now() - cutAt
  t.is(code, 'ERR_MULTIFD_CONNECTION_CLOSED')
  t.regex(dest.error?.message ?? '', /resumeWindowMs \(1000 ms\)/)
  t.true(took >= 900 && took < 4000, `failed ${took.toFixed(0)} ms after the cut`)
  t.is(await until(sourceCode, 10_000, 'the source failing too, out of retries'), 'ERR_MULTIFD_CONNECTION_CLOSED')
})

test('a source whose control reconnects are refused fails after its retries with the cause\'s code', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const destCode = rejectionCode(dest.done)
  const proxy = await faultProxy(dest.address)
  t.teardown(() => proxy.close())
  const source = await Source.connect({ address: proxy.address, blocks: src, channels: 2, channelRetries: 3 })
  await source.sendAll()
  await source.sync()
  proxy.refuseWhen(() => true)
  const cutAt = performance.now()
  t.true(proxy.cut(0))
  const code = await until(rejectionCode(source.done), 10_000, 'the source giving up')
  const took = performance.now() - cutAt
  t.is(code, 'ERR_MULTIFD_CONNECTION_CLOSED')
  t.regex(source.error?.message ?? '', /3 reconnect\(s\) failed/)
  // 50 + 100 + 200 ms of backoff and three refused connects.
  t.true(took >= 300 && took < 3000, `failed ${took.toFixed(0)} ms after the cut`)
  await until(destCode, 15_000, 'the destination failing too')
})

test('a control connection that hangs (nothing passes, no reset) is replaced after peerTimeoutMs on both sides, and the migration completes', async (t) => {
  t.timeout(60_000)
  const { src, dst } = blockPair([['pc.ram', 4 * MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, peerTimeoutMs: 1000 })
  const proxy = await faultProxy(dest.address)
  const source = await Source.connect({ address: proxy.address, blocks: src, channels: 2, peerTimeoutMs: 1000 })
  const recoveries = watch(t, source, dest, proxy)
  await source.sendAll()
  await source.sync()
  // From here the control connection passes nothing either way: the next sync's
  // acknowledgement is held with it, and no ping gets through.
  proxy.hold(0)
  await source.sendAll()
  await until(source.sync(), 20_000, 'the sync across the hung control connection')
  const summary = await until(source.complete(), 20_000, 'the source completing')
  await until(dest.done, 20_000, 'the destination completing')
  t.is(summary.status, 'completed')
  t.true(sameBytes(src, dst))
  const mine = recoveries.filter((x) => x.side === 'source')
  t.true(mine.length >= 1 && mine[0]!.connection === 'control', 'a control recovery on the source')
  t.true(recoveries.some((x) => x.side === 'destination' && x.connection === 'control'), 'a control recovery on the destination')
  // The side whose peerTimeoutMs ran out first dropped it; the other saw it close.
  t.true(recoveries.some((x) => x.cause.code === 'ERR_MULTIFD_TIMEOUT'), 'a side noticed the silence')
  t.log(recoveries.map((x) => `${x.side}: ${x.cause.code} ${x.ms.toFixed(0)} ms`).join(', '))
})
