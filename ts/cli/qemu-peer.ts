/** `multifd recv --qemu` and `multifd send --qemu`: stock QEMU 10 as the peer. */
import { z } from 'zod'
import { QemuReceiver, QemuSender, type QemuPeerChannel, type QemuPeerProgress } from '../qemu-peer.js'
import { IntString, UsageError, check, parse } from './args.js'
import { bytes, rate } from './format.js'
import { type CommandResult, failure, print } from './output.js'
import { Progress } from './progress.js'
import { onInterrupt, wasInterrupted } from './interrupt.js'

export const RECV_QEMU_HELP = `multifd recv --qemu ADDRESS (--to FILE | --out DIR) [options]

A migration destination for a stock QEMU 10 source: run \`migrate tcp:HOST:PORT\` in QEMU
(multifd on, any multifd-channels, compression none, zlib or zstd). Writes a QEMU migration
file in the mapped-ram layout that QEMU restores with the mapped-ram capability and
\`migrate-incoming file:FILE\` (with or without multifd).

  --to FILE                the QEMU file; it appears only when complete (written beside it
                           under a temporary name, removed on failure)
  --out DIR                also (or instead) one raw image per RAM block
  --channels N             the source's multifd-channels (default: those connected by its
                           first flush)
  --peer-timeout-ms MS     fail if QEMU goes silent this long (default 60000)
  --json                   print one JSON object at the end, nothing else on stdout`

export const SEND_QEMU_HELP = `multifd send --qemu FILE ADDRESS [options]

Plays a QEMU mapped-ram migration file (QEMU's own \`migrate file:\` save with mapped-ram,
or one \`recv --qemu\` wrote) into a stock QEMU 10 destination started with
\`-incoming\` (or \`migrate-incoming tcp:...\`) and the multifd capability.

  --channels N             the destination's multifd-channels (default 2)
  --compression METHOD     the destination's multifd-compression: none | zlib | zstd
  --level L                zlib 1..9, zstd 1..20 (default 1)
  --connect-timeout-ms MS  (default 10000)
  --peer-timeout-ms MS     fail if the destination stops reading this long (default 60000)
  --json                   print one JSON object at the end, nothing else on stdout`

function pagesOf(per: QemuPeerChannel[]): { normal: number; zero: number } {
  return { normal: per.reduce((a, c) => a + c.normalPages, 0), zero: per.reduce((a, c) => a + c.zeroPages, 0) }
}

function progressOf(sample: () => QemuPeerProgress, json: boolean, label: string): Progress {
  return new Progress(!json, () => {
    const p = sample()
    return { done: p.bytes, ...(p.total > 0 ? { total: p.total } : {}), channels: p.channels, label }
  }).start()
}

function channelLines(per: QemuPeerChannel[], seconds: number): string[] {
  return per.map((c, i) => `channel ${i}: ${bytes(c.bytes)} in ${c.packets} packets, ${c.syncs} syncs (${rate(seconds > 0 ? c.bytes / seconds : 0)})`)
}

function failed(e: unknown, channels: number, extra: Record<string, unknown>): CommandResult {
  const r = { ...failure(e, channels), ...extra }
  if (wasInterrupted()) r.status = 'cancelled'
  return r
}

export async function recvQemu(argv: string[]): Promise<CommandResult> {
  const { values, positionals } = parse(argv, { qemu: { type: 'string' }, to: { type: 'string' }, out: { type: 'string' }, channels: { type: 'string' }, 'peer-timeout-ms': { type: 'string' } })
  const o = check(
    z.object({
      qemu: z.string({ error: 'recv --qemu needs an ADDRESS (tcp:HOST:PORT)' }),
      to: z.string().min(1).optional(),
      out: z.string().min(1).optional(),
      channels: IntString(1, 255).optional(),
      'peer-timeout-ms': IntString(100, 3_600_000).default(60_000),
    }),
    values,
  )
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[0])}`)
  if (o.to === undefined && o.out === undefined) throw new UsageError('recv --qemu needs --to FILE (a QEMU file) or --out DIR (raw images)')
  const json = values.json === true
  // Options the library refuses throw ERR_MULTIFD_INVALID_ARGUMENT: main reports it as a usage error.
  const rx = QemuReceiver.listen({ address: o.qemu, ...(o.to ? { to: o.to } : {}), ...(o.out ? { outDir: o.out } : {}), ...(o.channels ? { channels: o.channels } : {}), peerTimeoutMs: o['peer-timeout-ms'] })
  process.stderr.write(`listening on ${rx.address} for a QEMU source (migrate ${rx.address})\n`)
  onInterrupt(() => rx.cancel())
  const progress = progressOf(() => rx.progress(), json, 'receiving from QEMU')
  try {
    const s = await rx.done
    progress.stop()
    const wire = s.mainBytes + s.perChannel.reduce((a, c) => a + c.bytes, 0)
    const ram = s.blocks.reduce((a, b) => a + b.length, 0)
    const r: CommandResult = {
      status: 'completed',
      bytes: wire,
      seconds: s.seconds,
      bytesPerSecond: s.seconds > 0 ? wire / s.seconds : 0,
      channels: s.perChannel.length,
      pages: { normal: pagesOf(s.perChannel).normal + s.mainPages, zero: pagesOf(s.perChannel).zero + s.mainZeroPages },
      perChannel: s.perChannel,
      address: rx.address,
      ...(o.to ? { to: o.to } : {}),
      ...(o.out ? { out: o.out } : {}),
      machine: s.machine,
      compression: s.compression,
      ramBytes: ram,
      blocks: s.blocks,
      flushes: s.flushes,
      mainBytes: s.mainBytes,
      deviceStateBytes: s.deviceStateBytes,
    }
    print(r, json, 'recv --qemu', [
      `${s.machine}: ${bytes(ram)} of RAM in ${s.blocks.length} blocks, ${s.flushes} sync rounds, ${bytes(s.deviceStateBytes)} of device state, compression ${s.compression}`,
      ...(o.to ? [`QEMU file: ${o.to} (restore: migrate-set-capabilities mapped-ram on, migrate-incoming file:${o.to})`] : []),
      ...(o.out ? [`raw images in ${o.out}`] : []),
      ...channelLines(s.perChannel, s.seconds),
    ])
    return r
  } catch (e) {
    progress.stop()
    const r = failed(e, o.channels ?? 0, { address: rx.address, ...(o.to ? { to: o.to } : {}) })
    print(r, json, 'recv --qemu')
    return r
  }
}

export async function sendQemu(argv: string[]): Promise<CommandResult> {
  const { values, positionals } = parse(argv, {
    qemu: { type: 'string' },
    channels: { type: 'string' },
    compression: { type: 'string' },
    level: { type: 'string' },
    'connect-timeout-ms': { type: 'string' },
    'peer-timeout-ms': { type: 'string' },
  })
  const o = check(
    z.object({
      qemu: z.string({ error: 'send --qemu needs the QEMU FILE' }).min(1),
      channels: IntString(1, 255).default(2),
      compression: z.enum(['none', 'zlib', 'zstd']).default('none'),
      level: IntString(1, 20).optional(),
      'connect-timeout-ms': IntString(1, 3_600_000).default(10_000),
      'peer-timeout-ms': IntString(100, 3_600_000).default(60_000),
    }),
    values,
  )
  const [address, ...extra] = positionals
  if (!address) throw new UsageError('send --qemu FILE needs the destination ADDRESS (tcp:HOST:PORT)')
  if (extra.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}`)
  const json = values.json === true
  const tx = QemuSender.start({ file: o.qemu, address, channels: o.channels, compression: o.compression, ...(o.level === undefined ? {} : { level: o.level }), connectTimeoutMs: o['connect-timeout-ms'], peerTimeoutMs: o['peer-timeout-ms'] })
  onInterrupt(() => tx.cancel())
  const progress = progressOf(() => tx.progress(), json, 'sending to QEMU')
  try {
    const s = await tx.done
    progress.stop()
    const wire = s.mainBytes + s.perChannel.reduce((a, c) => a + c.bytes, 0)
    const r: CommandResult = {
      status: 'completed',
      bytes: wire,
      seconds: s.seconds,
      bytesPerSecond: s.seconds > 0 ? wire / s.seconds : 0,
      channels: s.perChannel.length,
      pages: pagesOf(s.perChannel),
      perChannel: s.perChannel,
      file: o.qemu,
      address,
      machine: s.machine,
      compression: o.compression,
      blocks: s.blocks,
      mainBytes: s.mainBytes,
      deviceStateBytes: s.deviceStateBytes,
    }
    print(r, json, 'send --qemu', [`${s.machine}: ${s.blocks.length} blocks and ${bytes(s.deviceStateBytes)} of device state to ${address}`, ...channelLines(s.perChannel, s.seconds)])
    return r
  } catch (e) {
    progress.stop()
    const r = failed(e, o.channels, { file: o.qemu, address })
    print(r, json, 'send --qemu')
    return r
  }
}
