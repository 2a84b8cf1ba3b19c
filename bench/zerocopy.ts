/**
 * Sender CPU seconds per GiB with and without MSG_ZEROCOPY at 1, 2, 4 channels on loopback, in
 * one run. On loopback the kernel copies every zero-copy send anyway (it reports COPIED), so
 * this shows the bookkeeping's cost, not the saving a real NIC gives.
 *
 *   bench/zerocopy [--size 1G] [--channels 1,2,4] [--reps 3] [--json]
 */
import { rmSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { median, parseSize } from './lib/run.js'
import { ours, settle, sourceFile, type Result } from './lib/transfer.js'

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1G' },
    channels: { type: 'string', default: '1,2,4' },
    reps: { type: 'string', default: '3' },
    json: { type: 'boolean', default: false },
  },
})
const size = parseSize(values.size!)
const GiB = 2 ** 30
const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')
const file = sourceFile(size, log)
const rows: Array<{ channels: number; copy: Result[]; zc: Result[] }> = []
for (let rep = 0; rep < Number(values.reps); rep++) {
  for (const ch of values.channels!.split(',').map(Number)) {
    let row = rows.find((r) => r.channels === ch)
    if (!row) rows.push((row = { channels: ch, copy: [], zc: [] }))
    const order = rep % 2 === 0 ? [false, true] : [true, false]
    for (const zc of order) {
      await settle()
      const r = await ours(size, file, { channels: ch, zeroCopySend: zc })
      ;(zc ? row.zc : row.copy).push(r)
      log(`rep ${rep + 1} ch ${ch} ${zc ? 'zero-copy' : 'copy     '}: ${r.gbps.toFixed(2)} GB/s, sender ${(r.srcCpu / (size / GiB)).toFixed(3)} CPU s/GiB`)
    }
  }
}
rmSync(file, { force: true })
const m = (rs: Result[], f: (r: Result) => number): number => median(rs.map(f))
const out = rows.map((r) => {
  const zc = r.zc.map((x) => x.extra?.zeroCopy as { sends: number; copied: number; enobufs: number })
  return {
    channels: r.channels,
    copyGBps: m(r.copy, (x) => x.gbps),
    zeroCopyGBps: m(r.zc, (x) => x.gbps),
    copySenderCpuPerGiB: m(r.copy, (x) => x.srcCpu) / (size / GiB),
    zeroCopySenderCpuPerGiB: m(r.zc, (x) => x.srcCpu) / (size / GiB),
    zeroCopySends: median(zc.map((z) => z.sends)),
    kernelCopied: median(zc.map((z) => z.copied)),
    enobufs: median(zc.map((z) => z.enobufs)),
    verified: [...r.copy, ...r.zc].every((x) => x.ok),
  }
})
if (values.json) console.log(JSON.stringify({ sizeBytes: size, rows: out }))
else {
  log('\nchannels | copy GB/s | zero-copy GB/s | sender CPU s/GiB copy | zero-copy | ratio | zc sends | kernel copied')
  for (const o of out) {
    log(`${String(o.channels).padStart(8)} | ${o.copyGBps.toFixed(2).padStart(9)} | ${o.zeroCopyGBps.toFixed(2).padStart(14)} | ${o.copySenderCpuPerGiB.toFixed(3).padStart(21)} | ${o.zeroCopySenderCpuPerGiB.toFixed(3).padStart(9)} | ${(o.zeroCopySenderCpuPerGiB / o.copySenderCpuPerGiB).toFixed(2)}x | ${String(o.zeroCopySends).padStart(8)} | ${o.kernelCopied}`)
  }
  log(`every transfer verified byte for byte: ${out.every((o) => o.verified) ? 'yes' : 'NO'}`)
}
