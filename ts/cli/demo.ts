/**
 * `multifd demo` (`npm run demo`): a live migration on loopback. A writer thread keeps
 * dirtying pages of a 1 GiB block while it is migrated; rounds re-send what changed until the
 * rest fits the downtime limit, then the writer is paused (switchover), the final round goes
 * out, and the destination is checked byte for byte against the source.
 */
import { createHash, randomFillSync } from 'node:crypto'
import { Worker } from 'node:worker_threads'
import { z } from 'zod'
import { RamBlock } from '../block.js'
import { Destination } from '../destination.js'
import { migrate } from '../migrate.js'
import type { LiveSummary, RoundStats } from '../live.js'
import { IntIn, IntString, Size, check, parse } from './args.js'
import { LIMITS } from '../options.js'
import { bytes, duration, rate } from './format.js'
import type { CommandResult } from './output.js'
import { onInterrupt } from './interrupt.js'

export const DEMO_HELP = `multifd demo [--size 1G] [--channels 4] [--dirty-rate 50000] [--downtime-ms 30] [--json]

A live migration on loopback: a writer thread dirties --dirty-rate random pages per second of a
--size block while it is migrated over --channels channels; dirty rounds repeat until the rest
fits --downtime-ms, then the writer is paused, the final round is sent, and the destination
is checked byte for byte against the source.

The expected downtime is the dirty bytes left over the bandwidth of the last round plus the
switchover's fixed cost (two round trips to the destination, measured before round 0). On a
busy 2-core machine that fixed cost alone is a few milliseconds, hence the 30 ms default.`

/** The writer runs in a worker; from the TypeScript sources it first registers tsx there. */
function startWriter(token: number, pagesPerSecond: number): Worker {
  const fromSource = import.meta.url.endsWith('.ts')
  const writer = new URL(fromSource ? './writer.ts' : './writer.js', import.meta.url).href
  const code = fromSource
    ? `import(${JSON.stringify(import.meta.resolve('tsx/esm/api'))}).then((api) => { api.register(); return import(${JSON.stringify(writer)}) })`
    : `import(${JSON.stringify(writer)})`
  return new Worker(code, { eval: true, workerData: { token, pagesPerSecond } })
}

function sha256(b: RamBlock): string {
  const h = createHash('sha256')
  for (let off = 0; off < b.size; off += 2 ** 30) h.update(b.view(off, Math.min(2 ** 30, b.size - off)))
  return h.digest('hex')
}

export async function demo(argv: string[]): Promise<CommandResult> {
  const { values } = parse(argv, { size: { type: 'string' }, channels: { type: 'string' }, 'dirty-rate': { type: 'string' }, 'downtime-ms': { type: 'string' } })
  const o = check(
    z.object({ size: Size.default(2 ** 30), channels: IntIn(LIMITS.channels).default(4), 'dirty-rate': IntString(1, 10_000_000).default(50_000), 'downtime-ms': IntString(1, 600_000).default(30) }),
    values,
  )
  const size = Math.ceil(o.size / 4096) * 4096
  const json = values.json === true
  const say = (s: string): void => void (json || process.stdout.write(s + '\n'))

  say(`preparing ${bytes(size)} of application memory (random data, every 8th page zero)...`)
  const src = RamBlock.allocate({ name: 'app.heap', size, prefault: true })
  for (let off = 0; off < size; off += 2 ** 30) randomFillSync(src.view(off, Math.min(2 ** 30, size - off)))
  for (let off = 0; off < size; off += 8 * 4096) src.view(off, 4096).fill(0)
  const dst = RamBlock.allocate({ name: 'app.heap', size, prefault: true })
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })

  const writer = startWriter(src.share(), o['dirty-rate'])
  await new Promise<void>((resolve, reject) => writer.once('message', () => resolve()).once('error', reject))
  say(`writer thread dirtying ${o['dirty-rate']} pages/s (${rate(o['dirty-rate'] * 4096)}); destination on ${dest.address}`)
  say(`live migration over ${o.channels} channels, downtime limit ${o['downtime-ms']} ms`)

  const pauseWriter = (): Promise<number> =>
    new Promise((resolve) => {
      writer.once('message', (m: { writes: number }) => resolve(m.writes))
      writer.postMessage('pause')
    })
  let summary: LiveSummary
  try {
    summary = await migrate({
      address: dest.address,
      blocks: [src],
      channels: o.channels,
      live: true,
      downtimeLimitMs: o['downtime-ms'],
      onNoConvergence: 'switchover',
      onSwitchover: async () => {
        const writes = await pauseWriter()
        say(`  switchover: writer paused after ${writes} writes; sending the last dirty pages`)
      },
      onSource: (s) => {
        onInterrupt(() => s.cancel())
        s.on('round', (r: RoundStats) => {
          if (r.final) return
          say(`  round ${r.round}: ${r.pages} pages, ${bytes(r.bytes)} in ${duration(r.durationMs / 1000)} (${rate(r.bandwidth)}); ${r.dirtyPagesLeft} dirtied meanwhile -> expected downtime ${r.expectedDowntimeMs.toFixed(1)} ms: ${r.decision}`)
        })
      },
    })
  } finally {
    await writer.terminate()
    src.unshare()
  }
  await dest.done
  say('checking the destination against the source (sha256 of the whole block)...')
  const verified = sha256(src) === sha256(dst)
  const result: CommandResult = {
    status: verified ? 'completed' : 'failed',
    bytes: summary.bytes,
    seconds: summary.seconds,
    bytesPerSecond: summary.bytesPerSecond,
    channels: summary.channels,
    pages: summary.pages,
    rounds: summary.rounds,
    converged: summary.converged,
    downtimeMs: summary.downtimeMs,
    expectedDowntimeMs: summary.expectedDowntimeMs,
    switchoverCostMs: summary.switchoverCostMs,
    downtimeLimitMs: summary.downtimeLimitMs,
    verified,
    ...(verified ? {} : { error: { code: 'ERR_MULTIFD_IO', message: 'the destination differs from the source' } }),
  }
  if (json) {
    process.stdout.write(JSON.stringify(result) + '\n')
  } else {
    const final = summary.rounds.at(-1)
    say(`\ncompleted in ${duration(summary.seconds)}: ${summary.rounds.length - 1} live round(s) + the final one, ${bytes(summary.bytes)} on the wire (${rate(summary.bytesPerSecond)})`)
    const within = summary.downtimeMs <= summary.downtimeLimitMs
    say(
      `downtime ${summary.downtimeMs.toFixed(1)} ms, ${within ? 'within' : 'ABOVE'} the ${summary.downtimeLimitMs} ms limit ` +
        `(expected ${summary.expectedDowntimeMs.toFixed(1)} ms: ${summary.switchoverCostMs.toFixed(1)} ms of round trips + ${(summary.expectedDowntimeMs - summary.switchoverCostMs).toFixed(1)} ms of data)` +
        (summary.converged ? '' : ' - did not converge, switched over anyway'),
    )
    say(`pages: ${summary.pages.normal} with data, ${summary.pages.zero} zero (sent as offsets only); final round ${final?.pages ?? 0} pages`)
    for (const [i, c] of summary.perChannel.entries()) say(`  channel ${i}: ${bytes(c.bytes)}, ${c.packets} packets`)
    say(`destination equals source: ${verified ? 'yes' : 'NO'}`)
  }
  return result
}
