/**
 * Resumable transfers (issue 16, part 2; docs/PROTOCOL.md "Resume", docs/OUTPUTS.md "Resume"):
 * `recv --resume` journals what is durable, `send --resume` sends only the pieces whose digests
 * differ, a sender or receiver killed with SIGKILL costs at most what was not yet journalled,
 * and nothing is ever trusted without its digest. Real `multifd` processes; the large files
 * live on tmpfs (/dev/shm) where there is one.
 */
import test, { type ExecutionContext } from 'ava'
import { randomFillSync } from 'node:crypto'
import { closeSync, existsSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Destination, MultifdError, RamBlock, Source } from '../ts/index.js'
import { Journal } from '../ts/cli/journal.js'
import type { DurablePieces } from '../ts/index.js'
import { cli, lastJson, sha, type Run } from './cli-helpers.js'
import { MiB, fdCount, fillRandom, rawDestination, rejectionCode, sha256, threadCount, until, whenTrue } from './helpers.js'

/** A directory on tmpfs when the machine has one (1 GiB files cost memory, not disk I/O). */
function shmdir(t: ExecutionContext): string {
  const d = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'multifd-resume-'))
  t.teardown(() => rmSync(d, { recursive: true, force: true }))
  return d
}

/** A scratch directory holding `in.img` of `bytes` random bytes, and where `out.img` goes. */
function inputAndOutput(t: ExecutionContext, bytes: number): { d: string; input: string; out: string } {
  const d = shmdir(t)
  const input = join(d, 'in.img')
  randomFile(input, bytes)
  return { d, input, out: join(d, 'out.img') }
}

/** A file of `bytes` random bytes, written 64 MiB at a time. */
function randomFile(path: string, bytes: number): void {
  const fd = openSync(path, 'w')
  const chunk = Buffer.alloc(Math.min(bytes, 64 * MiB))
  for (let at = 0; at < bytes; at += chunk.length) writeSync(fd, randomFillSync(chunk), 0, Math.min(chunk.length, bytes - at))
  closeSync(fd)
}

const journalOf = (out: string): string => join(out, '..', `.${out.split('/').pop()!}.multifd-resume.journal`)
const partialOf = (out: string): string => join(out, '..', `.${out.split('/').pop()!}.multifd-resume`)

/** The fraction of `pieces` the journal beside `out` lists as durable (0 while there is none). */
function journalled(out: string, pieces: number): number {
  try {
    const bits = Buffer.from((JSON.parse(readFileSync(journalOf(out), 'utf8')) as { durable: string }).durable, 'base64')
    let n = 0
    for (const b of bits) for (let i = 0; i < 8; i++) n += (b >> i) & 1
    return n / pieces
  } catch {
    return 0
  }
}

/** Waits until the receiver's journal for `out` lists at least `fraction` of the file. */
async function journalReaches(out: string, size: number, fraction: number, what: string): Promise<number> {
  const pieces = size / MiB
  await whenTrue(() => journalled(out, pieces) >= fraction, 60_000, what)
  return journalled(out, pieces)
}

/** `multifd recv` on a free port (or `port`), its stderr readable as it comes. */
async function listening(t: ExecutionContext, args: string[], port = '0'): Promise<{ address: string; done: Promise<Run>; kill: (s: NodeJS.Signals) => void; stderr: () => string }> {
  let err = ''
  const r = cli(['recv', `tcp:127.0.0.1:${port}`, ...args], { onStderr: (s) => (err = s), timeoutMs: 180_000 })
  t.teardown(() => r.kill('SIGKILL'))
  await until(Promise.race([whenTrue(() => /listening on \S+/.test(err), 20_000, 'recv listening'), r.done.then((x) => Promise.reject(new Error(`recv exited: ${x.stderr}`)))]), 20_000, 'recv listening')
  return { address: /listening on (\S+)/.exec(err)![1]!, ...r, stderr: () => err }
}

const summaryOf = (r: Run): { status: string; bytes: number; resumedBytes?: number; error?: { code: string } } => lastJson(r.stdout) as never

const GiB = 1024 * MiB

test.serial('kill -9 the sender at about 50% of 1 GiB: send --resume completes byte-identical, sending at most 60%, into the receiver still running', async (t) => {
  t.timeout(240_000)
  const { d, input, out } = inputAndOutput(t, GiB)
  const recv = await listening(t, ['--out', out, '--resume', '--resume-window-ms', '120000', '--json'])
  const first = cli(['send', recv.address, input, '--max-bandwidth', '200M', '--json'])
  const at = await journalReaches(out, GiB, 0.5, 'the journal at 50%')
  first.kill('SIGKILL')
  const killed = await until(first.done, 20_000, 'the killed sender to exit')
  t.is(killed.signal, 'SIGKILL')
  t.true(at < 0.9, `killed at ${Math.round(at * 100)}%, not near the end`)
  t.false(existsSync(out), 'nothing under the final name while incomplete')
  t.true(existsSync(partialOf(out)))
  // Started again at once: the receiver, still waiting for the lost session's source, ends
  // that wait when the new session's hello arrives, listens again on the same address, and
  // the sender's retry gets in.
  const second = await until(cli(['send', recv.address, input, '--resume', '--json'], { timeoutMs: 120_000 }).done, 120_000, 'send --resume')
  t.is(second.code, 0, second.stderr)
  const s = summaryOf(second)
  t.is(s.status, 'completed')
  t.true(s.resumedBytes! >= 0.4 * GiB, `resumed ${s.resumedBytes} bytes`)
  t.true(s.bytes <= 0.6 * GiB, `the resumed send moved ${s.bytes} bytes of ${GiB}`)
  const r = await until(recv.done, 60_000, 'recv to finish')
  t.is(r.code, 0, r.stderr)
  t.regex(r.stderr, /ERR_MULTIFD_CONNECTION_CLOSED.*a new session arrived.*waiting up to 120000 ms for a new session/)
  t.is(r.stderr.match(/listening on/g)?.length, 2, 'listening again on the same address')
  t.is(summaryOf(r).resumedBytes, s.resumedBytes)
  t.is(sha(out), sha(input))
  t.deepEqual(readdirSync(d).sort(), ['in.img', 'out.img'], 'no partial output or journal left')
})

test.serial('kill -9 the receiver at about 50% of 1 GiB: recv --resume again on the address, and send --resume, still running, completes byte-identical in a new session that sends at most 60%', async (t) => {
  t.timeout(240_000)
  const { d, input, out } = inputAndOutput(t, GiB)
  const recv1 = await listening(t, ['--out', out, '--resume', '--json'])
  let sendErr = ''
  const sender = cli(['send', recv1.address, input, '--resume', '--resume-window-ms', '120000', '--max-bandwidth', '200M', '--json'], { onStderr: (e) => (sendErr = e), timeoutMs: 180_000 })
  t.teardown(() => sender.kill('SIGKILL'))
  await journalReaches(out, GiB, 0.5, 'the journal at 50%')
  recv1.kill('SIGKILL')
  t.is((await until(recv1.done, 20_000, 'the killed receiver to exit')).signal, 'SIGKILL')
  await whenTrue(() => /session ended \(ERR_MULTIFD_CONNECTION_CLOSED.*trying a new session/.test(sendErr), 30_000, 'the sender to try again')
  t.false(existsSync(out), 'nothing under the final name while incomplete')
  t.is(statSync(partialOf(out)).size, GiB)
  const port = recv1.address.split(':').pop()!
  const recv2 = await listening(t, ['--out', out, '--resume', '--json'], port)
  const sent = await until(sender.done, 120_000, 'send --resume to complete')
  t.is(sent.code, 0, sent.stderr)
  const s = summaryOf(sent)
  t.true(s.resumedBytes! >= 0.4 * GiB, `resumed ${s.resumedBytes} bytes`)
  t.true(s.bytes <= 0.6 * GiB, `the new session moved ${s.bytes} bytes of ${GiB}`)
  t.is((await until(recv2.done, 60_000, 'recv to finish')).code, 0)
  t.is(sha(out), sha(input))
  t.deepEqual(readdirSync(d).sort(), ['in.img', 'out.img'], 'no partial output or journal left')
})

test.serial('a source file changed between the runs is still copied correctly: the changed pieces are sent, the rest skipped', async (t) => {
  t.timeout(120_000)
  const size = 256 * MiB
  const { d, input, out } = inputAndOutput(t, size)
  const recv = await listening(t, ['--out', out, '--resume', '--resume-window-ms', '60000', '--json'])
  const first = cli(['send', recv.address, input, '--max-bandwidth', '64M', '--json'])
  const at = await journalReaches(out, size, 0.5, 'the journal at 50%')
  first.kill('SIGKILL')
  await until(first.done, 20_000, 'the killed sender to exit')
  // Overwrite 100 KiB inside piece 3 and the first page of piece 10: both journalled already.
  t.true(at * 256 > 11)
  const fd = openSync(input, 'r+')
  writeSync(fd, randomFillSync(Buffer.alloc(100 << 10)), 0, 100 << 10, 3 * MiB + 12345)
  writeSync(fd, randomFillSync(Buffer.alloc(4096)), 0, 4096, 10 * MiB)
  closeSync(fd)
  const second = await until(cli(['send', recv.address, input, '--resume', '--json']).done, 60_000, 'send --resume')
  t.is(second.code, 0, second.stderr)
  const s = summaryOf(second)
  const held = Math.floor(at * 256) * MiB
  t.true(s.resumedBytes! >= held - 2 * MiB && s.resumedBytes! <= size - 2 * MiB, `resumed ${s.resumedBytes} of ${held} journalled`)
  t.is((await until(recv.done, 60_000, 'recv to finish')).code, 0)
  t.is(sha(out), sha(input), 'the changed pieces were sent')
})

test.serial('a journal of another block is refused (ERR_MULTIFD_RESUME_MISMATCH) and left as it is; a corrupt one is ignored with a warning (ERR_MULTIFD_RESUME_JOURNAL)', async (t) => {
  t.timeout(120_000)
  const { d, input, out } = inputAndOutput(t, 8 * MiB)
  writeFileSync(partialOf(out), randomFillSync(Buffer.alloc(8 * MiB)))
  new Journal(partialOf(out)).write({ name: 'other.img', length: 8 * MiB, pageSize: 4096 }, 3, new Uint8Array([0xff]))
  const before = [sha(partialOf(out)), sha(journalOf(out))]
  const recv = await listening(t, ['--out', out, '--resume', '--json'])
  const send = await until(cli(['send', recv.address, input, '--resume', '--json']).done, 60_000, 'send')
  const r = await until(recv.done, 60_000, 'recv')
  t.is(r.code, 1)
  t.is(summaryOf(r).error?.code, 'ERR_MULTIFD_RESUME_MISMATCH')
  t.is(summaryOf(send).error?.code, 'ERR_MULTIFD_RESUME_MISMATCH', 'the source learns why')
  t.deepEqual([sha(partialOf(out)), sha(journalOf(out))], before, 'the other transfer\'s partial output and journal untouched')
  t.false(existsSync(out))

  for (const corrupt of ['not json\n', readFileSync(journalOf(out), 'utf8').replace('"epoch":3', '"epoch":4')]) {
    writeFileSync(journalOf(out), corrupt)
    const again = await listening(t, ['--out', out, '--resume', '--json'])
    const ok = await until(cli(['send', again.address, input, '--resume', '--json']).done, 60_000, 'send')
    const r2 = await until(again.done, 60_000, 'recv')
    t.is(r2.code, 0, r2.stderr)
    t.regex(r2.stderr, /warning: ERR_MULTIFD_RESUME_JOURNAL: .*(not a multifd resume journal|fails its checksum).*; starting that output over/)
    t.is(summaryOf(ok).resumedBytes, 0)
    t.is(sha(out), sha(input))
    t.deepEqual(readdirSync(d).sort(), ['in.img', 'out.img'])
    // Set the stage again for the next corruption.
    rmSync(out)
    writeFileSync(partialOf(out), randomFillSync(Buffer.alloc(8 * MiB)))
    new Journal(partialOf(out)).write({ name: 'in.img', length: 8 * MiB, pageSize: 4096 }, 3, new Uint8Array([0xff]))
  }
})

test.serial('recv --resume waits a bounded window for a new session: it expires (exit 1) or Ctrl-C stops it (exit 130), the partial output and journal kept', async (t) => {
  t.timeout(120_000)
  const { d, input, out } = inputAndOutput(t, 16 * MiB)
  for (const [window, stop] of [['1500', 'expiry'], ['120000', 'SIGINT']] as const) {
    const recv = await listening(t, ['--out', out, '--resume', '--resume-window-ms', window, '--json'])
    const sender = cli(['send', recv.address, input, '--max-bandwidth', '1M', '--json'])
    await whenTrue(() => existsSync(partialOf(out)), 30_000, 'the partial output')
    sender.kill('SIGKILL')
    await until(sender.done, 20_000, 'the killed sender')
    // With a short window the lost session's wait expires, then the wait for a new one; a
    // long one is still waiting for the lost source's reconnect when Ctrl-C comes.
    if (stop === 'expiry') await whenTrue(() => /waiting up to/.test(recv.stderr()), 30_000, 'the receiver to wait')
    if (stop === 'SIGINT') recv.kill('SIGINT')
    const r = await until(recv.done, 30_000, `recv to stop on ${stop}`)
    t.is(r.code, stop === 'SIGINT' ? 130 : 1, r.stderr)
    t.is(summaryOf(r).status, stop === 'SIGINT' ? 'cancelled' : 'failed')
    if (stop === 'expiry') t.is(summaryOf(r).error?.code, 'ERR_MULTIFD_CONNECTION_CLOSED', 'the failure that started the wait')
    t.false(existsSync(out))
    t.true(existsSync(partialOf(out)) && existsSync(journalOf(out)), 'kept for the next run')
    // The next round watches for a new partial output.
    rmSync(partialOf(out))
    rmSync(journalOf(out))
  }
})

test.serial('library: resuming into blocks that survived in this process sends only the pieces that differ; onDurable reports every piece complete', async (t) => {
  t.timeout(60_000)
  const size = 32 * MiB
  const src = RamBlock.allocate({ name: 'mem', size })
  fillRandom(src)
  const dst = RamBlock.allocate({ name: 'mem', size })
  dst.view().set(src.view())
  // Three pieces changed on the source since the destination got them.
  for (const p of [0, 7, 31]) src.view(p * MiB + 4096 * 3, 4096).fill(p + 1)
  // libuv's pool threads start with the first task: start them before counting.
  await src.digestAsync()
  const threads = threadCount()
  const fds = fdCount()
  const durable: DurablePieces[] = []
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst], resume: { held: () => 'all', onDurable: (x) => void durable.push(x) } })
  // With integrity, the block digests compared at completion cover the skipped pieces too.
  const source = await Source.connect({ address: dest.address, blocks: [src], resume: true, integrity: 'xxh3' })
  t.is(source.resumedBytes, size - 3 * MiB)
  await source.sendAll({ syncEveryBytes: 2 * MiB })
  const s = await source.complete()
  const ds = await dest.done
  t.is(s.resumedBytes, size - 3 * MiB)
  t.is(ds.resumedBytes, size - 3 * MiB)
  t.is(s.pages.normal + s.pages.zero, 3 * 256, 'only the three changed pieces')
  t.is(sha256(dst), sha256(src))
  await whenTrue(() => durable.length > 0, 10_000, 'a durable epoch')
  const last = durable[durable.length - 1]!
  t.is(last.blocks[0]!.block, dst)
  t.deepEqual([...last.blocks[0]!.pieces], [0xff, 0xff, 0xff, 0xff])
  t.is(threadCount(), threads, 'every thread joined')
  t.is(fdCount(), fds, 'every descriptor closed')
})

test('library: a destination without resume holds nothing, so everything is sent', async (t) => {
  const src = RamBlock.allocate({ name: 'mem', size: 4 * MiB })
  fillRandom(src)
  const dst = RamBlock.allocate({ name: 'mem', size: 4 * MiB })
  dst.view().set(src.view())
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })
  const source = await Source.connect({ address: dest.address, blocks: [src], resume: true })
  await source.sendAll()
  const s = await source.complete()
  await dest.done
  t.is(s.resumedBytes, 0)
  t.is(s.pages.normal + s.pages.zero, 1024)
})

test('library: a source takes held ranges over several messages, skips only pieces with equal digests, and refuses a piece offered twice or outside its blocks (ERR_MULTIFD_PROTOCOL)', async (t) => {
  t.timeout(60_000)
  const src = RamBlock.allocate({ name: 'mem', size: 3 * MiB })
  fillRandom(src)
  const [d0, d1] = await src.native.pieceDigests([0, 1])
  const cases: Array<{ parts: Array<Array<{ block: number; index: number; xxh3: string }>>; code?: 'ERR_MULTIFD_PROTOCOL' }> = [
    { parts: [[{ block: 0, index: 0, xxh3: d0! }], [{ block: 0, index: 1, xxh3: d0! }], []] },
    { parts: [[{ block: 0, index: 1, xxh3: d1! }], [{ block: 0, index: 1, xxh3: d1! }]], code: 'ERR_MULTIFD_PROTOCOL' },
    { parts: [[{ block: 0, index: 3, xxh3: d1! }]], code: 'ERR_MULTIFD_PROTOCOL' },
    { parts: [[{ block: 1, index: 0, xxh3: d1! }]], code: 'ERR_MULTIFD_PROTOCOL' },
  ]
  for (const c of cases) {
    const dest = await rawDestination()
    t.teardown(dest.close)
    const connecting = Source.connect({ address: dest.address, blocks: [src], resume: true })
    connecting.catch(() => {})
    const control = await dest.control
    t.is((await control.next())?.type, 'resume')
    c.parts.forEach((ranges, i) => control.send({ type: 'held', ranges, done: i === c.parts.length - 1 }))
    if (c.code) {
      t.is(await rejectionCode(connecting), c.code)
      continue
    }
    const source = await connecting
    t.is(source.resumedBytes, MiB, 'piece 0 only: piece 1 was offered with another digest')
    t.deepEqual(await control.next(), { type: 'resumed', bytes: MiB })
    await source.abort(new MultifdError('ERR_MULTIFD_CANCELLED', 'done'))
  }
})
