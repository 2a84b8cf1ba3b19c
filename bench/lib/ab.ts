/**
 * A/B comparison of this package with different source options, in one run: throughput and
 * sender CPU per GiB for each variant at each channel count, alternating the order per rep.
 */
import { rmSync } from 'node:fs'
import { parseArgs } from 'node:util'
import type { SourceOptions } from '../../ts/index.js'
import { median, parseSize, spread } from './run.js'
import { ours, settle, sourceFile, type Result } from './transfer.js'

export interface Variant {
  label: string
  options: Partial<SourceOptions>
}

export async function compareVariants(title: string, variants: Variant[], defaults: { channels: string }): Promise<void> {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '1G' },
      channels: { type: 'string', default: defaults.channels },
      reps: { type: 'string', default: '3' },
      json: { type: 'boolean', default: false },
    },
  })
  const size = parseSize(values.size!)
  const GiB = 2 ** 30
  const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')
  const file = sourceFile(size, log)
  const results = new Map<string, Result[]>()
  const channelsList = values.channels!.split(',').map(Number)
  for (let rep = 0; rep < Number(values.reps); rep++) {
    for (const ch of channelsList) {
      const order = rep % 2 === 0 ? variants : [...variants].reverse()
      for (const v of order) {
        await settle()
        const r = await ours(size, file, { channels: ch, ...v.options })
        const key = `${ch}/${v.label}`
        results.set(key, [...(results.get(key) ?? []), r])
        log(`rep ${rep + 1} ch ${ch} ${v.label.padEnd(12)}: ${r.gbps.toFixed(2)} GB/s, sender ${(r.srcCpu / (size / GiB)).toFixed(3)} CPU s/GiB`)
      }
    }
  }
  rmSync(file, { force: true })
  const rows = channelsList.map((ch) => ({
    channels: ch,
    variants: variants.map((v) => {
      const rs = results.get(`${ch}/${v.label}`) ?? []
      return { label: v.label, gbps: median(rs.map((r) => r.gbps)), spread: spread(rs.map((r) => r.gbps)), senderCpuPerGiB: median(rs.map((r) => r.srcCpu)) / (size / GiB), receiverCpuPerGiB: median(rs.map((r) => r.dstCpu)) / (size / GiB), extra: rs.at(-1)?.extra, verified: rs.every((r) => r.ok) }
    }),
  }))
  if (values.json) {
    console.log(JSON.stringify({ title, sizeBytes: size, rows }))
    return
  }
  log(`\n${title}: ${(size / GiB).toFixed(2)} GiB, loopback TCP, medians of ${values.reps}`)
  log(`channels | ${variants.map((v) => `${v.label} GB/s`.padStart(18)).join(' | ')} | ${variants.map((v) => `${v.label} CPU s/GiB src/dst`.padStart(26)).join(' | ')} | ratio ${variants.at(-1)!.label}/${variants[0]!.label}`)
  for (const r of rows) {
    const [a, b] = [r.variants[0]!, r.variants.at(-1)!]
    log(`${String(r.channels).padStart(8)} | ${r.variants.map((v) => v.gbps.toFixed(2).padStart(18)).join(' | ')} | ${r.variants.map((v) => `${v.senderCpuPerGiB.toFixed(3)} / ${v.receiverCpuPerGiB.toFixed(3)}`.padStart(26)).join(' | ')} | ${(b.gbps / a.gbps).toFixed(2)}x throughput, ${(b.senderCpuPerGiB / a.senderCpuPerGiB).toFixed(2)}x sender CPU`)
  }
  log(`every transfer verified byte for byte: ${rows.every((r) => r.variants.every((v) => v.verified)) ? 'yes' : 'NO'}`)
}
