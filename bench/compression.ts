/**
 * Compression and zero pages: throughput and wire bytes per method, for random data, data
 * with 50% zero pages, and text-like data, next to QEMU 10 with the same settings, in one run.
 *
 *   bench/compression [--size 1G] [--channels 2,4] [--methods none,zlib,zstd] [--kinds random,half-zero,text] [--reps 1] [--json] [--no-qemu]
 */
import { rmSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { median, parseSize, spread } from './lib/run.js'
import { ours, qemu, settle, sourceFile, type DataKind, type Result } from './lib/transfer.js'

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1G' },
    channels: { type: 'string', default: '2,4' },
    methods: { type: 'string', default: 'none,zlib,zstd' },
    kinds: { type: 'string', default: 'random,half-zero,text' },
    reps: { type: 'string', default: '1' },
    json: { type: 'boolean', default: false },
    'no-qemu': { type: 'boolean', default: false },
  },
})
const size = parseSize(values.size!)
const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')
type Row = { kind: DataKind; channels: number; method: string; ours: Result[]; qemu: Result[] }
const rows: Row[] = []
for (const kind of values.kinds!.split(',') as DataKind[]) {
  const file = sourceFile(size, log, kind)
  for (let rep = 0; rep < Number(values.reps); rep++) {
    for (const channels of values.channels!.split(',').map(Number)) {
      for (const method of values.methods!.split(',')) {
        let row = rows.find((r) => r.kind === kind && r.channels === channels && r.method === method)
        if (!row) rows.push((row = { kind, channels, method, ours: [], qemu: [] }))
        // Paired reps, the order alternating, so a slow moment of the machine hits both.
        const runs = [
          async () => void row.ours.push(await ours(size, file, { channels, compression: method as 'none' | 'zlib' | 'zstd' })),
          async () => {
            if (values['no-qemu']) return
            const q = await qemu(size, file, { channels, compression: method }).catch((e: Error) => (log(`qemu: ${e.message.split('\n')[0]}`), undefined))
            if (q) row.qemu.push(q)
          },
        ]
        for (const run of rep % 2 === 0 ? runs : runs.reverse()) {
          await settle()
          await run()
        }
        const f = (r?: Result): string => (r ? `${r.gbps.toFixed(2)} GB/s, ${((r.wireBytes ?? 0) / 2 ** 20).toFixed(0)} MiB on the wire` : '-')
        log(`rep ${rep + 1} ${kind.padEnd(9)} ch ${channels} ${method.padEnd(4)}: ours ${f(row.ours.at(-1))}; qemu ${f(row.qemu.at(-1))}`)
      }
    }
  }
  rmSync(file, { force: true })
}
const med = (rs: Result[], k: 'gbps' | 'wireBytes'): number | undefined => (rs.length ? median(rs.map((r) => r[k] ?? NaN)) : undefined)
const out = rows.map((r) => ({
  kind: r.kind,
  channels: r.channels,
  method: r.method,
  oursGBps: med(r.ours, 'gbps'),
  qemuGBps: med(r.qemu, 'gbps'),
  oursOverQemu: r.ours.length && r.qemu.length ? med(r.ours, 'gbps')! / med(r.qemu, 'gbps')! : undefined,
  oursWireBytes: med(r.ours, 'wireBytes'),
  qemuWireBytes: med(r.qemu, 'wireBytes'),
  spread: { ours: spread(r.ours.map((x) => x.gbps)), qemu: spread(r.qemu.map((x) => x.gbps)) },
  verified: r.ours.every((x) => x.ok) && r.qemu.every((x) => x.ok),
}))
if (values.json) console.log(JSON.stringify({ sizeBytes: size, rows: out }))
else {
  const n = (x: number | undefined, d = 2): string => (x === undefined ? '-' : x.toFixed(d))
  log(`\n${(size / 2 ** 30).toFixed(2)} GiB per run, destination preallocated, loopback TCP`)
  log('data      | ch | method | ours GB/s | QEMU GB/s | vs QEMU | ours wire MiB | QEMU wire MiB')
  for (const o of out) {
    log(`${o.kind.padEnd(9)} | ${String(o.channels).padStart(2)} | ${o.method.padEnd(6)} | ${n(o.oursGBps).padStart(9)} | ${n(o.qemuGBps).padStart(9)} | ${(n(o.oursOverQemu) + 'x').padStart(7)} | ${n(o.oursWireBytes === undefined ? undefined : o.oursWireBytes / 2 ** 20, 0).padStart(13)} | ${n(o.qemuWireBytes === undefined ? undefined : o.qemuWireBytes / 2 ** 20, 0).padStart(13)}`)
  }
  log(`every transfer verified byte for byte: ${out.every((o) => o.verified) ? 'yes' : 'NO'}`)
}
