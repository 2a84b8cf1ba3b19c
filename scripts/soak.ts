/**
 * Soak: many migrations in one process with random channel counts and options (a third of
 * them over mutual TLS) and about 10% injected faults. Every completed migration must be byte-identical, every failed one must
 * report an error, and resident memory and open descriptors must be flat at the end.
 *
 *   node --expose-gc --import=tsx scripts/soak.ts [--count 200] [--seed N] [--json]
 *
 * Prints the counts; exits 1 if any check fails. `__test__/soak.spec.ts` runs a short form.
 */
import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { fileURLToPath } from 'node:url'
import { Destination, MultifdError, RamBlock, Source, type CompressionMethod } from '../ts/index.js'

const { values } = parseArgs({ options: { count: { type: 'string', default: '200' }, seed: { type: 'string' }, json: { type: 'boolean', default: false } } })
const count = Number(values.count)
let seed = Number(values.seed ?? Date.now() % 1_000_000)
const firstSeed = seed
/** mulberry32: a seeded generator, so a failing run can be replayed with --seed. */
const random = (): number => {
  seed = (seed + 0x6d2b79f5) | 0
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed)
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296
}
const pick = <T>(xs: readonly T[]): T => xs[Math.floor(random() * xs.length)]!
const rss = (): number => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024
const fds = (): number => readdirSync('/proc/self/fd').length
const gc = (globalThis as { gc?: () => void }).gc
const sha = (b: RamBlock): string => createHash('sha256').update(b.view()).digest('hex')

const pki = mkdtempSync(join(tmpdir(), 'multifd-soak-pki-'))
execFileSync('bash', [fileURLToPath(new URL('test-certs.sh', import.meta.url)), pki], { stdio: ['ignore', 'ignore', 'inherit'] })
process.on('exit', () => rmSync(pki, { recursive: true, force: true }))
const pem = (f: string): string => join(pki, f)
const destTls = { cert: pem('dest.pem'), key: pem('dest.key'), ca: pem('ca.pem'), allow: ['CN=source,O=multifd tests'] }
const sourceTls = (who: string): { cert: string; key: string; ca: string; name: string } => ({ cert: pem(`${who}.pem`), key: pem(`${who}.key`), ca: pem('ca.pem'), name: 'localhost' })

/** `intruder`: a TLS source whose certificate is not on the destination's allow-list. */
type Fault = 'none' | 'cancel' | 'mismatch' | 'dest-close' | 'intruder'
interface Outcome {
  fault: Fault
  tls: boolean
  status: 'completed' | 'failed' | 'cancelled'
  ok: boolean
  detail: string
}

function block(name: string, pages: number, fill: boolean): RamBlock {
  const b = RamBlock.allocate({ name, size: pages * 4096 })
  if (fill) {
    const v = b.view()
    for (let p = 0; p < pages; p++) if (random() < 0.7) v.fill(Math.floor(random() * 255) + 1, p * 4096 + Math.floor(random() * 4000), (p + 1) * 4096)
  }
  return b
}

async function one(i: number): Promise<Outcome> {
  const tls = random() < 0.33
  const fault: Fault = random() < 0.1 ? pick(tls ? (['cancel', 'mismatch', 'dest-close', 'intruder'] as const) : (['cancel', 'mismatch', 'dest-close'] as const)) : 'none'
  const unix = random() < 0.3
  const compression: CompressionMethod = pick(['none', 'none', 'zlib', 'zstd'] as const)
  const options = {
    channels: 1 + Math.floor(random() * 8),
    compression,
    zeroPageDetection: pick(['multifd', 'none'] as const),
    zeroCopySend: !tls && !unix && compression === 'none' && random() < 0.3,
    ...(tls ? { tls: sourceTls(fault === 'intruder' ? 'intruder' : 'source') } : {}),
    // Faults need time to land mid-transfer: throttle those runs.
    ...(fault === 'cancel' || fault === 'dest-close' ? { maxBandwidth: 8 << 20 } : {}),
  }
  const sizes = [1 + Math.floor(random() * 700), 1 + Math.floor(random() * 40)]
  const src = sizes.map((p, k) => block(`b${k}`, p, true))
  const dst = sizes.map((p, k) => block(`b${k}`, fault === 'mismatch' && k === 0 ? p + 1 : p, false))
  const address = unix ? `unix:${join(tmpdir(), `multifd-soak-${process.pid}-${i}.sock`)}` : 'tcp:127.0.0.1:0'
  const dest = Destination.listen({ address, blocks: dst, ...(tls ? { tls: destTls } : {}) })
  const destDone = dest.done.then(
    () => undefined,
    (e: unknown) => e,
  )
  // An intruder is rejected (a warning), never the destination's failure.
  const rejection = new Promise<MultifdError | undefined>((resolve) => {
    dest.once('warning', resolve)
    setTimeout(resolve, 5000, undefined).unref()
  })
  let source: Source | undefined
  try {
    source = await Source.connect({ address: dest.address, blocks: src, ...options })
    const s = source
    const sending = s.sendAll().then(() => s.complete())
    sending.catch(() => undefined) // it may reject while the fault is being injected; awaited below
    if (fault === 'cancel' || fault === 'dest-close') {
      while (s.stats().bytes === 0 && !s.error) await new Promise((r) => setImmediate(r))
      if (fault === 'cancel') await s.cancel()
      else dest.close()
    }
    await sending
    await destDone
    const same = src.every((b, k) => sha(b) === sha(dst[k]!))
    return { fault, tls, status: 'completed', ok: fault === 'none' && same, detail: same ? '' : 'destination differs' }
  } catch (e) {
    const err = e instanceof MultifdError ? e : undefined
    if (fault === 'intruder') {
      const w = await rejection
      const unharmed = w?.code === 'ERR_MULTIFD_TLS_NOT_ALLOWED' && dest.error === undefined && dest.stats().rejectedConnections === 1
      return { fault, tls, status: 'failed', ok: err?.code === 'ERR_MULTIFD_TLS_NOT_ALLOWED' && unharmed, detail: `${err?.code}: ${err?.message}; destination: ${w ? `${w.code}: ${w.message}` : 'no rejection'}` }
    }
    const destErr = await destDone
    const reported = !!err?.code && (destErr === undefined || destErr instanceof MultifdError)
    const status = source?.state === 'cancelled' ? 'cancelled' : 'failed'
    return { fault, tls, status, ok: fault !== 'none' && reported, detail: err ? `${err.code}: ${err.message}` : String(e) }
  } finally {
    dest.close()
  }
}

const outcomes: Outcome[] = []
await one(-1) // warm-up: lazily created threads and descriptors are not leaks
gc?.()
const start = { rss: rss(), fds: fds() }
for (let i = 0; i < count; i++) {
  outcomes.push(await one(i))
  if (i % 20 === 19) gc?.()
}
gc?.()
await new Promise((r) => setTimeout(r, 50)) // let finalizers of collected blocks run
gc?.()
const end = { rss: rss(), fds: fds() }
const tally = (f: (o: Outcome) => boolean): number => outcomes.filter(f).length
const report = {
  seed: firstSeed,
  count,
  completed: tally((o) => o.status === 'completed'),
  failed: tally((o) => o.status === 'failed'),
  cancelled: tally((o) => o.status === 'cancelled'),
  injected: tally((o) => o.fault !== 'none'),
  tls: tally((o) => o.tls),
  wrong: outcomes.filter((o) => !o.ok).map((o) => `${o.fault}/${o.status}: ${o.detail}`),
  rss: { start: start.rss, end: end.rss, growth: end.rss - start.rss },
  fds: { start: start.fds, end: end.fds },
}
// Flat: descriptors exactly; memory within 64 MiB (allocator and V8 heap noise).
const flat = report.fds.start === report.fds.end && report.rss.growth < 64 * 2 ** 20
if (values.json) console.log(JSON.stringify({ ...report, flat }))
else {
  console.log(`soak (seed ${firstSeed}): ${count} migrations (${report.tls} over TLS), ${report.injected} with injected faults`)
  console.log(`  completed ${report.completed}, failed ${report.failed}, cancelled ${report.cancelled}; wrong outcomes: ${report.wrong.length}`)
  for (const w of report.wrong) console.log(`    ${w}`)
  console.log(`  RSS ${(start.rss / 2 ** 20).toFixed(0)} -> ${(end.rss / 2 ** 20).toFixed(0)} MiB, fds ${start.fds} -> ${end.fds}: ${flat ? 'flat' : 'NOT flat'}`)
}
process.exitCode = report.wrong.length === 0 && flat ? 0 : 1
