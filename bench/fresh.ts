/**
 * Receiving into new memory: this package's destination writing a new file on tmpfs (as the
 * CLI's `recv --out` does, pages allocated as they arrive) against QEMU 10 with a fresh,
 * not preallocated destination, at each channel count, in one run on the same source bytes.
 *
 *   bench/fresh [--size 1G] [--channels 1,2,4] [--reps 3] [--dir /dev/shm] [--json] [--no-qemu]
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { median, parseSize, spread } from './lib/run.js'
import { oursIntoNewFile, qemu, settle, sourceFile, type Result } from './lib/transfer.js'

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1G' },
    channels: { type: 'string', default: '1,2,4' },
    reps: { type: 'string', default: '3' },
    dir: { type: 'string', default: '/dev/shm' },
    json: { type: 'boolean', default: false },
    'no-qemu': { type: 'boolean', default: false },
  },
})
const size = parseSize(values.size!)
const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')
const src = sourceFile(size, log)
const dir = mkdtempSync(join(values.dir!, 'multifd-bench-fresh-'))
type Row = { channels: number; ours: Result[]; qemu: Result[] }
const rows: Row[] = []
try {
  for (let rep = 0; rep < Number(values.reps); rep++) {
    for (const channels of values.channels!.split(',').map(Number)) {
      let row = rows.find((r) => r.channels === channels)
      if (!row) rows.push((row = { channels, ours: [], qemu: [] }))
      const out = join(dir, 'received.ram')
      const runs = [
        async () => {
          row.ours.push(await oursIntoNewFile(size, src, out, { channels }))
          rmSync(out, { force: true })
        },
        async () => {
          if (values['no-qemu']) return
          const q = await qemu(size, src, { channels, fresh: true }).catch((e: Error) => (log(`qemu: ${e.message.split('\n')[0]}`), undefined))
          if (q) row.qemu.push(q)
        },
      ]
      for (const run of rep % 2 === 0 ? runs : runs.reverse()) {
        await settle()
        await run()
      }
      log(`rep ${rep + 1} ch ${channels}: ours ${row.ours.at(-1)!.gbps.toFixed(2)} GB/s` + (row.qemu.length > rep ? `, qemu fresh ${row.qemu.at(-1)!.gbps.toFixed(2)}` : ''))
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true })
  rmSync(src, { force: true })
}
const out = rows.map((r) => ({
  channels: r.channels,
  oursGBps: median(r.ours.map((x) => x.gbps)),
  qemuGBps: median(r.qemu.map((x) => x.gbps)),
  oursOverQemu: median(r.ours.map((x) => x.gbps)) / median(r.qemu.map((x) => x.gbps)),
  spread: { ours: spread(r.ours.map((x) => x.gbps)), qemu: spread(r.qemu.map((x) => x.gbps)) },
  verified: r.ours.every((x) => x.ok) && r.qemu.every((x) => x.ok),
}))
if (values.json) console.log(JSON.stringify({ title: 'fresh', sizeBytes: size, dir: values.dir, rows: out }))
else {
  const f = (x: number): string => (Number.isFinite(x) ? x.toFixed(2) : '-')
  log(`\n${(size / 2 ** 30).toFixed(2)} GiB into new memory: ours into a new file in ${values.dir}, QEMU with a fresh destination (no prealloc)`)
  log('channels | ours GB/s | QEMU fresh GB/s | vs QEMU')
  for (const o of out) log(`${String(o.channels).padStart(8)} | ${f(o.oursGBps).padStart(9)} | ${f(o.qemuGBps).padStart(15)} | ${f(o.oursOverQemu)}x`)
  log(`every transfer verified byte for byte: ${out.every((o) => o.verified) ? 'yes' : 'NO'}`)
}
if (!out.every((o) => o.verified)) process.exitCode = 1
