/**
 * Stray connections cannot hurt a session: 300 junk connections of every kind arrive at a
 * destination while a 4-channel migration runs through it. Each is rejected (closed, counted in
 * `rejectedConnections`, reported in a rate-limited warning naming the peer), the migration
 * completes with both sides' bytes equal, and no thread or descriptor is left behind. The time
 * the junk cost is printed against the same migration without it.
 */
import test, { type ExecutionContext } from 'ava'
import { randomBytes } from 'node:crypto'
import net from 'node:net'
import tls from 'node:tls'
import { Destination, RamBlock, Source, encodeInitPacket, type MultifdError } from '../ts/index.js'
import { MiB, blockPair, fdCount, fillRandom, sameBytes, testPki, threadCount, until, whenTrue } from './helpers.js'

const JUNK = 300
const ROUNDS = 6
const pki = testPki()

/** A control frame: length, then the bytes. */
function frame(b: Buffer): Buffer {
  const len = Buffer.alloc(4)
  len.writeUInt32BE(b.length)
  return Buffer.concat([len, b])
}
const MAGIC = Buffer.from('MFDC')

/** The kinds of junk, by index: what each connection sends (undefined: nothing, held open). */
function junkBytes(i: number, secure: boolean): Buffer | undefined | 'foreign-tls' {
  switch (i % 6) {
    case 0:
      // Random bytes, starting with none of the magics or a TLS record.
      return Buffer.concat([Buffer.from([0]), randomBytes(63)])
    case 1:
      // Plaintext: a TLS ClientHello's record header and garbage. TLS: a handshake that is garbage.
      return Buffer.concat([Buffer.from([0x16, 0x03, 0x01, 0x00, 0x40]), randomBytes(64)])
    case 2:
      // A multifd channel of another session (in plaintext, so a TLS destination refuses it earlier).
      return encodeInitPacket({ uuid: randomBytes(16), channelId: 0 })
    case 3:
      // The control magic, then garbage (not a frame a session starts with).
      return Buffer.concat([MAGIC, frame(randomBytes(40))])
    case 4:
      // A TLS destination: a real TLS client with no certificate. Plaintext: a control
      // connection whose first message is not a hello.
      return secure ? 'foreign-tls' : Buffer.concat([MAGIC, frame(Buffer.from('{"type":"complete","epoch":1}'))])
    default:
      return undefined // silent, held open until the destination gives up on it
  }
}

async function openJunk(port: number, i: number, secure: boolean): Promise<net.Socket> {
  const what = junkBytes(i, secure)
  if (what === 'foreign-tls') {
    const s = tls.connect({ host: '127.0.0.1', port, rejectUnauthorized: false })
    s.on('error', () => undefined)
    return s
  }
  const s = net.connect(port, '127.0.0.1')
  s.on('error', () => undefined)
  await new Promise<void>((resolve) => s.once('connect', resolve).once('close', () => resolve()))
  if (what) s.write(what)
  return s
}

interface Run {
  roundsMs: number
  rejected: number
  /** Rejected by the time the rounds were done. */
  duringRounds: number
  warnings: MultifdError[]
  equal: boolean
}

/** One migration of ROUNDS sends and syncs over 4 channels, with `junk` connections arriving meanwhile. */
async function migration(t: ExecutionContext, junk: number, secure: boolean): Promise<Run> {
  const { src, dst } = blockPair([['pc.ram', 16 * MiB]])
  fillRandom(src[0]!)
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, handshakeTimeoutMs: 1000, ...(secure ? { tls: pki.dest() } : {}) })
  const warnings: MultifdError[] = []
  dest.on('warning', (w) => warnings.push(w))
  const port = Number(dest.address.split(':').pop())
  const source = await Source.connect({ address: dest.address, blocks: src, channels: 4, ...(secure ? { tls: { ...pki.source(), name: 'localhost' } } : {}) })
  const started = performance.now()
  // All at once, while the rounds run.
  const opened: net.Socket[] = []
  const flood = Promise.all(Array.from({ length: junk }, (_, i) => openJunk(port, i, secure).then((s) => (opened.push(s), s))))
  // On a failure too: nothing may keep the test process alive.
  t.teardown(async () => {
    for (const s of opened) s.destroy()
    await source.cancel()
    dest.close()
  })
  for (let r = 0; r < ROUNDS; r++) {
    await source.sendAll()
    await source.sync()
  }
  const roundsMs = performance.now() - started
  const duringRounds = dest.stats().rejectedConnections
  const sockets = await until(flood, 20_000, 'the junk connections')
  // Every junk connection is rejected, the silent ones once handshakeTimeoutMs has passed.
  await whenTrue(() => dest.stats().rejectedConnections >= junk, 20_000, `${junk} rejections (${dest.stats().rejectedConnections} so far)`)
  await source.complete()
  await dest.done
  const rejected = dest.stats().rejectedConnections
  for (const s of sockets) s.destroy()
  return { roundsMs, rejected, duringRounds, warnings, equal: sameBytes(src, dst) }
}

for (const secure of [false, true]) {
  test.serial(`${JUNK} junk connections during a 4-channel migration${secure ? ' over TLS' : ''}: every one rejected and counted, warnings rate-limited and naming peers, the migration completes byte-identical, nothing left behind`, async (t) => {
    t.timeout(120_000)
    await migration(t, 0, secure) // warm up lazily created threads and descriptors
    const [threads, fds] = [threadCount(), fdCount()]
    const clean = await migration(t, 0, secure)
    const dirty = await migration(t, JUNK, secure)
    t.true(clean.equal && dirty.equal, 'destination equals source')
    t.is(clean.rejected, 0)
    t.is(dirty.rejected, JUNK)
    // At most 10 warnings a second one by one, then one summary a second: far fewer than 300.
    t.true(dirty.warnings.length >= 10 && dirty.warnings.length < JUNK / 3, `${dirty.warnings.length} warnings`)
    t.regex(dirty.warnings[0]!.message, /^rejected a connection from 127\.0\.0\.1:\d+: /)
    t.true(dirty.warnings.some((w) => /^rejected \d+ more connections within 1000 ms/.test(w.message)), 'a summary of the rest')
    t.log(`${ROUNDS} rounds of 16 MiB: ${clean.roundsMs.toFixed(0)} ms without junk, ${dirty.roundsMs.toFixed(0)} ms with ${JUNK} junk connections (${(dirty.roundsMs - clean.roundsMs).toFixed(0)} ms lost; ${dirty.duringRounds} rejected while the rounds ran)`)
    await whenTrue(() => threadCount() === threads && fdCount() === fds, 10_000, `threads ${threadCount()}/${threads} and descriptors ${fdCount()}/${fds} back`)
    t.pass()
  })
}

test('a destination whose only visitors are junk stays unharmed and waiting', async (t) => {
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [RamBlock.allocate({ name: 'pc.ram', size: MiB })], handshakeTimeoutMs: 500 })
  const port = Number(dest.address.split(':').pop())
  const sockets = await Promise.all([0, 1, 2, 3, 4, 5].map((i) => openJunk(port, i, false)))
  await whenTrue(() => dest.stats().rejectedConnections === 6, 10_000, 'six rejections')
  t.is(dest.state, 'none')
  t.is(dest.error, undefined)
  sockets.forEach((s) => s.destroy())
  dest.close()
})
