/** `multifd send` and `multifd recv`: image files over the network. */
import { z } from 'zod'
import { Destination } from '../destination.js'
import { RamBlock } from '../block.js'
import { Source } from '../source.js'
import { MultifdError } from '../errors.js'
import { CompressionMethod, DEFAULT_CHANNELS, DEFAULT_TIMEOUT_MS, LIMITS, ZeroPageDetection, compressionLevelsText, rangeText } from '../options.js'
import type { Session, Summary } from '../session.js'
import { IntIn, IntString, UsageError, blockFiles, check, parse } from './args.js'
import { bytes, rate } from './format.js'
import { type CommandResult, failure, print } from './output.js'
import { Progress } from './progress.js'
import { onInterrupt, wasInterrupted } from './interrupt.js'

function fromSummary(s: Summary, extra: Record<string, unknown> = {}): CommandResult {
  return { status: s.status, bytes: s.bytes, seconds: s.seconds, bytesPerSecond: s.bytesPerSecond, channels: s.channels, pages: s.pages, ...(s.error ? { error: s.error } : {}), perChannel: s.perChannel, ...(s.tls ? { tls: s.tls } : {}), ...extra }
}

function channelLines(s: Summary): string[] {
  const raw = s.pages.normal * 4096
  return [
    ...(s.tls ? [`tls: ${s.tls.protocol}, ${s.tls.cipherSuite}${s.tls.peer ? `, peer ${s.tls.peer.subject}` : ''}`] : []),
    `wire: ${bytes(s.bytes)}${raw > 0 ? `, ${(raw / Math.max(1, s.bytes)).toFixed(2)}x compression of the data pages` : ''}`,
    ...s.perChannel.map((c, i) => `channel ${i}: ${bytes(c.bytes)} in ${c.packets} packets (${rate(s.seconds > 0 ? c.bytes / s.seconds : 0)})`),
  ]
}

function progressOf(session: Session, json: boolean, label: string, total?: number): Progress {
  return new Progress(!json, () => {
    const st = session.stats()
    return { done: st.bytes, ...(total === undefined ? {} : { total }), channels: st.channels.map((c) => c.bytes), label }
  }).start()
}

export const SEND_HELP = `multifd send ADDRESS FILE... [--block NAME=FILE]... [options]

Sends image files (mapped, never read into the JavaScript heap) as blocks named after the
files, to a destination started with \`multifd recv\`.

  --channels N             parallel channels, ${rangeText(LIMITS.channels)} (default ${LIMITS.channels.default})
  --compression METHOD     ${LIMITS.compression.map((m) => m.name).join(' | ')} (default none)
  --level L                ${compressionLevelsText()}
  --zero-copy              MSG_ZEROCOPY sends (TCP only, no compression, no TLS)
  --zero-page MODE         multifd (zero pages as offsets only, default) | none
  --peer-timeout-ms MS     fail if the destination stalls or goes silent this long
                           (${rangeText(LIMITS.peerTimeoutMs)})
  --tls-cert FILE          mutual TLS: this side's certificate (PEM); needs --tls-key, --tls-ca
  --tls-key FILE           the certificate's private key (PEM)
  --tls-ca FILE            the CA that signed the destination's certificate (PEM)
  --tls-name NAME          the name the destination's certificate must carry
                           (default: the host in ADDRESS)
  --json                   print one JSON object at the end, nothing else on stdout`

const TLS_FLAGS = {
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  'tls-ca': { type: 'string' },
} as const

/** `--tls-cert/--tls-key/--tls-ca`: all three or none. */
function tlsFiles(values: Record<string, unknown>): { cert: string; key: string; ca: string } | undefined {
  const [cert, key, ca] = (['tls-cert', 'tls-key', 'tls-ca'] as const).map((f) => values[f] as string | undefined)
  if (cert === undefined && key === undefined && ca === undefined) {
    if (values['tls-name'] !== undefined || values['tls-allow'] !== undefined) throw new UsageError('--tls-name and --tls-allow need --tls-cert, --tls-key and --tls-ca')
    return undefined
  }
  if (cert === undefined || key === undefined || ca === undefined) throw new UsageError('TLS needs all of --tls-cert, --tls-key and --tls-ca')
  return { cert, key, ca }
}

export async function send(argv: string[]): Promise<CommandResult> {
  const { values, positionals } = parse(argv, {
    block: { type: 'string', multiple: true },
    channels: { type: 'string' },
    compression: { type: 'string' },
    level: { type: 'string' },
    'zero-copy': { type: 'boolean' },
    'zero-page': { type: 'string' },
    'peer-timeout-ms': { type: 'string' },
    ...TLS_FLAGS,
    'tls-name': { type: 'string' },
  })
  const tls = tlsFiles(values)
  const o = check(
    z.object({
      channels: IntIn(LIMITS.channels).default(DEFAULT_CHANNELS),
      compression: CompressionMethod.default('none'),
      // Each method's levels, and which options combine, are checked with the source options.
      level: IntString(0, 0xffff_ffff).optional(),
      'zero-copy': z.boolean().default(false),
      'zero-page': ZeroPageDetection.default('multifd'),
      'peer-timeout-ms': IntIn(LIMITS.peerTimeoutMs).optional(),
    }),
    values,
  )
  const [address, ...files] = positionals
  if (!address) throw new UsageError('send needs an ADDRESS (tcp:HOST:PORT or unix:PATH)')
  const specs = blockFiles(values.block as string[] | undefined, files)
  if (specs.length === 0) throw new UsageError('send needs at least one FILE (or --block NAME=FILE)')
  const json = values.json === true
  const blocks = specs.map((s) => RamBlock.mapFile({ name: s.name, path: s.file }))
  const total = blocks.reduce((a, b) => a + b.size, 0)
  let source: Source | undefined
  onInterrupt(() => source?.cancel())
  let progress: Progress | undefined
  try {
    source = await Source.connect({
      address,
      blocks,
      channels: o.channels,
      compression: o.compression,
      ...(o.level === undefined ? {} : { compressionLevel: o.level }),
      zeroCopySend: o['zero-copy'],
      zeroPageDetection: o['zero-page'],
      ...(o['peer-timeout-ms'] === undefined ? {} : { peerTimeoutMs: o['peer-timeout-ms'] }),
      ...(tls ? { tls: { ...tls, ...(values['tls-name'] === undefined ? {} : { name: values['tls-name'] as string }) } } : {}),
    })
    progress = progressOf(source, json, 'sending', total)
    await source.sendAll()
    const s = await source.complete()
    progress.stop()
    const r = fromSummary(s, { blocks: specs })
    print(r, json, 'send', channelLines(s))
    return r
  } catch (e) {
    progress?.stop()
    // Options the library refuses (ranges, methods, combinations) are usage errors.
    if (!source && e instanceof MultifdError && e.code === 'ERR_MULTIFD_INVALID_ARGUMENT') throw new UsageError(e.message)
    const r = source ? fromSummary(source.summary()) : failure(e, o.channels)
    if (wasInterrupted()) r.status = 'cancelled'
    if (!r.error && e instanceof MultifdError) r.error = { code: e.code, message: e.message }
    print(r, json, 'send')
    return r
  }
}

export const RECV_HELP = `multifd recv ADDRESS (--out FILE... | --block NAME=FILE...) [options]

Listens on ADDRESS (tcp:HOST:PORT, port 0 picks one and prints it; or unix:PATH) for one
migration and writes each received block to a raw image file: --block maps a block name to a
file; --out files take the blocks in the order the source announces them.

  --channels N             expect exactly N channels, ${rangeText(LIMITS.channels)} (default: whatever the
                           source announces)
  --channel-timeout-ms MS  how long the channels may take to connect, ${rangeText(LIMITS.timeoutMs)}
                           (default ${LIMITS.timeoutMs.default})
  --peer-timeout-ms MS     fail if the source stalls or goes silent this long
                           (${rangeText(LIMITS.peerTimeoutMs)})
  --tls-cert FILE          mutual TLS: this side's certificate (PEM); needs --tls-key, --tls-ca
  --tls-key FILE           the certificate's private key (PEM)
  --tls-ca FILE            the CA that signed the source's certificate (PEM)
  --tls-allow IDENTITY     admit only this source identity: certificate subject
                           (CN=...,O=...), common name or alternative name (repeatable)
  --json                   print one JSON object at the end, nothing else on stdout`

export async function recv(argv: string[]): Promise<CommandResult> {
  const { values, positionals } = parse(argv, {
    out: { type: 'string', multiple: true },
    block: { type: 'string', multiple: true },
    channels: { type: 'string' },
    'channel-timeout-ms': { type: 'string' },
    'peer-timeout-ms': { type: 'string' },
    ...TLS_FLAGS,
    'tls-allow': { type: 'string', multiple: true },
  })
  const tls = tlsFiles(values)
  const o = check(z.object({ channels: IntIn(LIMITS.channels).optional(), 'channel-timeout-ms': IntIn(LIMITS.timeoutMs).default(DEFAULT_TIMEOUT_MS), 'peer-timeout-ms': IntIn(LIMITS.peerTimeoutMs).optional() }), values)
  const [address, ...extra] = positionals
  if (!address) throw new UsageError('recv needs an ADDRESS (tcp:HOST:PORT or unix:PATH)')
  if (extra.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}; output files go after --out`)
  const named = blockFiles(values.block as string[] | undefined, [])
  const outs = (values.out as string[] | undefined) ?? []
  if (named.length === 0 && outs.length === 0) throw new UsageError('recv needs --out FILE or --block NAME=FILE for the received blocks')
  const json = values.json === true
  const files: Array<{ name: string; file: string }> = []
  const dest = Destination.listen({
    address,
    ...(o.channels === undefined ? {} : { channels: o.channels }),
    channelTimeoutMs: o['channel-timeout-ms'],
    ...(o['peer-timeout-ms'] === undefined ? {} : { peerTimeoutMs: o['peer-timeout-ms'] }),
    ...(tls ? { tls: { ...tls, ...(values['tls-allow'] === undefined ? {} : { allow: values['tls-allow'] as string[] }) } } : {}),
    blocks: (table) => {
      let next = 0
      return table.map((b) => {
        const file = named.find((n) => n.name === b.name)?.file ?? outs[next++]
        if (!file) throw new MultifdError('ERR_MULTIFD_BLOCK_MISMATCH', `no output file for block ${JSON.stringify(b.name)}: give --block ${b.name}=FILE or another --out`)
        files.push({ name: b.name, file })
        return RamBlock.mapFile({ name: b.name, path: file, size: b.length, pageSize: b.pageSize })
      })
    },
  })
  process.stderr.write(`listening on ${dest.address}\n`)
  onInterrupt(() => dest.close())
  let progress: Progress | undefined
  dest.once('state', () => (progress = progressOf(dest, json, 'receiving')))
  try {
    const s = await dest.done
    progress?.stop()
    const r = fromSummary(s, { address: dest.address, files })
    print(r, json, 'recv', [...files.map((f) => `${f.name} -> ${f.file}`), ...channelLines(s)])
    return r
  } catch {
    progress?.stop()
    const r = fromSummary(dest.summary(), { address: dest.address })
    if (wasInterrupted()) r.status = 'cancelled'
    print(r, json, 'recv')
    return r
  }
}
