/** `multifd bench`: a loopback self-benchmark in this process (both sides, real sockets). */
import { randomFillSync } from 'node:crypto'
import { z } from 'zod'
import { LIMITS, rangeText } from '../options.js'
import { RamBlock } from '../block.js'
import { Destination } from '../destination.js'
import { migrate } from '../migrate.js'
import { check, parse, Size, UsageError } from './args.js'
import { bytes, rate } from './format.js'
import type { CommandResult } from './output.js'

export const BENCH_HELP = `multifd bench [--size 1G] [--channels 1,2,4] [--json]

Moves --size bytes of random data over loopback TCP at each channel count, both sides in this
process (destination memory preallocated), and prints the throughput. For comparisons against
QEMU and other baselines see bench/loopback in the repository.`

export async function bench(argv: string[]): Promise<CommandResult> {
  const { values, positionals } = parse(argv, { size: { type: 'string' }, channels: { type: 'string' } })
  if (positionals.length > 0) throw new UsageError(`bench takes no arguments, got ${JSON.stringify(positionals[0])}`)
  const o = check(
    z.object({
      size: Size.default(2 ** 30),
      channels: z
        .string()
        .regex(/^\d+(,\d+)*$/, { error: 'channels is a list like 1,2,4' })
        .transform((s) => s.split(',').map(Number))
        .refine((l) => l.every((n) => n >= LIMITS.channels.min && n <= LIMITS.channels.max), { error: `each channel count is ${rangeText(LIMITS.channels)}` })
        .default([1, 2, 4]),
    }),
    values,
  )
  const size = Math.ceil(o.size / 4096) * 4096
  const json = values.json === true
  const src = RamBlock.allocate({ name: 'bench', size, prefault: true })
  for (let off = 0; off < size; off += 2 ** 30) randomFillSync(src.view(off, Math.min(2 ** 30, size - off)))
  const runs = []
  for (const channels of o.channels) {
    const dst = RamBlock.allocate({ name: 'bench', size, prefault: true })
    const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [dst] })
    const s = await migrate({ address: dest.address, blocks: [src], channels })
    await dest.done
    runs.push({ channels, bytes: s.bytes, seconds: s.seconds, bytesPerSecond: s.bytesPerSecond })
    if (!json) process.stdout.write(`${String(channels).padStart(3)} channel(s): ${rate(s.bytesPerSecond)} (${bytes(s.bytes)} in ${s.seconds.toFixed(3)} s)\n`)
  }
  const best = runs.reduce((a, r) => (r.bytesPerSecond > a.bytesPerSecond ? r : a))
  const result: CommandResult = { status: 'completed', bytes: best.bytes, seconds: best.seconds, bytesPerSecond: best.bytesPerSecond, channels: best.channels, pages: { normal: size / 4096, zero: 0 }, runs }
  if (json) process.stdout.write(JSON.stringify(result) + '\n')
  return result
}
