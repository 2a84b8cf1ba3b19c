/**
 * Sync round-trip latency with the destination's JavaScript event loop idle and kept busy
 * (50 ms of blocking work every 100 ms), in one run. The destination runs in its own process;
 * the source sends one page and syncs, `--reps` times per case, and the table shows the sync
 * round trip (from `sync()` to its resolution). Since the destination's Rust side acknowledges
 * the barrier itself, the busy case should match the idle one; when the acknowledgement went
 * through the destination's JavaScript it waited for the event loop (up to 50 ms more).
 *
 *   bench/sync-latency [--reps 20] [--channels 4] [--json]
 */
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { createInterface } from 'node:readline'
import { Destination, RamBlock, Source } from '../ts/index.js'

const self = fileURLToPath(import.meta.url)
const say = (m: object): void => void process.stdout.write(JSON.stringify(m) + '\n')

if (process.argv[2] === 'dest') {
  // The destination process: `dest idle` or `dest busy`.
  const busy = process.argv[3] === 'busy'
  const spin = (ms: number): void => {
    const end = performance.now() + ms
    while (performance.now() < end) {
      // blocking work
    }
  }
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: (t) => t.map((b) => RamBlock.allocate({ name: b.name, size: b.length, pageSize: b.pageSize })) })
  const load = busy ? setInterval(() => spin(50), 100) : undefined
  say({ type: 'listening', address: dest.address })
  await dest.done.catch(() => undefined)
  clearInterval(load)
  process.exit(0)
}

const { values } = parseArgs({ options: { reps: { type: 'string', default: '20' }, channels: { type: 'string', default: '4' }, json: { type: 'boolean', default: false } } })
const reps = Number(values.reps)
const channels = Number(values.channels)

async function measure(mode: 'idle' | 'busy'): Promise<number[]> {
  const child = spawn(process.execPath, ['--import=tsx', self, 'dest', mode], { stdio: ['ignore', 'pipe', 'inherit'] })
  const first = await new Promise<{ address: string }>((resolve) => createInterface({ input: child.stdout }).once('line', (l) => resolve(JSON.parse(l) as { address: string })))
  const block = RamBlock.allocate({ name: 'ram', size: 1 << 20 })
  const source = await Source.connect({ address: first.address, blocks: [block], channels })
  const times: number[] = []
  for (let i = 0; i < reps; i++) {
    await source.sendBlock(block, [{ offset: (i * 4096) % block.size, length: 4096 }])
    const t0 = performance.now()
    await source.sync()
    times.push(performance.now() - t0)
    // Spread the syncs over the destination's load cycle.
    await new Promise((r) => setTimeout(r, 37))
  }
  await source.complete()
  await new Promise((r) => child.once('exit', r))
  return times.sort((a, b) => a - b)
}

const pct = (xs: number[], p: number): number => xs[Math.min(xs.length - 1, Math.floor((xs.length * p) / 100))]!
const rows: Array<{ destination: string; medianMs: number; p90Ms: number; maxMs: number }> = []
for (const mode of ['idle', 'busy'] as const) {
  const t = await measure(mode)
  rows.push({ destination: mode === 'idle' ? 'event loop idle' : 'event loop busy (50 ms every 100 ms)', medianMs: pct(t, 50), p90Ms: pct(t, 90), maxMs: t[t.length - 1]! })
}
if (values.json) say({ reps, channels, rows })
else {
  console.log(`sync round trip, ${reps} syncs per case, ${channels} channels, one page each`)
  console.log('destination                              median ms    p90 ms    max ms')
  for (const r of rows) console.log(`${r.destination.padEnd(40)} ${r.medianMs.toFixed(2).padStart(9)} ${r.p90Ms.toFixed(2).padStart(9)} ${r.maxMs.toFixed(2).padStart(9)}`)
}
