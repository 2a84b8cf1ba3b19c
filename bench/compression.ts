/**
 * Compression and zero pages: throughput and wire bytes per method, for random data, data
 * with 50% zero pages, and text-like data, next to QEMU 10 with the same settings, in one run.
 *
 *   bench/compression [--size 1G] [--channels 2,4] [--methods none,zlib,zstd] [--kinds random,half-zero,text] [--json] [--no-qemu]
 */
import { rmSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { parseSize } from './lib/run.js'
import { ours, qemu, settle, sourceFile, type DataKind, type Result } from './lib/transfer.js'

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1G' },
    channels: { type: 'string', default: '2,4' },
    methods: { type: 'string', default: 'none,zlib,zstd' },
    kinds: { type: 'string', default: 'random,half-zero,text' },
    json: { type: 'boolean', default: false },
    'no-qemu': { type: 'boolean', default: false },
  },
})
const size = parseSize(values.size!)
const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')
type Row = { kind: DataKind; channels: number; method: string; ours?: Result | undefined; qemu?: Result | undefined }
const rows: Row[] = []
for (const kind of values.kinds!.split(',') as DataKind[]) {
  const file = sourceFile(size, log, kind)
  for (const channels of values.channels!.split(',').map(Number)) {
    for (const method of values.methods!.split(',')) {
      const row: Row = { kind, channels, method }
      await settle()
      row.ours = await ours(size, file, { channels, compression: method as 'none' | 'zlib' | 'zstd' })
      if (!values['no-qemu']) {
        await settle()
        row.qemu = await qemu(size, file, { channels, compression: method }).catch((e: Error) => (log(`qemu: ${e.message.split('\n')[0]}`), undefined))
      }
      rows.push(row)
      const f = (r?: Result): string => (r ? `${r.gbps.toFixed(2)} GB/s, ${((r.wireBytes ?? 0) / 2 ** 20).toFixed(0)} MiB on the wire` : '-')
      log(`${kind.padEnd(9)} ch ${channels} ${method.padEnd(4)}: ours ${f(row.ours)}; qemu ${f(row.qemu)}`)
    }
  }
  rmSync(file, { force: true })
}
const out = rows.map((r) => ({
  kind: r.kind,
  channels: r.channels,
  method: r.method,
  oursGBps: r.ours?.gbps,
  qemuGBps: r.qemu?.gbps,
  oursOverQemu: r.ours && r.qemu ? r.ours.gbps / r.qemu.gbps : undefined,
  oursWireBytes: r.ours?.wireBytes,
  qemuWireBytes: r.qemu?.wireBytes,
  verified: (r.ours?.ok ?? false) && (r.qemu?.ok ?? true),
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
