/** `multifd send` and `multifd recv`: image files over the network. */
import { z } from 'zod'
import { Destination } from '../destination.js'
import { RamBlock } from '../block.js'
import { Source } from '../source.js'
import { MultifdError } from '../errors.js'
import { Bandwidth, CompressionMethod, DEFAULT_CHANNELS, DEFAULT_PEER_TIMEOUT_MS, DEFAULT_TIMEOUT_MS, Integrity, LIMITS, ZeroPageDetection, compressionLevelsText, rangeText } from '../options.js'
import type { Session, Summary } from '../session.js'
import { IntIn, IntString, PeerTimeoutFlag, Rate, UsageError, blockFiles, check, parse } from './args.js'
import { bytes, rate } from './format.js'
import { type CommandResult, failure, print } from './output.js'
import { Progress } from './progress.js'
import { onInterrupt, wasInterrupted } from './interrupt.js'
import { Output, refuseOverlap } from './outputs.js'

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

/** The human summary's line for the non-default settings of a send. */
function settingLines(s: { integrity: string; maxBandwidth: number | null }, throttledMs: number): string[] {
  const parts = [
    ...(s.integrity === 'none' ? [] : [`integrity ${s.integrity} (every packet and block checked)`]),
    ...(s.maxBandwidth === null ? [] : [`max bandwidth ${rate(s.maxBandwidth)}, channels waited ${(throttledMs / 1000).toFixed(1)} s in all`]),
  ]
  return parts.length > 0 ? [parts.join('; ')] : []
}

export const SEND_HELP = `multifd send ADDRESS FILE... [--block NAME=FILE]... [options]

Sends image files (mapped, never read into the JavaScript heap) as blocks named after the
files, to a destination started with \`multifd recv\`.

  --channels N             parallel channels, ${rangeText(LIMITS.channels)} (default ${LIMITS.channels.default})
  --compression METHOD     ${LIMITS.compression.map((m) => m.name).join(' | ')} (default none)
  --level L                ${compressionLevelsText()}
  --zero-copy              MSG_ZEROCOPY sends (TCP only, no compression, no TLS)
  --zero-page MODE         multifd (zero pages as offsets only, default) | none
  --integrity MODE         xxh3 (digest of every packet's pages, checked by the destination,
                           and of every block at the end) | none (default)
  --max-bandwidth RATE     cap over all channels, bytes per second with binary units
                           (500M = 500 MiB/s; default: no cap)
  --connect-timeout-ms MS  how long connecting (and each TLS handshake) may take,
                           ${rangeText(LIMITS.timeoutMs)} (default ${DEFAULT_TIMEOUT_MS})
  --peer-timeout-ms MS     fail if the destination stalls or goes silent this long,
                           ${rangeText(LIMITS.peerTimeoutMs)} (default ${DEFAULT_PEER_TIMEOUT_MS}, 0 disables)
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
    integrity: { type: 'string' },
    'max-bandwidth': { type: 'string' },
    'connect-timeout-ms': { type: 'string' },
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
      integrity: Integrity.default('none'),
      'max-bandwidth': Rate.pipe(Bandwidth).optional(),
      'connect-timeout-ms': IntIn(LIMITS.timeoutMs).default(DEFAULT_TIMEOUT_MS),
      'peer-timeout-ms': PeerTimeoutFlag.optional(),
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
  // What the command was asked for, in the summary: scripts read back the settings they used.
  const settings = { compression: o.compression, integrity: o.integrity, maxBandwidth: o['max-bandwidth'] ?? null, connectTimeoutMs: o['connect-timeout-ms'], zeroCopy: o['zero-copy'] }
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
      integrity: o.integrity,
      ...(o['max-bandwidth'] === undefined ? {} : { maxBandwidth: o['max-bandwidth'] }),
      connectTimeoutMs: o['connect-timeout-ms'],
      ...(o['peer-timeout-ms'] === undefined ? {} : { peerTimeoutMs: o['peer-timeout-ms'] }),
      ...(tls ? { tls: { ...tls, ...(values['tls-name'] === undefined ? {} : { name: values['tls-name'] as string }) } } : {}),
    })
    progress = progressOf(source, json, 'sending', total)
    await source.sendAll()
    const s = await source.complete()
    progress.stop()
    const r = fromSummary(s, { blocks: specs, ...settings, throttledMs: Math.round(source.throttledMs) })
    print(r, json, 'send', [...settingLines(settings, source.throttledMs), ...channelLines(s)])
    return r
  } catch (e) {
    progress?.stop()
    // Options the library refuses before anything connects go to main as usage errors (exit 2);
    // a refusal the peer reports is a failed migration (exit 1).
    if (!source && e instanceof MultifdError && e.code === 'ERR_MULTIFD_INVALID_ARGUMENT' && !e.remote) throw e
    const r = source ? fromSummary(source.summary(), settings) : { ...failure(e, o.channels), ...settings }
    if (wasInterrupted()) r.status = 'cancelled'
    if (!r.error && e instanceof MultifdError) r.error = { code: e.code, message: e.message }
    print(r, json, 'send')
    return r
  }
}

export const RECV_HELP = `multifd recv ADDRESS (--out FILE... | --block NAME=FILE...) [options]

Listens on ADDRESS (tcp:HOST:PORT, port 0 picks one and prints it; or unix:PATH) for one
migration and writes each received block to a raw image file: --block maps a block name to a
file; --out files take the blocks in the order the source announces them. Each file is
written under a partial name beside it (.FILE.multifd-partial-PID), created only once the
source's block table is known and matched, and renamed into place when the migration
completes; on failure or cancel the partial files are removed and an existing FILE is
untouched. A device, or any FILE with --in-place, is written where it is ("complete": false in
the summary unless the migration completed).

  --channels N             expect exactly N channels, ${rangeText(LIMITS.channels)} (default: whatever the
                           source announces)
  --in-place               write the output files where they are, not under a partial name
  --channel-timeout-ms MS  how long the channels may take to connect, ${rangeText(LIMITS.timeoutMs)}
                           (default ${LIMITS.timeoutMs.default})
  --peer-timeout-ms MS     fail if the source stalls or goes silent this long,
                           ${rangeText(LIMITS.peerTimeoutMs)} (default ${DEFAULT_PEER_TIMEOUT_MS}, 0 disables)
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
    'in-place': { type: 'boolean' },
    'channel-timeout-ms': { type: 'string' },
    'peer-timeout-ms': { type: 'string' },
    ...TLS_FLAGS,
    'tls-allow': { type: 'string', multiple: true },
  })
  const tls = tlsFiles(values)
  const o = check(z.object({ channels: IntIn(LIMITS.channels).optional(), 'channel-timeout-ms': IntIn(LIMITS.timeoutMs).default(DEFAULT_TIMEOUT_MS), 'peer-timeout-ms': PeerTimeoutFlag.optional() }), values)
  const [address, ...extra] = positionals
  if (!address) throw new UsageError('recv needs an ADDRESS (tcp:HOST:PORT or unix:PATH)')
  if (extra.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}; output files go after --out`)
  const named = blockFiles(values.block as string[] | undefined, [])
  const outs = (values.out as string[] | undefined) ?? []
  if (named.length === 0 && outs.length === 0) throw new UsageError('recv needs --out FILE or --block NAME=FILE for the received blocks')
  refuseOverlap(tls ? [tls.cert, tls.key, tls.ca] : [], [...named.map((n) => n.file), ...outs])
  const json = values.json === true
  const inPlace = values['in-place'] === true
  const files: Array<{ name: string; file: string }> = []
  const outputs: Output[] = []
  const dest = Destination.listen({
    address,
    ...(o.channels === undefined ? {} : { channels: o.channels }),
    channelTimeoutMs: o['channel-timeout-ms'],
    ...(o['peer-timeout-ms'] === undefined ? {} : { peerTimeoutMs: o['peer-timeout-ms'] }),
    ...(tls ? { tls: { ...tls, ...(values['tls-allow'] === undefined ? {} : { allow: values['tls-allow'] as string[] }) } } : {}),
    blocks: (table) => {
      // The whole table is matched to files before any file is created.
      let next = 0
      for (const b of table) {
        const file = named.find((n) => n.name === b.name)?.file ?? outs[next++]
        if (!file) throw new MultifdError('ERR_MULTIFD_BLOCK_MISMATCH', `no output file for block ${JSON.stringify(b.name)}: give --block ${b.name}=FILE or another --out`)
        if (files.some((f) => f.name === b.name)) throw new MultifdError('ERR_MULTIFD_DUPLICATE_BLOCK', `the source announces block ${JSON.stringify(b.name)} twice`)
        files.push({ name: b.name, file })
      }
      outputs.push(...files.map((f) => Output.plan(f.file, { inPlace })))
      return table.map((b, i) => RamBlock.mapFile({ name: b.name, path: outputs[i]!.create().writePath, size: b.length, pageSize: b.pageSize }))
    },
  })
  process.stderr.write(`listening on ${dest.address}\n`)
  // Connections turned away (never fatal) and anything else that degraded, as they happen.
  dest.on('warning', (w) => process.stderr.write(`warning: ${w.code}: ${w.message}\n`))
  onInterrupt(() => dest.close())
  let progress: Progress | undefined
  dest.once('state', () => (progress = progressOf(dest, json, 'receiving')))
  try {
    const s = await dest.done
    progress?.stop()
    const complete = s.status === 'completed'
    for (const out of outputs) {
      if (complete) out.commit()
      else out.discard()
    }
    const rejected = dest.stats().rejectedConnections
    const r = fromSummary(s, { address: dest.address, files, complete, rejectedConnections: rejected })
    print(r, json, 'recv', [...files.map((f) => `${f.name} -> ${f.file}`), ...channelLines(s), ...(rejected > 0 ? [`rejected ${rejected} connection(s) that did not identify themselves as this session's`] : [])])
    return r
  } catch {
    for (const out of outputs) out.discard()
    progress?.stop()
    const r = fromSummary(dest.summary(), { address: dest.address, complete: false, rejectedConnections: dest.stats().rejectedConnections })
    if (wasInterrupted()) r.status = 'cancelled'
    print(r, json, 'recv', outputs.some((o) => o.inPlace) ? ['outputs written in place are incomplete'] : [])
    return r
  }
}
