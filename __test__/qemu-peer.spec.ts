/**
 * Stock QEMU 10 as the peer. A paused pc guest whose 64 MiB RAM (a memory-backend-file) holds
 * ramgen.py's known content (a quarter zero pages) migrates with `migrate tcp:` to
 * `QemuReceiver` / `multifd recv --qemu`; the file it writes is restored by a second QEMU with
 * `migrate-incoming file:` (mapped-ram, with and without multifd) and played by `QemuSender` /
 * `multifd send --qemu` into a third QEMU started with `-incoming`: every RAM that comes out
 * equals the source's byte for byte. The QEMU tests run where qemu-system-x86_64 >= 10 is
 * installed (CI installs it); the hostile-stream tests always run.
 */
import test, { type ExecutionContext } from 'ava'
import { execFile, execFileSync, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { MultifdError, QemuReceiver, QemuSender, inspectQemuFile } from '../ts/index.js'
import { fdCount, sha256File as sha, threadCount } from './helpers.js'

const root = fileURLToPath(new URL('..', import.meta.url))
const py = (name: string): string => join(root, 'bench/qemu', name)
const run = promisify(execFile)
const haveQemu = (() => {
  try {
    return /version 1\d\./.test(execFileSync('qemu-system-x86_64', ['--version']).toString())
  } catch {
    return false
  }
})()
if (!haveQemu) console.log('qemu-peer.spec: qemu-system-x86_64 >= 10 not found; the tests with a real QEMU are skipped')
const live = haveQemu ? test.serial : test.skip
const SIZE_MIB = 64

/** A work directory with the guest RAM image, removed after the test. */
function workdir(t: ExecutionContext): { dir: string; ram: string } {
  const dir = mkdtempSync(join(tmpdir(), 'multifd-qemupeer-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const ram = join(dir, 'ram.img')
  execFileSync('python3', [py('ramgen.py'), String(SIZE_MIB), ram])
  return { dir, ram }
}

/** A QEMU source migrating `ram` to `uri`; resolves with its final JSON line. */
async function qemuSource(ram: string, uri: string, channels: number, compression = 'none', extra: string[] = []): Promise<Record<string, unknown>> {
  const r = await run('python3', [py('qemu_peer.py'), 'source', '--ram', ram, '--uri', uri, '--channels', String(channels), '--compression', compression, ...extra], { timeout: 150_000 }).catch((e: { stdout?: string }) => ({ stdout: e.stdout ?? '' }))
  return JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as Record<string, unknown>
}

/** A QEMU destination listening for a migration; `result` is its final JSON line. */
async function qemuDest(ram: string, channels: number, compression = 'none'): Promise<{ address: string; result: Promise<Record<string, unknown>> }> {
  const child = spawn('python3', [py('qemu_peer.py'), 'dest', '--ram', ram, '--channels', String(channels), '--compression', compression], { stdio: ['ignore', 'pipe', 'inherit'] })
  const lines = createInterface({ input: child.stdout })
  const it = lines[Symbol.asyncIterator]()
  const first = await it.next()
  const port = (JSON.parse(String(first.value)) as { port?: string }).port
  if (!port) throw new Error(`the QEMU destination did not listen: ${String(first.value)}`)
  const result = (async () => {
    let last = '{}'
    for (let l = await it.next(); !l.done; l = await it.next()) last = String(l.value)
    return JSON.parse(last) as Record<string, unknown>
  })()
  return { address: `tcp:127.0.0.1:${port}`, result }
}

/** A second QEMU restores `file` (mapped-ram; multifd with `channels` > 0); true when its RAM equals `ram`. */
async function restoreMatches(file: string, ram: string, channels: number): Promise<boolean> {
  const r = await run('python3', [py('qemu_mig.py'), '--mode', 'restore', '--mapped-ram', '--file', file, '--src-ram', ram, '--size-mib', String(SIZE_MIB), '--channels', String(channels), '--prealloc', 'none', '--timeout', '100'], { timeout: 120_000 }).catch((e: { stdout?: string }) => ({ stdout: e.stdout ?? '' }))
  try {
    const rec = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as { status?: string; sha256Match?: boolean }
    return rec.status === 'completed' && rec.sha256Match === true
  } catch {
    return false // the driver refused before printing a record (e.g. no such file)
  }
}

const leftovers = (dir: string): string[] => readdirSync(dir).filter((n) => n.includes('multifd-partial'))

const matrix: Array<[string, number, ('legacy' | undefined)?]> = [
  ['none', 2],
  ['none', 2, 'legacy'], // zero pages on the main channel, data pages on the multifd channels
  ['zlib', 2],
  ['zstd', 2],
  ['none', 1],
  ['none', 4],
  ['none', 0], // no multifd: QEMU sends every page on the main channel
]

for (const [compression, channels, zeroPages] of matrix) {
  live(`QEMU -> recv --qemu (${compression}, ${channels ? `${channels} channel(s)` : 'no multifd'}${zeroPages ? `, zero-page-detection ${zeroPages}` : ''}) -> a QEMU file that QEMU restores with mapped-ram + multifd${compression === 'none' && channels === 2 && !zeroPages ? ' and mapped-ram alone; raw images too' : ''}`, async (t) => {
    t.timeout(240_000)
    const { dir, ram } = workdir(t)
    const to = join(dir, 'vm.qemu')
    const outDir = join(dir, 'raw')
    const first = compression === 'none' && channels === 2 && !zeroPages
    const rx = QemuReceiver.listen({ address: 'tcp:127.0.0.1:0', to, ...(first ? { outDir } : {}), ...(channels === 4 ? { channels: 4 } : {}) })
    const [src, s] = await Promise.all([qemuSource(ram, rx.address, channels, compression, zeroPages ? ['--zero-page-detection', zeroPages] : []), rx.done])
    t.is(src.status, 'completed')
    t.is(s.compression, compression)
    t.is(s.perChannel.length, channels)
    if (channels > 0) {
      t.true(s.flushes >= 2, 'setup and completion flushes at least')
      t.true(s.perChannel.every((c) => c.syncs === s.flushes), 'one SYNC per channel per flush')
      t.is(s.mainPages, 0)
      t.is(s.mainZeroPages > 0, zeroPages === 'legacy')
    } else {
      t.is(s.flushes, 0)
      t.is(s.mainPages + s.mainZeroPages, (SIZE_MIB << 20) / 4096 + 0x20000 / 4096 * 2 + 0x40000 / 4096 + 2, 'every page once on the main channel')
    }
    const mem = s.blocks.find((b) => b.name === 'mem')
    t.is(mem?.length, SIZE_MIB << 20)
    t.is(mem?.pagesPresent, ((SIZE_MIB << 20) / 4096) * 0.75, 'zero pages are holes, not data')
    const info = inspectQemuFile(to)
    t.true(info.complete)
    t.deepEqual(info.capabilities, ['mapped-ram'])
    t.deepEqual(leftovers(dir), [])
    if (first) t.is(sha(join(outDir, 'mem')), sha(ram), 'the raw image of block mem is the guest RAM')
    t.true(await restoreMatches(to, ram, 4), 'restored with mapped-ram + multifd 4')
    if (first) t.true(await restoreMatches(to, ram, 0), 'restored with mapped-ram alone')
  })
}

live('a QEMU file (ours, and QEMU\'s own mapped-ram save) -> send --qemu (none, zstd, zlib) -> QEMU -incoming: completed, RAM equal', async (t) => {
  t.timeout(240_000)
  const { dir, ram } = workdir(t)
  const ours = join(dir, 'ours.qemu')
  const rx = QemuReceiver.listen({ address: 'tcp:127.0.0.1:0', to: ours })
  const [src] = await Promise.all([qemuSource(ram, rx.address, 2), rx.done])
  t.is(src.status, 'completed')
  const theirs = join(dir, 'theirs.qemu')
  execFileSync('python3', [py('qemu_mig.py'), '--mode', 'save', '--mapped-ram', '--file', theirs, '--src-ram', ram, '--size-mib', String(SIZE_MIB), '--channels', '2', '--prealloc', 'none'], { stdio: 'pipe', timeout: 120_000 })
  // zlib and zstd too, also over RAM that does not compress at all: after an incompressible
  // packet our deflate streams switch to stored blocks and our zstd streams to frames of raw
  // blocks, and QEMU's inflate and page-by-page ZSTD_decompressStream must take them.
  const noise = join(dir, 'noise.img')
  writeFileSync(noise, randomBytes(SIZE_MIB << 20))
  const random = join(dir, 'random.qemu')
  const rx2 = QemuReceiver.listen({ address: 'tcp:127.0.0.1:0', to: random })
  const [src2] = await Promise.all([qemuSource(noise, rx2.address, 2), rx2.done])
  t.is(src2.status, 'completed')
  for (const [file, channels, compression, guest] of [[ours, 3, 'none', ram], [theirs, 2, 'zstd', ram], [ours, 4, 'zlib', ram], [random, 2, 'zlib', noise], [random, 2, 'zstd', noise]] as const) {
    const dst = await qemuDest(guest, channels, compression)
    const tx = QemuSender.start({ file, address: dst.address, channels, compression })
    const s = await tx.done
    t.is(s.perChannel.length, channels)
    t.true(s.perChannel.every((c) => c.syncs === 2))
    t.deepEqual(await dst.result, { status: 'completed', ramMatch: true }, `${file} with ${channels} channels, ${compression}`)
  }
})

/** Runs the CLI; resolves with its exit code and parsed --json output. */
function cli(args: string[], onStderr?: (line: string) => void): Promise<{ code: number | null; json: Record<string, unknown> }> {
  const child = spawn(join(root, 'scripts/multifd'), [...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] })
  let out = ''
  child.stdout.on('data', (d: Buffer) => (out += d.toString()))
  if (onStderr) createInterface({ input: child.stderr }).on('line', onStderr)
  else child.stderr.resume()
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, json: JSON.parse(out.trim() || '{}') as Record<string, unknown> })))
}

live('relay on the command line: QEMU -> multifd recv --qemu -> multifd send --qemu -> QEMU, RAM equal', async (t) => {
  t.timeout(240_000)
  const { dir, ram } = workdir(t)
  const file = join(dir, 'relay.qemu')
  let listening: (a: string) => void
  const address = new Promise<string>((r) => (listening = r))
  const recv = cli(['recv', '--qemu', 'tcp:127.0.0.1:0', '--to', file], (l) => {
    const m = /listening on (tcp:\S+)/.exec(l)
    if (m) listening(m[1]!)
  })
  const [src, got] = await Promise.all([address.then((a) => qemuSource(ram, a, 4, 'zlib')), recv])
  t.is(src.status, 'completed')
  t.is(got.code, 0)
  t.is(got.json.status, 'completed')
  t.is(got.json.compression, 'zlib')
  const dst = await qemuDest(ram, 2)
  const sent = await cli(['send', '--qemu', file, dst.address, '--channels', '2'])
  t.is(sent.code, 0)
  t.is(sent.json.status, 'completed')
  t.deepEqual(await dst.result, { status: 'completed', ramMatch: true })
})

live('a source killed mid-migration leaves no file at --to, nothing beside it, and nothing QEMU restores', async (t) => {
  t.timeout(240_000)
  const { dir, ram } = workdir(t)
  const to = join(dir, 'killed.qemu')
  const rx = QemuReceiver.listen({ address: 'tcp:127.0.0.1:0', to, peerTimeoutMs: 20_000 })
  // 16 MiB/s: the 64 MiB guest takes ~4 s; QEMU is SIGKILLed after 8 MiB went out.
  const [src, err] = await Promise.all([qemuSource(ram, rx.address, 2, 'none', ['--max-bandwidth', String(16 << 20), '--kill-after-bytes', String(8 << 20)]), rx.done.then(() => undefined, (e: unknown) => e)])
  t.is(src.status, 'killed')
  t.true(err instanceof MultifdError)
  t.true(['ERR_MULTIFD_TRUNCATED', 'ERR_MULTIFD_CONNECTION_CLOSED'].includes((err as MultifdError).code), String(err))
  t.false(existsSync(to))
  t.deepEqual(leftovers(dir), [])
  t.false(await restoreMatches(to, ram, 0))
})

// Hostile main streams: no QEMU needed. Each sends a main channel that goes wrong at one point.
function stream(parts: Array<Buffer | number[]>): Buffer {
  return Buffer.concat(parts.map((p) => (Buffer.isBuffer(p) ? p : Buffer.from(p))))
}
const be32 = (n: number): Buffer => {
  const b = Buffer.alloc(4)
  b.writeUInt32BE(n)
  return b
}
const be64 = (n: bigint): Buffer => {
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(n)
  return b
}
const idstr = (s: string): Buffer => Buffer.concat([Buffer.from([s.length]), Buffer.from(s)])
const HEAD = stream([Buffer.from('QEVM'), be32(3), [0x07], be32(14), Buffer.from('pc-i440fx-10.0')])
const RAM_START = stream([[0x01], be32(2), idstr('ram'), be32(0), be32(4), be64(BigInt(1 << 20) | 4n), idstr('mem'), be64(BigInt(1 << 20))])
const EOS_FOOTER = stream([be64(0x10n), [0x7e], be32(2)])

const hostile: Array<[string, Buffer, string]> = [
  ['an iterable section other than RAM', stream([HEAD, [0x01], be32(1), idstr('block'), be32(0), be32(1)]), 'ERR_MULTIFD_QEMU_STREAM'],
  ['a capability the stream cannot carry (x-ignore-shared)', stream([HEAD, [0x05], idstr('configuration/capabilities'), be32(1), be32(1), idstr('x-ignore-shared'), [0x01]]), 'ERR_MULTIFD_QEMU_STREAM'],
  ['an unknown command', stream([HEAD, RAM_START, EOS_FOOTER, [0x08, 0x00, 0x02, 0x00, 0x00]]), 'ERR_MULTIFD_QEMU_STREAM'],
  ['an XBZRLE page', stream([HEAD, RAM_START, be64(0x40n | 0x1000n)]), 'ERR_MULTIFD_QEMU_STREAM'],
  ['a page past its block', stream([HEAD, RAM_START, be64(BigInt(1 << 20) | 0x02n), idstr('mem'), [0]]), 'ERR_MULTIFD_OFFSET_RANGE'],
  ['a block list longer than the RAM size', stream([HEAD, [0x01], be32(2), idstr('ram'), be32(0), be32(4), be64(4096n | 4n), idstr('mem'), be64(8192n)]), 'ERR_MULTIFD_QEMU_STREAM'],
  ['a stream cut inside the RAM section', stream([HEAD, RAM_START, be64(0x02n)]), 'ERR_MULTIFD_TRUNCATED'],
  ['a stream cut inside the device state', stream([HEAD, RAM_START, EOS_FOOTER, [0x03], be32(2), EOS_FOOTER, [0x04], be32(3), idstr('timer'), be32(0), be32(2), be64(0n)]), 'ERR_MULTIFD_TRUNCATED'],
  ['another connection on the port', Buffer.from('GET / HTTP/1.1\r\n\r\n'), 'ERR_MULTIFD_UNKNOWN_CHANNEL'],
]

for (const [what, bytes, code] of hostile) {
  test.serial(`a main stream with ${what} fails with ${code}, leaves no file, no thread and no descriptor`, async (t) => {
    const dir = mkdtempSync(join(tmpdir(), 'multifd-qemupeer-'))
    t.teardown(() => rmSync(dir, { recursive: true, force: true }))
    const to = join(dir, 'out.qemu')
    const [fds, threads] = [fdCount(), threadCount()]
    const rx = QemuReceiver.listen({ address: 'tcp:127.0.0.1:0', to, peerTimeoutMs: 5_000 })
    const port = Number(rx.address.split(':').pop())
    const sock = net.connect(port, '127.0.0.1', () => sock.end(bytes))
    sock.on('error', () => {})
    const closed = new Promise((r) => sock.once('close', r))
    const err = await rx.done.then(() => undefined, (e: unknown) => e)
    sock.destroy()
    await closed
    t.is(threadCount(), threads, 'the receive thread and any channel thread are joined')
    t.is(fdCount(), fds, 'listener, connections and the partial file are closed')
    t.true(err instanceof MultifdError, String(err))
    t.is((err as MultifdError).code as string, code, (err as Error).message)
    t.false(existsSync(to))
    t.deepEqual(leftovers(dir), [])
  })
}

test.serial('recv --qemu and send --qemu refuse bad options before listening or connecting (exit 2 on the command line)', async (t) => {
  t.throws(() => QemuReceiver.listen({ address: 'tcp:127.0.0.1:0' }), { instanceOf: MultifdError, message: /give `to`/ })
  t.throws(() => QemuSender.start({ file: '/nonexistent', address: 'nope', channels: 2 }), { instanceOf: MultifdError })
  t.is((await cli(['recv', '--qemu', 'tcp:127.0.0.1:0'])).code, 2)
  t.is((await cli(['send', '--qemu', '/nonexistent'])).code, 2)
})

test.serial('a receive still waiting for QEMU is cancelled cleanly', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'multifd-qemupeer-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const [fds, threads] = [fdCount(), threadCount()]
  const rx = QemuReceiver.listen({ address: 'tcp:127.0.0.1:0', to: join(dir, 'x.qemu') })
  rx.cancel()
  const err = await rx.done.then(() => undefined, (e: unknown) => e)
  t.is((err as MultifdError).code, 'ERR_MULTIFD_CANCELLED')
  t.is(threadCount(), threads)
  t.is(fdCount(), fds)
  t.deepEqual(readdirSync(dir), [])
})

test('send --qemu of a file that is not a QEMU file fails with its code', async (t) => {
  const err = await QemuSender.start({ file: fileURLToPath(new URL('./fixtures/qemu-captures/README.md', import.meta.url)), address: 'tcp:127.0.0.1:9', channels: 1 }).done.then(() => undefined, (e: unknown) => e)
  t.is((err as MultifdError).code, 'ERR_MULTIFD_BAD_MAGIC')
})
