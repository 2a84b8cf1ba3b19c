/** Mutual TLS on every channel: bytes equal over TLS, each refusal with its code on both sides, nothing written. */
import test from 'ava'
import diagnostics from 'node:diagnostics_channel'
import net from 'node:net'
import { Destination, MultifdError, RamBlock, Source, migrate, type DestinationOptions, type SourceOptions } from '../ts/index.js'
import { MiB, blockPair, rejectionCode, sameBytes, sha256, testPki, until } from './helpers.js'

const pki = testPki()
const destTls = pki.dest
const sourceTls = pki.source

test('mutual TLS on 4 channels: every byte arrives, with credentials as paths on one side and PEM text on the other', async (t) => {
  t.timeout(60_000)
  const { src, dst } = blockPair([['pc.ram', 16 * MiB + 4096], ['vga', 3 * 4096]])
  const announced: Array<{ role: string; session: string; peer?: { subject: string } }> = []
  const onTls = (m: unknown): void => void announced.push(m as (typeof announced)[number])
  diagnostics.subscribe('multifd:tls', onTls)
  t.teardown(() => diagnostics.unsubscribe('multifd:tls', onTls))
  const dest = Destination.listen({
    address: 'tcp:127.0.0.1:0',
    blocks: dst,
    tls: { cert: pki.pem('dest.pem'), key: pki.pem('dest.key'), ca: Buffer.from(pki.pem('ca.pem')), allow: ['CN=source, O=multifd tests'] },
  })
  let session = ''
  const s = await migrate({ address: dest.address, blocks: src, channels: 4, compression: 'zstd', tls: sourceTls(), onSource: (x) => (session = x.session) })
  const d = await dest.done
  t.is(s.status, 'completed')
  t.is(d.status, 'completed')
  t.true(sameBytes(src, dst))
  t.is(sha256(src[0]!), sha256(dst[0]!))
  t.deepEqual(s.tls, { protocol: 'TLS 1.3', cipherSuite: 'TLS13_AES_128_GCM_SHA256', peer: { subject: 'CN=destination', altNames: ['localhost', 'dest.test', '127.0.0.1'] } })
  t.deepEqual(d.tls, { protocol: 'TLS 1.3', cipherSuite: 'TLS13_AES_128_GCM_SHA256', peer: { subject: 'CN=source,O=multifd tests', altNames: ['source.test'] } })
  const mine = announced.filter((a) => a.session === session)
  t.deepEqual(mine.map((a) => `${a.role}:${a.peer?.subject}`).sort(), ['destination:CN=source,O=multifd tests', 'source:CN=destination'])
})

test('mutual TLS over a unix socket: the destination name is required and checked', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', 4 * MiB]])
  const address = `unix:${pki.dir}/tls-${process.pid}.sock`
  const noName = await t.throwsAsync(Source.connect({ address, blocks: src, tls: sourceTls() }), { instanceOf: MultifdError })
  t.is(noName?.code, 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.regex(noName?.message ?? '', /needs the destination's certificate name/)
  const dest = Destination.listen({ address, blocks: dst, tls: destTls() })
  const s = await migrate({ address, blocks: src, channels: 2, tls: sourceTls('source', 'ca.pem', 'dest.test') })
  await dest.done
  t.is(s.status, 'completed')
  t.true(sameBytes(src, dst))
})

/** A proxy that delivers everything the destination sends `ms` late, like a far link. */
async function slowLink(target: string, ms: number): Promise<{ address: string; close: () => void }> {
  const [, host, port] = /^tcp:(.+):(\d+)$/.exec(target)!
  const sockets: net.Socket[] = []
  const server = net.createServer((down) => {
    const up = net.connect(Number(port), host)
    sockets.push(down, up)
    for (const s of [down, up]) s.on('error', () => undefined)
    down.pipe(up)
    // Equal delays keep the order: timers due at the same time fire in the order they were set.
    up.on('data', (d: Buffer) => void setTimeout(() => down.write(d), ms))
    up.on('end', () => void setTimeout(() => down.end(), ms))
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  return { address: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`, close: () => { sockets.forEach((s) => s.destroy()); server.close() } }
}

test('channels connect and handshake in parallel: 8 TLS channels over a slow link take about one handshake, not eight', async (t) => {
  t.timeout(30_000)
  const { src, dst } = blockPair([['pc.ram', MiB]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, tls: destTls() })
  const link = await slowLink(dest.address, 400)
  t.teardown(() => link.close())
  const started = Date.now()
  const source = await Source.connect({ address: link.address, blocks: src, channels: 8, tls: sourceTls('source', 'ca.pem', 'localhost') })
  const took = Date.now() - started
  // Each connection needs two delayed answers (the server's handshake flight, then its verdict):
  // one after another that is 9 x 800 ms (control, then 8 channels); at once, about 2 x 800.
  t.true(took < 3200, `connecting took ${took} ms`)
  t.log(`connecting took ${took} ms`)
  await source.sendAll()
  await source.complete()
  await dest.done
  t.true(sameBytes(src, dst))
})

interface Refusal {
  title: string
  dest: DestinationOptions['tls']
  source: SourceOptions['tls']
  address?: (a: string) => string
  codes: [source: MultifdError['code'], destination: MultifdError['code']]
}

const refusals: Refusal[] = [
  { title: 'a source that does not trust the destination CA', dest: destTls(), source: sourceTls('source', 'other-ca.pem'), codes: ['ERR_MULTIFD_TLS_UNTRUSTED', 'ERR_MULTIFD_TLS_UNTRUSTED'] },
  { title: 'a source certificate signed by a CA the destination does not trust', dest: destTls(), source: sourceTls('rogue'), codes: ['ERR_MULTIFD_TLS_UNTRUSTED', 'ERR_MULTIFD_TLS_UNTRUSTED'] },
  { title: 'an expired source certificate', dest: destTls(), source: sourceTls('expired'), codes: ['ERR_MULTIFD_TLS_EXPIRED', 'ERR_MULTIFD_TLS_EXPIRED'] },
  { title: 'a destination certificate for another host name', dest: destTls(), source: sourceTls('source', 'ca.pem', 'elsewhere.test'), codes: ['ERR_MULTIFD_TLS_NAME_MISMATCH', 'ERR_MULTIFD_TLS_REJECTED'] },
  { title: 'a source not on the allow-list', dest: destTls(['CN=source,O=multifd tests']), source: sourceTls('intruder'), codes: ['ERR_MULTIFD_TLS_NOT_ALLOWED', 'ERR_MULTIFD_TLS_NOT_ALLOWED'] },
  { title: 'a plaintext source against a TLS destination', dest: destTls(), source: undefined, codes: ['ERR_MULTIFD_TLS_REQUIRED', 'ERR_MULTIFD_TLS_REQUIRED'] },
  { title: 'a TLS source against a plaintext destination', dest: undefined, source: sourceTls(), codes: ['ERR_MULTIFD_TLS_UNAVAILABLE', 'ERR_MULTIFD_TLS_UNAVAILABLE'] },
]

for (const r of refusals) {
  test(`refused: ${r.title} (source fails with ${r.codes[0]}, the destination rejects it with ${r.codes[1]} and listens on), within 5 s, no page written`, async (t) => {
    t.timeout(30_000)
    const { src, dst } = blockPair([['pc.ram', 4 * MiB]])
    const before = sha256(dst[0]!)
    const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, ...(r.dest ? { tls: r.dest } : {}) })
    const warned = new Promise<MultifdError>((resolve) => dest.once('warning', resolve))
    const started = Date.now()
    const sourceCode = await until(rejectionCode(migrate({ address: dest.address, blocks: src, channels: 2, connectTimeoutMs: 3000, ...(r.source ? { tls: r.source } : {}) })), 5000, 'the source refusal')
    t.is(sourceCode, r.codes[0], 'source')
    const rejection = await until(warned, 5000, 'the destination rejection')
    t.is(rejection.code, r.codes[1], 'destination')
    t.regex(rejection.message, /^rejected a connection from 127\.0\.0\.1:\d+: /)
    t.true(Date.now() - started < 5000)
    // A stranger cannot end the destination's wait for its source.
    t.is(dest.state, 'none')
    t.is(dest.error, undefined)
    t.is(dest.stats().rejectedConnections, 1)
    t.is(sha256(dst[0]!), before, 'no page was written')
    t.is(dest.stats().bytes, 0)
    dest.close()
  })
}

test('a client that stops mid-handshake is cut off after handshakeTimeoutMs (a rejection with ERR_MULTIFD_TIMEOUT)', async (t) => {
  t.timeout(20_000)
  const dst = [RamBlock.allocate({ name: 'pc.ram', size: MiB })]
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst, tls: destTls(), handshakeTimeoutMs: 1000 })
  const warned = new Promise<MultifdError>((resolve) => dest.once('warning', resolve))
  const port = Number(dest.address.split(':').pop())
  const sock = net.connect(port, '127.0.0.1', () => sock.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01])))
  const started = Date.now()
  const rejection = await until(warned, 5000, 'the destination cutting it off')
  t.is(rejection.code, 'ERR_MULTIFD_TIMEOUT')
  const took = Date.now() - started
  t.true(took >= 900 && took < 3000, `took ${took} ms`)
  t.regex(rejection.message, /TLS handshake/)
  t.is(dest.error, undefined, 'the destination is unharmed')
  t.is(dest.stats().rejectedConnections, 1)
  sock.destroy()
  dest.close()
})

test('a destination that stops mid-handshake fails the source after connectTimeoutMs (ERR_MULTIFD_TIMEOUT); the event loop runs meanwhile', async (t) => {
  t.timeout(20_000)
  const held: net.Socket[] = []
  // Reads the ClientHello, never answers. Unreferenced, so that a connection arriving after the
  // test cannot keep this test file's process alive (a socket nobody reads never sees its EOF).
  const server = net.createServer((s) => held.push(s.unref())).unref()
  t.teardown(() => {
    held.forEach((s) => s.destroy())
    server.close()
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  const port = (server.address() as net.AddressInfo).port
  const started = Date.now()
  let ticks = 0
  const ticker = setInterval(() => ticks++, 50)
  const err = await t.throwsAsync(Source.connect({ address: `tcp:127.0.0.1:${port}`, blocks: [RamBlock.allocate({ name: 'pc.ram', size: MiB })], connectTimeoutMs: 1000, tls: sourceTls('source', 'ca.pem', 'localhost') }), { instanceOf: MultifdError })
  const took = Date.now() - started
  clearInterval(ticker)
  // A free loop ticks about 20 times in that second; a blocked one 0 or 1. A quarter of the
  // ticks leaves room for a loaded machine and still tells the two apart.
  t.true(ticks >= 5, `the event loop ticked ${ticks} times in ${took} ms of handshaking`)
  t.is(err?.code, 'ERR_MULTIFD_TIMEOUT')
  t.regex(err?.message ?? '', /TLS handshake/)
  t.true(took >= 900 && took < 3000, `took ${took} ms`)
})

test('zero-copy with TLS is refused before connecting, as QEMU does', async (t) => {
  const err = await t.throwsAsync(Source.connect({ address: 'tcp:127.0.0.1:1', blocks: [RamBlock.allocate({ name: 'pc.ram', size: MiB })], zeroCopySend: true, tls: sourceTls() }), { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.regex(err?.message ?? '', /zero-copy send cannot be combined with TLS/)
})

test('unreadable or mismatched credentials fail with ERR_MULTIFD_TLS_CONFIG', async (t) => {
  const blocks = [RamBlock.allocate({ name: 'pc.ram', size: MiB })]
  const missing = await t.throwsAsync(Source.connect({ address: 'tcp:127.0.0.1:1', blocks, tls: { ...sourceTls(), cert: '/nonexistent/cert.pem' } }), { instanceOf: MultifdError })
  t.is(missing?.code, 'ERR_MULTIFD_TLS_CONFIG')
  t.regex(missing?.message ?? '', /\/nonexistent\/cert\.pem/)
  const mismatched = t.throws(() => Destination.listen({ address: 'tcp:127.0.0.1:0', blocks, tls: { ...destTls(), key: pki.file('intruder.key') } }), { instanceOf: MultifdError })
  t.is(mismatched?.code, 'ERR_MULTIFD_TLS_CONFIG')
  const garbage = t.throws(() => Destination.listen({ address: 'tcp:127.0.0.1:0', blocks, tls: { ...destTls(), ca: '-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n' } }), { instanceOf: MultifdError })
  t.is(garbage?.code, 'ERR_MULTIFD_TLS_CONFIG')
})
