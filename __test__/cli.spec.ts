/** The `multifd` command as a user runs it: real processes, exit codes, the --json contract. */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { randomFillSync } from 'node:crypto'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { FIXTURES, cli, lastJson, receiver, sha, workdir } from './cli-helpers.js'
import { testPki } from './helpers.js'

test('send and recv move image files byte for byte; --json prints one object with the contract fields', async (t) => {
  t.timeout(90_000)
  const d = workdir(t)
  writeFileSync(join(d, 'a.img'), randomFillSync(Buffer.alloc(6 << 20)))
  writeFileSync(join(d, 'b.img'), Buffer.alloc(2 << 20))
  const rx = await receiver(['--out', join(d, 'a.out'), '--block', `b.img=${join(d, 'b.out')}`, '--json'])
  const tx = await cli(['send', rx.address, join(d, 'a.img'), join(d, 'b.img'), '--channels', '3', '--compression', 'zstd', '--json']).done
  const rr = await rx.done
  t.is(tx.code, 0, tx.stderr)
  t.is(rr.code, 0, rr.stderr)
  for (const out of [tx.stdout, rr.stdout]) {
    t.is(out.trim().split('\n').length, 1, 'exactly one line of JSON')
    const j = lastJson(out)
    t.like(j, { status: 'completed', channels: 3, pages: { normal: 1536, zero: 512 } })
    for (const k of ['bytes', 'seconds', 'bytesPerSecond']) t.true(typeof j[k] === 'number' && (j[k] as number) > 0, k)
  }
  t.is(sha(join(d, 'a.out')), sha(join(d, 'a.img')))
  t.is(sha(join(d, 'b.out')), sha(join(d, 'b.img')))
})

test('send and recv over mutual TLS (--tls-cert/--tls-key/--tls-ca, --tls-name, --tls-allow); an unlisted source is refused and recv waits on for its source', async (t) => {
  t.timeout(90_000)
  const d = workdir(t)
  const pki = testPki()
  writeFileSync(join(d, 'a.img'), randomFillSync(Buffer.alloc(3 << 20)))
  const destTls = ['--tls-cert', pki.file('dest.pem'), '--tls-key', pki.file('dest.key'), '--tls-ca', pki.file('ca.pem'), '--tls-allow', 'source.test', '--tls-allow', 'CN=somebody else']
  const sourceTls = (who: string): string[] => ['--tls-cert', pki.file(`${who}.pem`), '--tls-key', pki.file(`${who}.key`), '--tls-ca', pki.file('ca.pem'), '--tls-name', 'dest.test']

  const rx = await receiver(['--out', join(d, 'a.out'), '--json', ...destTls])
  const tx = await cli(['send', rx.address, join(d, 'a.img'), '--channels', '2', '--json', ...sourceTls('source')]).done
  const rr = await rx.done
  t.is(tx.code, 0, tx.stderr)
  t.is(rr.code, 0, rr.stderr)
  t.like(lastJson(tx.stdout), { status: 'completed', channels: 2 })
  t.is(sha(join(d, 'a.out')), sha(join(d, 'a.img')))

  const rx2 = await receiver(['--out', join(d, 'b.out'), '--json', ...destTls])
  const tx2 = await cli(['send', rx2.address, join(d, 'a.img'), '--json', ...sourceTls('intruder')]).done
  t.is(tx2.code, 1)
  t.like(lastJson(tx2.stdout), { status: 'failed', error: { code: 'ERR_MULTIFD_TLS_NOT_ALLOWED' } })
  // The intruder is turned away (a warning naming it), not the receiver's session: the listed
  // source then migrates into the same receiver.
  const tx3 = await cli(['send', rx2.address, join(d, 'a.img'), '--json', ...sourceTls('source')]).done
  const rr2 = await rx2.done
  t.is(tx3.code, 0, tx3.stderr)
  t.is(rr2.code, 0, rr2.stderr)
  t.like(lastJson(rr2.stdout), { status: 'completed', rejectedConnections: 1 })
  t.regex(rr2.stderr, /warning: ERR_MULTIFD_TLS_NOT_ALLOWED: rejected a connection from 127\.0\.0\.1:\d+: .*CN=intruder/)
  t.is(sha(join(d, 'b.out')), sha(join(d, 'a.img')))

  const usage = await cli(['send', 'tcp:127.0.0.1:1', join(d, 'a.img'), '--tls-cert', pki.file('source.pem')]).done
  t.is(usage.code, 2)
  t.regex(usage.stderr, /TLS needs all of --tls-cert, --tls-key and --tls-ca/)
})

test('a failed migration: exit 1 and error {code, message} on both sides', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  writeFileSync(join(d, 'a.img'), Buffer.alloc(1 << 20, 1))
  const rx = await receiver(['--block', `other=${join(d, 'x')}`, '--json'])
  const tx = await cli(['send', rx.address, join(d, 'a.img'), '--json']).done
  const rr = await rx.done
  t.is(tx.code, 1)
  t.is(rr.code, 1)
  t.like(lastJson(tx.stdout), { status: 'failed', error: { code: 'ERR_MULTIFD_BLOCK_MISMATCH' } })
  t.like(lastJson(rr.stdout), { status: 'failed', error: { code: 'ERR_MULTIFD_BLOCK_MISMATCH' } })
})

test('send --integrity xxh3 --max-bandwidth --connect-timeout-ms: applied, and reported in --json', async (t) => {
  t.timeout(90_000)
  const d = workdir(t)
  writeFileSync(join(d, 'a.img'), randomFillSync(Buffer.alloc(4 << 20)))
  const rx = await receiver(['--out', join(d, 'a.out'), '--json'])
  // 4 MiB at 2 MiB/s: the throttle must hold the channels back for most of 2 s, far slower than
  // even a loaded machine moves 4 MiB, so the channels always wait.
  const tx = await cli(['send', rx.address, join(d, 'a.img'), '--integrity', 'xxh3', '--max-bandwidth', '2M', '--connect-timeout-ms', '5000', '--json']).done
  const rr = await rx.done
  t.is(tx.code, 0, tx.stderr)
  t.is(rr.code, 0, rr.stderr)
  const j = lastJson(tx.stdout)
  t.like(j, { status: 'completed', integrity: 'xxh3', maxBandwidth: 2 << 20, connectTimeoutMs: 5000 })
  t.true((j.seconds as number) >= 1.5, `2 MiB/s over 4 MiB took ${String(j.seconds)} s`)
  t.true((j.throttledMs as number) > 0, `throttledMs ${String(j.throttledMs)}`)
  t.is(sha(join(d, 'a.out')), sha(join(d, 'a.img')))
})

test('usage errors exit 2 with a readable message', async (t) => {
  for (const args of [[], ['send'], ['send', 'tcp:127.0.0.1:1', 'x', '--channels', '0'], ['bench', '--size', 'huge'], ['frobnicate'], ['recv', 'tcp:127.0.0.1:0'], ['send', 'tcp:127.0.0.1:1', 'x', '--bogus']]) {
    const r = await cli(args).done
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
  }
  const r = await cli(['send', 'tcp:127.0.0.1:1', 'x', '--channels', '0']).done
  t.regex(r.stderr, /"0" must be an integer from 1 to 255[\s\S]*at channels/)
  // Combinations the validation refuses are usage errors too, before anything connects.
  const d = workdir(t)
  writeFileSync(join(d, 'a.img'), Buffer.alloc(1 << 20, 1))
  for (const [flags, message] of [
    [['--zero-copy', '--compression', 'zstd'], /zero-copy send cannot be combined with compression/],
    [['--compression', 'none', '--level', '3'], /a compression level \(3\) needs a compression method other than none/],
    [['--max-bandwidth', 'fast'], /rate "fast" is not like 500M/],
    [['--integrity', 'md5'], /integrity/],
  ] as const) {
    const u = await cli(['send', 'tcp:127.0.0.1:1', join(d, 'a.img'), ...flags]).done
    t.is(u.code, 2, `${flags.join(' ')}: ${u.stderr}`)
    t.regex(u.stderr, message)
  }
  const zc = await cli(['send', 'unix:/tmp/nowhere.sock', join(d, 'a.img'), '--zero-copy']).done
  t.is(zc.code, 2, zc.stderr)
  t.is((await cli(['help', 'send']).done).code, 0)
})

test('snapshot, restore and inspect through the CLI', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  writeFileSync(join(d, 'a.img'), randomFillSync(Buffer.alloc(3 << 20)))
  writeFileSync(join(d, 'z.img'), Buffer.alloc(1 << 20))
  const s = await cli(['snapshot', join(d, 'a.img'), join(d, 'z.img'), '--to', join(d, 's.snap'), '--json']).done
  t.is(s.code, 0, s.stderr)
  t.like(lastJson(s.stdout), { status: 'completed', pages: { normal: 768, zero: 256 } })
  const r = await cli(['restore', join(d, 's.snap'), '--out', join(d, 'out'), '--json']).done
  t.is(r.code, 0, r.stderr)
  t.is(sha(join(d, 'out', 'a.img')), sha(join(d, 'a.img')))
  t.is(sha(join(d, 'out', 'z.img')), sha(join(d, 'z.img')))
  const i = await cli(['inspect', join(d, 's.snap'), '--json']).done
  const lines = i.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>)
  t.like(lines[0], { type: 'snapshot', complete: true })
  t.deepEqual(lines.slice(1).map((l) => [l.type, l.name, l.pagesPresent]), [['block', 'a.img', 768], ['block', 'z.img', 0]])
})

/** A tmpfs of `size` mounted in `dir` (the suite runs as root), unmounted at teardown. */
function tmpfs(t: import('ava').ExecutionContext, dir: string, size: string): string {
  const mnt = join(dir, `tmpfs-${size}`)
  mkdirSync(mnt)
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt])
  t.teardown(() => execFileSync('umount', ['-l', mnt]))
  return mnt
}

test('a full disk is ERR_MULTIFD_NO_SPACE naming the output, with a summary and exit 1, never a SIGBUS: recv (plain, zstd) and restore', async (t) => {
  t.timeout(120_000)
  const d = workdir(t)
  const full = tmpfs(t, d, '2m')
  const img = join(d, 'a.img')
  const data = randomFillSync(Buffer.alloc(8 << 20))
  data.fill(0, 0, 1 << 20) // some zero pages too
  writeFileSync(img, data)
  for (const compression of ['none', 'zstd']) {
    const out = join(full, `a-${compression}.out`)
    const rx = await receiver(['--out', out, '--json'])
    const tx = await cli(['send', rx.address, img, '--compression', compression, '--json']).done
    const rr = await rx.done
    t.is(rr.signal, null, `recv (${compression}) was killed by ${rr.signal}`)
    t.is(rr.code, 1, rr.stderr)
    t.like(lastJson(rr.stdout), { status: 'failed', error: { code: 'ERR_MULTIFD_NO_SPACE' } }, rr.stdout)
    t.regex(JSON.stringify(lastJson(rr.stdout).error), new RegExp(`${full}/\\.?a-${compression}\\.out`), 'the message names the output file (or its partial name beside it)')
    t.is(tx.code, 1, tx.stderr)
  }
  const s = await cli(['snapshot', img, '--to', join(d, 's.snap'), '--json']).done
  t.is(s.code, 0, s.stderr)
  const r = await cli(['restore', join(d, 's.snap'), '--out', join(full, 'restored'), '--json']).done
  t.is(r.signal, null, `restore was killed by ${r.signal}`)
  t.is(r.code, 1, r.stderr)
  t.like(lastJson(r.stdout), { status: 'failed', error: { code: 'ERR_MULTIFD_NO_SPACE' } }, r.stdout)
  t.regex(JSON.stringify(lastJson(r.stdout).error), new RegExp(`${full}/restored/.*a\\.img`))
})

test('holes stay holes: zero pages received or restored take no disk space', async (t) => {
  t.timeout(120_000)
  const d = workdir(t)
  const small = tmpfs(t, d, '16m')
  const img = join(d, 'z.img')
  writeFileSync(img, Buffer.alloc(0))
  execFileSync('truncate', ['-s', '256M', img])
  const rx = await receiver(['--out', join(small, 'z.out'), '--json'])
  const tx = await cli(['send', rx.address, img, '--json']).done
  const rr = await rx.done
  t.is(tx.code, 0, tx.stderr)
  t.is(rr.code, 0, rr.stderr)
  t.is(statSync(join(small, 'z.out')).size, 256 << 20)
  t.true(statSync(join(small, 'z.out')).blocks * 512 <= 64 << 10, `received: ${statSync(join(small, 'z.out')).blocks * 512} bytes on disk`)
  const s = await cli(['snapshot', img, '--to', join(d, 'z.snap'), '--json']).done
  t.is(s.code, 0, s.stderr)
  const r = await cli(['restore', join(d, 'z.snap'), '--out', join(small, 'restored'), '--json']).done
  t.is(r.code, 0, r.stderr)
  const restored = statSync(join(small, 'restored', 'z.img'))
  t.is(restored.size, 256 << 20)
  t.true(restored.blocks * 512 <= 64 << 10, `restored: ${restored.blocks * 512} bytes on disk`)
})

test('inspect decodes QEMU channel captures; --rebuild writes the guest RAM; bad input is exit 1', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  const ch = join(FIXTURES, 'zlib', 'channel-0.bin')
  const i = await cli(['inspect', ch, '--json']).done
  t.is(i.code, 0, i.stderr)
  const lines = i.stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>)
  t.like(lines[0], { type: 'init', uuid: '0'.repeat(32) })
  const packets = lines.filter((l) => l.type === 'packet')
  t.true(packets.length > 3)
  t.true(packets.every((p) => typeof p.packetNum === 'number' && Array.isArray(p.normal) && Array.isArray(p.zero) && typeof p.payloadBytes === 'number'))
  const manifest = JSON.parse(readFileSync(join(FIXTURES, 'zlib', 'manifest.json'), 'utf8')) as { ramSha256: string }
  const rb = await cli(['inspect', join(FIXTURES, 'zlib', 'channel-0.bin'), join(FIXTURES, 'zlib', 'channel-1.bin'), '--rebuild', join(d, 'rb')]).done
  t.is(rb.code, 0, rb.stderr)
  t.is(sha(join(d, 'rb', 'mem')), manifest.ramSha256)
  // A capture cut short: the first error is reported, exit 1.
  writeFileSync(join(d, 'cut.bin'), readFileSync(ch).subarray(0, 5000))
  const bad = await cli(['inspect', join(d, 'cut.bin'), '--json']).done
  t.is(bad.code, 1)
  t.like(lastJson(bad.stdout), { type: 'error', code: 'ERR_MULTIFD_TRUNCATED' })
})

test('Ctrl-C cancels a running recv cleanly: exit 130, status cancelled', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  const rx = await receiver(['--out', join(d, 'x'), '--json'])
  rx.kill('SIGINT')
  const r = await rx.done
  t.is(r.code, 130, r.stderr)
  t.regex(r.stderr, /interrupted/)
})
