/**
 * Outputs never destroy an input and only ever hold a complete result; names from input never
 * follow links; signals cancel cleanly (docs/OUTPUTS.md). Real `multifd` processes.
 */
import test from 'ava'
import { randomFillSync } from 'node:crypto'
import { watch, closeSync, existsSync, lstatSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, statSync, symlinkSync, writeFileSync, writeSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import { join } from 'node:path'
import { RamBlock, Source, encodeInitPacket, encodePacketHeader } from '../ts/index.js'
import { cli, lastJson, receiver, sha, workdir } from './cli-helpers.js'
import { rawControl, testPki, until, whenTrue } from './helpers.js'

/** Files in `dir` left under a partial name. */
const partials = (dir: string): string[] => readdirSync(dir).filter((f) => f.includes('.multifd-partial-'))

/** A minimal QEMU mapped-ram migration file with one block `mem` of `pages` pages of data. */
function qemuFile(path: string, pages: number): Buffer {
  const data = randomFillSync(Buffer.alloc(pages * 4096))
  const idstr = (s: string): Buffer => Buffer.concat([Buffer.from([s.length]), Buffer.from(s)])
  const be32 = (n: number): Buffer => Buffer.from([n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255])
  const be64 = (n: number): Buffer => {
    const b = Buffer.alloc(8)
    b.writeBigUInt64BE(BigInt(n))
    return b
  }
  const machine = 'pc-i440fx-10.0'
  const head = Buffer.concat([
    be32(0x5145564d), be32(3),
    Buffer.from([0x07]), be32(machine.length), Buffer.from(machine),
    Buffer.from([0x05]), idstr('configuration/capabilities'), be32(1), be32(1), idstr('mapped-ram'),
    Buffer.from([0x01]), be32(0), idstr('ram'), be32(0), be32(4), be64(data.length | 4),
    idstr('mem'), be64(data.length),
  ])
  const headerAt = head.length
  const bitmapAt = headerAt + 28
  const pagesAt = 1 << 20
  const file = Buffer.alloc(pagesAt + data.length)
  head.copy(file, 0)
  Buffer.concat([be32(1), be64(4096), be64(bitmapAt), be64(pagesAt)]).copy(file, headerAt)
  for (let p = 0; p < pages; p++) file[bitmapAt + (p >> 3)]! |= 1 << (p & 7)
  data.copy(file, pagesAt)
  writeFileSync(path, file)
  return data
}

test('an output that is an input is refused before anything is written: exit 2, the input unchanged', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  const img = join(d, 'a.img')
  writeFileSync(img, randomFillSync(Buffer.alloc(1 << 20)))
  symlinkSync(img, join(d, 'link.img'))
  const before = sha(img)
  const q = join(d, 'vm.qemu')
  const data = qemuFile(q, 16)
  const qBefore = sha(q)
  const pki = testPki()
  const tls = ['--tls-cert', pki.file('dest.pem'), '--tls-key', pki.file('dest.key'), '--tls-ca', pki.file('ca.pem')]
  const certBefore = sha(pki.file('dest.pem'))
  const cases: string[][] = [
    ['snapshot', img, '--to', img],
    ['snapshot', img, '--to', join(d, 'link.img')],
    ['extract', q, '--block', 'mem', '--out', q],
    ['recv', 'tcp:127.0.0.1:0', '--out', pki.file('dest.pem'), ...tls],
    ['recv', 'tcp:127.0.0.1:0', '--out', join(d, 'x'), '--block', `b=${join(d, 'x')}`],
  ]
  for (const args of cases) {
    const r = await cli(args, { timeoutMs: 20_000 }).done
    t.is(r.code, 2, `${args.join(' ')}: ${r.stderr}`)
    t.regex(r.stderr, /is the input|given twice/, args.join(' '))
  }
  t.is(sha(img), before)
  t.is(sha(q), qBefore)
  t.is(sha(pki.file('dest.pem')), certBefore)
  // Where the output is another file, extract writes it (through a partial name).
  const ok = await cli(['extract', q, '--block', 'mem', '--out', join(d, 'mem.raw')]).done
  t.is(ok.code, 0, ok.stderr)
  t.true(readFileSync(join(d, 'mem.raw')).equals(data))
  // A snapshot whose block would be restored over the snapshot itself.
  const snap = join(d, 's.snap')
  t.is((await cli(['snapshot', '--block', `s.snap=${img}`, '--to', snap]).done).code, 0)
  const snapBefore = sha(snap)
  const r = await cli(['restore', snap, '--out', d]).done
  t.is(r.code, 2, r.stderr)
  t.regex(r.stderr, /is the input/)
  t.is(sha(snap), snapBefore)
  t.deepEqual(partials(d), [])
  // An output named through a link (to another file) replaces the link's target; the link stays.
  writeFileSync(join(d, 'target.snap'), 'old')
  symlinkSync(join(d, 'target.snap'), join(d, 'via.snap'))
  t.is((await cli(['snapshot', img, '--to', join(d, 'via.snap')]).done).code, 0)
  t.true(lstatSync(join(d, 'via.snap')).isSymbolicLink())
  t.is(sha(join(d, 'target.snap')), sha(join(d, 'via.snap')))
  t.not(readFileSync(join(d, 'target.snap'), 'latin1').slice(0, 7), 'old')
})

test('a snapshot that fails (disk full) leaves the existing SNAPSHOT byte-identical and no partial file', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  const mnt = join(d, 'small')
  mkdirSync(mnt)
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', mnt])
  t.teardown(() => execFileSync('umount', ['-l', mnt]))
  writeFileSync(join(d, 'small.img'), randomFillSync(Buffer.alloc(64 << 10)))
  const snap = join(mnt, 'vm.snap')
  t.is((await cli(['snapshot', join(d, 'small.img'), '--to', snap]).done).code, 0)
  const before = sha(snap)
  writeFileSync(join(d, 'big.img'), randomFillSync(Buffer.alloc(16 << 20)))
  const r = await cli(['snapshot', join(d, 'big.img'), '--to', snap, '--json']).done
  t.is(r.code, 1, r.stderr)
  t.like(lastJson(r.stdout), { status: 'failed', complete: false, error: { code: 'ERR_MULTIFD_NO_SPACE' } })
  t.is(sha(snap), before)
  t.deepEqual(partials(mnt), [])
})

test('restore never follows a link planted in DIR: an error naming it, its target unchanged, nothing left behind', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  writeFileSync(join(d, 'a.img'), randomFillSync(Buffer.alloc(1 << 20)))
  writeFileSync(join(d, 'b.img'), randomFillSync(Buffer.alloc(1 << 20)))
  t.is((await cli(['snapshot', join(d, 'a.img'), join(d, 'b.img'), '--to', join(d, 's.snap')]).done).code, 0)
  const victim = join(d, 'victim')
  writeFileSync(victim, 'do not overwrite')
  const plants: Array<(at: string) => void> = [(at) => symlinkSync(victim, at), (at) => writeFileSync(at, 'an existing file')]
  for (const [k, plant] of plants.entries()) {
    const out = join(d, `out${k}`)
    mkdirSync(out)
    plant(join(out, 'b.img'))
    const r = await cli(['restore', join(d, 's.snap'), '--out', out, '--json']).done
    t.is(r.code, 1, r.stderr)
    t.like(lastJson(r.stdout), { status: 'failed', error: { code: 'ERR_MULTIFD_OUTPUT_EXISTS' } })
    t.true(JSON.stringify(lastJson(r.stdout).error).includes(join(out, 'b.img')), 'the error names the path')
    t.false(existsSync(join(out, 'a.img')), 'no block is restored when one cannot be')
    t.deepEqual(partials(out), [])
  }
  t.is(readFileSync(victim, 'utf8'), 'do not overwrite')
})

test('a snapshot naming one block twice is refused with ERR_MULTIFD_DUPLICATE_BLOCK (inspect and restore)', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  writeFileSync(join(d, 'aa'), Buffer.alloc(64 << 10, 1))
  writeFileSync(join(d, 'bb'), Buffer.alloc(64 << 10, 2))
  const snap = join(d, 's.snap')
  t.is((await cli(['snapshot', join(d, 'aa'), join(d, 'bb'), '--to', snap]).done).code, 0)
  // The second block table entry's name: after the 40-byte fixed header and the first entry.
  const fd = openSync(snap, 'r+')
  writeSync(fd, Buffer.from('aa'), 0, 2, 40 + 1 + 2 + 16 + 1)
  closeSync(fd)
  const i = await cli(['inspect', snap, '--json']).done
  t.is(i.code, 1)
  t.like(lastJson(i.stdout), { type: 'error', code: 'ERR_MULTIFD_DUPLICATE_BLOCK' })
  const r = await cli(['restore', snap, '--out', join(d, 'out'), '--json']).done
  t.is(r.code, 1)
  t.like(lastJson(r.stdout), { status: 'failed', error: { code: 'ERR_MULTIFD_DUPLICATE_BLOCK' } })
})

test('recv: an announcement refused after the table is read leaves an existing --out byte-identical and no partial file', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  const out = join(d, 'a.out')
  writeFileSync(out, randomFillSync(Buffer.alloc(12345)))
  const before = sha(out)
  writeFileSync(join(d, 'a.img'), randomFillSync(Buffer.alloc(2 << 20)))
  writeFileSync(join(d, 'b.img'), randomFillSync(Buffer.alloc(1 << 20)))
  // Two blocks announced, one output: refused.
  const rx = await receiver(['--out', out, '--json'])
  const tx = await cli(['send', rx.address, join(d, 'a.img'), join(d, 'b.img'), '--json']).done
  const rr = await rx.done
  t.is(rr.code, 1, rr.stderr)
  t.is(tx.code, 1, tx.stderr)
  t.like(lastJson(rr.stdout), { status: 'failed', complete: false, error: { code: 'ERR_MULTIFD_BLOCK_MISMATCH' } })
  t.is(statSync(out).size, 12345)
  t.is(sha(out), before)
  t.deepEqual(partials(d), [])
})

for (const [signal, code] of [['SIGTERM', 143], ['SIGHUP', 129]] as const) {
  test(`${signal} cancels a recv mid-migration: summary printed, exit ${code}, no partial file, the existing --out untouched`, async (t) => {
    t.timeout(60_000)
    const d = workdir(t)
    const out = join(d, 'x.out')
    writeFileSync(out, 'the previous image')
    const rx = await receiver(['--out', out, '--json'])
    t.teardown(() => rx.kill('SIGKILL'))
    // A source that announces its block and then sends nothing.
    const block = RamBlock.allocate({ name: 'x', size: 4 << 20 })
    const source = await until(Source.connect({ address: rx.address, blocks: [block], channels: 2 }), 20_000, 'source connected')
    t.teardown(() => source.cancel().catch(() => undefined))
    await whenTrue(() => partials(d).length === 1, 10_000, 'the partial output exists')
    rx.kill(signal)
    const r = await rx.done
    t.is(r.code, code, r.stderr)
    t.like(lastJson(r.stdout), { status: 'cancelled', complete: false })
    t.deepEqual(partials(d), [])
    t.is(readFileSync(out, 'utf8'), 'the previous image')
  })
}

test('SIGHUP and SIGTERM on an idle recv exit 129 and 143 with a summary', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  for (const [signal, code] of [['SIGHUP', 129], ['SIGTERM', 143]] as const) {
    const rx = await receiver(['--out', join(d, 'x'), '--json'])
    rx.kill(signal)
    const r = await rx.done
    t.is(r.code, code, r.stderr)
    t.like(lastJson(r.stdout), { status: 'cancelled' })
    t.false(existsSync(join(d, 'x')))
  }
})

test('a block past 4 GiB (sparse) snapshots and restores exactly', async (t) => {
  t.timeout(120_000)
  const d = workdir(t)
  const img = join(d, 'big.img')
  const size = 2 ** 32 + (2 << 20)
  const marks = [0, 2 ** 31 - 4096, 2 ** 32, 2 ** 32 + 4096 * 300, size - 4096]
  const fd = openSync(img, 'w')
  for (const at of marks) writeSync(fd, randomFillSync(Buffer.alloc(4096)), 0, 4096, at)
  closeSync(fd)
  const snap = join(d, 's.snap')
  const s = await cli(['snapshot', img, '--to', snap, '--json']).done
  t.is(s.code, 0, s.stderr)
  t.like(lastJson(s.stdout), { status: 'completed', pages: { normal: marks.length } })
  const r = await cli(['restore', snap, '--out', join(d, 'out'), '--json']).done
  t.is(r.code, 0, r.stderr)
  const restored = join(d, 'out', 'big.img')
  t.is(statSync(restored).size, size)
  const page = (f: string, at: number): Buffer => {
    const b = Buffer.alloc(4096)
    const h = openSync(f, 'r')
    readSync(h, b, 0, 4096, at)
    closeSync(h)
    return b
  }
  for (const at of [...marks, 2 ** 32 - 4096, 3 * 2 ** 30]) t.true(page(restored, at).equals(page(img, at)), `page at ${at}`)
})

/** A channel capture: init packet, then one packet per `[block, offset, data]` page (data pages are 4 KiB). */
function capture(path: string, pages: Array<[string, bigint, Buffer | undefined]>, channelId = 0): void {
  const parts = [encodeInitPacket({ uuid: Buffer.alloc(16, 7), channelId })]
  pages.forEach(([block, offset, data], i) => {
    parts.push(encodePacketHeader({ block, packetNum: BigInt(i), ...(data ? { normalOffsets: [offset] } : { zeroOffsets: [offset] }) }))
    if (data) parts.push(data)
  })
  writeFileSync(path, Buffer.concat(parts))
}

const pageAt = (f: string, at: number): Buffer => {
  const b = Buffer.alloc(4096)
  const h = openSync(f, 'r')
  readSync(h, b, 0, 4096, at)
  closeSync(h)
  return b
}

test('inspect --rebuild: a block past 4 GiB rebuilds exactly into a sparse file', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  const [a, b, c] = [0, 1, 2].map(() => randomFillSync(Buffer.alloc(4096)))
  const far = 2 ** 32 + 5 * 4096
  capture(join(d, 'c0.bin'), [['mem', 0n, a!], ['mem', BigInt(far), b!], ['mem', 8192n, c!], ['mem', 8192n, undefined]])
  const r = await cli(['inspect', join(d, 'c0.bin'), '--rebuild', join(d, 'rb'), '--json']).done
  t.is(r.code, 0, r.stdout + r.stderr)
  const out = join(d, 'rb', 'mem')
  t.is(statSync(out).size, far + 4096)
  t.true(statSync(out).blocks * 512 < 1 << 20, 'sparse: about the pages it holds')
  t.true(pageAt(out, 0).equals(a!))
  t.true(pageAt(out, far).equals(b!))
  t.true(pageAt(out, 8192).equals(Buffer.alloc(4096)), 'a zero page after data is zeros')
  t.true(pageAt(out, 2 ** 31).equals(Buffer.alloc(4096)))
  t.like(lastJson(r.stdout), { type: 'block', name: 'mem', length: far + 4096 })
})

test('inspect --rebuild: a few KiB claiming more than --max-size is refused quickly, nothing written; names never follow links', async (t) => {
  t.timeout(60_000)
  const d = workdir(t)
  // Five blocks of 15 GiB each claimed by five pages.
  const blocks = ['a', 'b', 'c', 'd', 'e'].map((n): [string, bigint, Buffer] => [n, BigInt(15 * 2 ** 30), Buffer.alloc(4096, 1)])
  capture(join(d, 'c0.bin'), blocks)
  t.true(statSync(join(d, 'c0.bin')).size < 32 << 10)
  const started = Date.now()
  const r = await cli(['inspect', join(d, 'c0.bin'), '--rebuild', join(d, 'rb'), '--json']).done
  t.is(r.code, 1, r.stderr)
  t.like(lastJson(r.stdout), { type: 'error', code: 'ERR_MULTIFD_OFFSET_RANGE' })
  t.true(Date.now() - started < 20_000)
  t.false(existsSync(join(d, 'rb')), 'nothing created')
  // Within a raised bound the blocks are sparse files.
  const ok = await cli(['inspect', join(d, 'c0.bin'), '--rebuild', join(d, 'rb'), '--max-size', '80G']).done
  t.is(ok.code, 0, ok.stdout + ok.stderr)
  for (const n of ['a', 'b', 'c', 'd', 'e']) t.true(statSync(join(d, 'rb', n)).blocks * 512 < 1 << 20)
  // A link planted where a block goes: refused, its target untouched, nothing written.
  const victim = join(d, 'victim')
  writeFileSync(victim, 'keep')
  mkdirSync(join(d, 'rb2'))
  symlinkSync(victim, join(d, 'rb2', 'c'))
  const bad = await cli(['inspect', join(d, 'c0.bin'), '--rebuild', join(d, 'rb2'), '--max-size', '80G', '--json']).done
  t.is(bad.code, 1)
  t.like(lastJson(bad.stdout), { type: 'error', code: 'ERR_MULTIFD_OUTPUT_EXISTS' })
  t.regex(lastJson(bad.stdout).message as string, /rb2\/c already exists as a symbolic link/)
  t.is(readFileSync(victim, 'utf8'), 'keep')
  t.deepEqual(readdirSync(join(d, 'rb2')), ['c'])
})

test('recv --out a block device writes in place (no partial name), says complete, and holds the bytes; a character device is refused', async (t) => {
  t.timeout(90_000)
  const d = workdir(t)
  const backing = join(d, 'disk.img')
  writeFileSync(backing, Buffer.alloc(8 << 20, 0xee))
  let device: string
  try {
    device = execFileSync('losetup', ['-f', '--show', backing], { encoding: 'utf8' }).trim()
  } catch (e) {
    // A machine without loop devices cannot run this; say so rather than pass silently.
    t.log(`skipped: no loop device (${(e as Error).message.split('\n')[0]})`)
    t.pass()
    return
  }
  t.teardown(() => void execFileSync('losetup', ['-d', device]))
  const img = join(d, 'a.img')
  const data = randomFillSync(Buffer.alloc(6 << 20))
  data.fill(0, 0, 1 << 20) // zero pages must be written too: a device is not known to be zero
  writeFileSync(img, data)
  const rx = await receiver(['--out', device, '--json'])
  const tx = await cli(['send', rx.address, img, '--json']).done
  const rr = await rx.done
  t.is(tx.code, 0, tx.stderr)
  t.is(rr.code, 0, rr.stderr)
  t.like(lastJson(rr.stdout), { status: 'completed', complete: true })
  const fd = openSync(device, 'r')
  const back = Buffer.alloc(data.length)
  readSync(fd, back, 0, back.length, 0)
  closeSync(fd)
  t.true(back.equals(data), 'the device holds the sent bytes, zero pages included')

  const chr = await receiver(['--out', '/dev/null', '--json'])
  const tx2 = await cli(['send', chr.address, img, '--json']).done
  const rr2 = await chr.done
  t.is(rr2.code, 1, rr2.stderr)
  t.like(lastJson(rr2.stdout), { status: 'failed', error: { code: 'ERR_MULTIFD_INVALID_ARGUMENT' } })
  t.regex(JSON.stringify(lastJson(rr2.stdout).error), /\/dev\/null is neither a regular file nor a block device/)
  t.is(tx2.code, 1)
})

test('recv: a hello refused for what it announces (a name twice, an unaligned block, a bad page size) creates no output at all', async (t) => {
  t.timeout(90_000)
  const session = 'ab'.repeat(16)
  const hello = (over: Record<string, unknown>): Record<string, unknown> => ({ type: 'hello', protocol: 1, session, channels: 1, pageSize: 4096, compression: 'none', blocks: [{ name: 'a', length: 8192 }], ...over })
  for (const [over, code] of [
    [{ blocks: [{ name: 'a', length: 8192 }, { name: 'a', length: 8192 }] }, 'ERR_MULTIFD_DUPLICATE_BLOCK'],
    [{ blocks: [{ name: 'a', length: 5000 }] }, 'ERR_MULTIFD_PROTOCOL'],
    [{ pageSize: 3000, blocks: [{ name: 'a', length: 6000 }] }, 'ERR_MULTIFD_PROTOCOL'],
  ] as const) {
    const d = workdir(t)
    // Any file made in d, even one removed again at once, shows up here.
    const made: string[] = []
    const watcher = watch(d, (_, name) => made.push(String(name)))
    const rx = await receiver(['--block', `a=${join(d, 'a.out')}`, '--json'])
    const c = await rawControl(rx.address)
    c.send(hello(over))
    const r = await rx.done
    c.socket.destroy()
    watcher.close()
    t.deepEqual(made, [], `${code}: no file was made, not even for a moment`)
    t.is(r.code, 1, r.stderr)
    t.like(lastJson(r.stdout), { status: 'failed', error: { code } })
    t.deepEqual(readdirSync(d), [], `${code}: nothing was created`)
  }
})
