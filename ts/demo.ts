/**
 * `npm run demo`: a real multifd migration on loopback. A block of random data (with some
 * zero pages) moves over several channels while progress is shown; then three dirty rounds
 * with syncs, completion, and a byte-for-byte check of the destination.
 *
 *   npm run demo -- [--size 1G] [--channels 4] [--json]
 */
import { createHash, randomFillSync, randomInt } from 'node:crypto'
import { parseArgs } from 'node:util'
import { Destination, RamBlock, Source, type Summary } from './index.js'

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1G' },
    channels: { type: 'string', default: '4' },
    json: { type: 'boolean', default: false },
  },
})
const units: Record<string, number> = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30 }
const m = /^(\d+)([KMG]?)$/i.exec(values.size!)
if (!m) throw new Error(`--size must look like 512M or 1G, got ${values.size}`)
const size = Number(m[1]) * (units[m[2]!.toUpperCase()] ?? 1)
const channels = Number(values.channels)
const out = (s: string): void => {
  if (!values.json) process.stdout.write(s)
}
const gb = (n: number): string => `${(n / 1e9).toFixed(2)} GB`
const hash = (b: RamBlock): string => {
  const h = createHash('sha256')
  for (let off = 0; off < b.size; off += 2 ** 30) h.update(b.view(off, Math.min(2 ** 30, b.size - off)))
  return h.digest('hex')
}

out(`preparing ${gb(size)} of random data (every 8th page zero)...\n`)
const src = RamBlock.allocate({ name: 'demo.ram', size, prefault: true })
for (let off = 0; off < size; off += 2 ** 30) randomFillSync(src.view(off, Math.min(2 ** 30, size - off)))
for (let off = 0; off < size; off += 8 * 4096) src.view(off, 4096).fill(0)
const dst = RamBlock.allocate({ name: 'demo.ram', size, prefault: true })

const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })
const source = await Source.connect({ address: dest.address, blocks: [src], channels })
out(`destination listening on ${dest.address}; source connected with ${channels} channels\n`)

const progress = setInterval(() => {
  const s = source.stats()
  const per = s.channels.map((c) => (c.bytes / 2 ** 20).toFixed(0).padStart(5)).join(' ')
  out(`\r  ${gb(s.bytes)} of ${gb(size)}  ${(s.bytesPerSecond / 1e9).toFixed(2)} GB/s  channels MiB:${per}   `)
}, 100)
process.on('SIGINT', () => void source.cancel())

await source.sendAll()
await source.sync()
clearInterval(progress)
out(`\r  round 0: all ${size / 4096} pages sent and synced                                        \n`)
for (let round = 1; round <= 3; round++) {
  source.markRound()
  for (let i = 0; i < 1000; i++) src.write(randomInt(size / 4096) * 4096, randomFillSync(Buffer.alloc(64)))
  const pages = await source.sendDirty()
  const epoch = await source.sync()
  out(`  round ${round}: ${pages} dirty pages re-sent, sync ${epoch} passed on both sides\n`)
}
const summary: Summary = await source.complete()
await dest.done
const verified = hash(src) === hash(dst)
if (values.json) {
  console.log(JSON.stringify({ ...summary, verified }))
} else {
  out(`\ncompleted: ${gb(summary.bytes)} on the wire in ${summary.seconds.toFixed(2)} s = ${(summary.bytesPerSecond / 1e9).toFixed(2)} GB/s\n`)
  out(`pages: ${summary.pages.normal} normal, ${summary.pages.zero} zero (sent as offsets only), ${summary.syncs} syncs\n`)
  for (const [i, c] of summary.perChannel.entries()) out(`  channel ${i}: ${gb(c.bytes)}, ${c.packets} packets\n`)
  out(`destination equals source (sha256): ${verified ? 'yes' : 'NO'}\n`)
}
if (!verified) process.exitCode = 1
