/** `multifd send` and `multifd recv`: image files over the network. */
import { setTimeout as delay } from 'node:timers/promises'
import { z } from 'zod'
import { Destination, type DestinationOptions } from '../destination.js'
import type { DurablePieces } from '../resume.js'
import { type Journal, resumePlan } from './journal.js'
import { RamBlock } from '../block.js'
import { Source, type SourceOptions } from '../source.js'
import { MultifdError } from '../errors.js'
import { Bandwidth, CompressionMethod, DEFAULT_CHANNEL_RETRIES, DEFAULT_CHANNELS, DEFAULT_PEER_TIMEOUT_MS, DEFAULT_RESUME_WINDOW_MS, DEFAULT_TIMEOUT_MS, Integrity, LIMITS, ZeroPageDetection, compressionLevelsText, rangeText } from '../options.js'
import type { Session, Summary } from '../session.js'
import { IntIn, IntString, PeerTimeoutFlag, Rate, UsageError, blockFiles, check, parse } from './args.js'
import { bytes, rate } from './format.js'
import { type CommandResult, failure, print } from './output.js'
import { Progress } from './progress.js'
import { onInterrupt, wasInterrupted } from './interrupt.js'
import { Output } from '../outputs.js'
import { refuseOverlap } from './outputs.js'

function fromSummary(s: Summary, extra: Record<string, unknown> = {}): CommandResult {
  return { status: s.status, bytes: s.bytes, seconds: s.seconds, bytesPerSecond: s.bytesPerSecond, channels: s.channels, pages: s.pages, ...(s.error ? { error: s.error } : {}), perChannel: s.perChannel, recoveries: s.recoveries, ...(s.tls ? { tls: s.tls } : {}), ...extra }
}

/** One line per repaired connection. */
function recoveryLines(s: Summary): string[] {
  return s.recoveries.map((r) => `recovered ${r.connection === 'control' ? 'the control connection' : `channel ${r.connection}`} in ${Math.round(r.ms)} ms after ${r.cause.code} (${r.pagesResent} page(s) sent again)`)
}

function channelLines(s: Summary): string[] {
  const raw = s.pages.normal * 4096
  return [
    ...(s.tls ? [`tls: ${s.tls.protocol}, ${s.tls.cipherSuite}${s.tls.peer ? `, peer ${s.tls.peer.subject}` : ''}`] : []),
    `wire: ${bytes(s.bytes)}${raw > 0 ? `, ${(raw / Math.max(1, s.bytes)).toFixed(2)}x compression of the data pages` : ''}`,
    ...s.perChannel.map((c, i) => `channel ${i}: ${bytes(c.bytes)} in ${c.packets} packets (${rate(s.seconds > 0 ? c.bytes / s.seconds : 0)})${c.state === 'up' ? '' : `, ${c.state}`}`),
    ...recoveryLines(s),
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

/**
 * A one-shot send syncs after every this many bytes, so a destination's resume journal
 * (`recv --resume`) advances as the transfer goes and a kill loses at most about this much.
 * A sync costs a round trip, overlapped with the next group's pages: at 1 GB/s, 64 MiB is
 * 64 ms of sending, so even a 10 ms round trip stays hidden, while a 64 GiB block still
 * needs only 1024 syncs.
 */
const SYNC_EVERY_BYTES = 64 * 1024 * 1024

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
  --channel-retries N      redials of a channel whose connection breaks, 50 ms apart and
                           doubling up to 2 s; the replacement sends again what the channel sent
                           since the last acknowledged sync, ${rangeText(LIMITS.channelRetries)}
                           (default ${DEFAULT_CHANNEL_RETRIES}, 0 fails at the first broken connection)
  --min-channels N         channels that must remain: one that cannot be redialled is given
                           up (a warning; its pages go on the others) only above this,
                           1..channels (default 1)
  --tls-cert FILE          mutual TLS: this side's certificate (PEM); needs --tls-key, --tls-ca
  --tls-key FILE           the certificate's private key (PEM)
  --tls-ca FILE            the CA that signed the destination's certificate (PEM)
  --tls-name NAME          the name the destination's certificate must carry
                           (default: the host in ADDRESS)
  --resume                 ask the destination (recv --resume) which 1 MiB pieces it already
                           holds and send only the rest: a piece is skipped only when its
                           xxh3 digest there equals this side's, so a changed FILE is still
                           copied correctly ("resumedBytes" in the summary). When the
                           destination goes away (its process killed, the connection cut),
                           new sessions are tried until one completes or the window passes
  --resume-window-ms MS    with --resume: how long to keep trying new sessions after the
                           destination went away, ${rangeText(LIMITS.resumeWindowMs)} (default ${DEFAULT_RESUME_WINDOW_MS}; 0: fail at once)
  --json                   print one JSON object at the end, nothing else on stdout

A send syncs after every 64 MiB, so a destination with --resume loses little to a kill.`

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
    'channel-retries': { type: 'string' },
    'min-channels': { type: 'string' },
    ...TLS_FLAGS,
    'tls-name': { type: 'string' },
    resume: { type: 'boolean' },
    'resume-window-ms': { type: 'string' },
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
      'channel-retries': IntIn(LIMITS.channelRetries).default(DEFAULT_CHANNEL_RETRIES),
      // At most --channels: checked with the source options.
      'min-channels': IntIn(LIMITS.channels).default(1),
      'resume-window-ms': IntIn(LIMITS.resumeWindowMs).default(DEFAULT_RESUME_WINDOW_MS),
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
  const resume = values.resume === true
  const settings: SendSettings = { compression: o.compression, integrity: o.integrity, maxBandwidth: o['max-bandwidth'] ?? null, connectTimeoutMs: o['connect-timeout-ms'], zeroCopy: o['zero-copy'], resume }
  const options: SourceOptions = {
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
    channelRetries: o['channel-retries'],
    minChannels: o['min-channels'],
    ...(tls ? { tls: { ...tls, ...(values['tls-name'] === undefined ? {} : { name: values['tls-name'] as string }) } } : {}),
    resume,
  }
  // With --resume, a session that fails because the destination went away is followed by new
  // ones (a receiver restarted with --resume continues its journal), for up to the window.
  const window = resume ? o['resume-window-ms'] : 0
  const giveUp = performance.now() + window
  const stop = new AbortController()
  let pause = RETRY_FIRST_MS
  for (;;) {
    const attempt = await sendOnce(options, specs, json, total, settings, stop)
    const left = giveUp - performance.now()
    if (!attempt.retry || wasInterrupted() || left <= 0) {
      print(attempt.result, json, 'send', attempt.lines)
      return attempt.result
    }
    const e = attempt.result.error
    process.stderr.write(`session ended (${e ? `${e.code}: ${e.message}` : attempt.result.status}); trying a new session on ${address} for up to ${Math.round(left)} ms more (Ctrl-C stops)\n`)
    try {
      await delay(Math.min(pause, left), undefined, { signal: stop.signal })
    } catch {
      // Interrupted while waiting: the loop ends with the last session's result.
    }
    pause = Math.min(pause * 2, RETRY_MAX_MS)
  }
}

/** What a send was asked for, in its summary: scripts read back the settings they used. */
type SendSettings = {
  compression: string
  integrity: string
  maxBandwidth: number | null
  connectTimeoutMs: number
  zeroCopy: boolean
  resume: boolean
}

/** The first wait before a new session, doubled after each failed one up to RETRY_MAX_MS. */
const RETRY_FIRST_MS = 50
const RETRY_MAX_MS = 2000

/** Failures a new session may mend: the destination (its process or the network) went away. */
const RETRIED_CODES = new Set(['ERR_MULTIFD_CONNECTION_CLOSED', 'ERR_MULTIFD_TIMEOUT', 'ERR_MULTIFD_IO'])

/** One session of `send`: connects, sends everything (the rest, with resume) and completes. */
async function sendOnce(options: SourceOptions, specs: Array<{ name: string; file: string }>, json: boolean, total: number, settings: SendSettings, stop: AbortController): Promise<{ result: CommandResult; lines: string[]; retry: boolean }> {
  let source: Source | undefined
  onInterrupt(() => {
    stop.abort()
    return source?.cancel()
  })
  let progress: Progress | undefined
  try {
    source = await Source.connect(options)
    progress = progressOf(source, json, 'sending', total - source.resumedBytes)
    await source.sendAll({ syncEveryBytes: SYNC_EVERY_BYTES })
    const s = await source.complete()
    progress.stop()
    const resume = options.resume === true
    const result = fromSummary(s, { blocks: specs, ...settings, throttledMs: Math.round(source.throttledMs), ...(resume ? { resumedBytes: source.resumedBytes } : {}) })
    const resumed = resume ? [`resumed: ${bytes(source.resumedBytes)} of ${bytes(total)} the destination already held (equal digests) were not sent again`] : []
    return { result, lines: [...resumed, ...settingLines(settings, source.throttledMs), ...channelLines(s)], retry: false }
  } catch (e) {
    progress?.stop()
    // Options the library refuses before anything connects go to main as usage errors (exit 2);
    // a refusal the peer reports is a failed migration (exit 1).
    if (!source && e instanceof MultifdError && e.code === 'ERR_MULTIFD_INVALID_ARGUMENT' && !e.remote) throw e
    const result = source ? fromSummary(source.summary(), settings) : { ...failure(e, options.channels ?? DEFAULT_CHANNELS), ...settings }
    if (wasInterrupted()) result.status = 'cancelled'
    if (!result.error && e instanceof MultifdError) result.error = { code: e.code, message: e.message }
    const err = source?.error ?? (e instanceof MultifdError ? e : undefined)
    return { result, lines: [], retry: err !== undefined && !err.remote && RETRIED_CODES.has(err.code) }
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
  --resume                 keep each output under .FILE.multifd-resume with a journal of its
                           durable pieces (.FILE.multifd-resume.journal, advanced at every
                           sync once the file is flushed); a failed or killed run leaves both,
                           and running the same command again continues them with a sender
                           started with send --resume. While this command runs, a source that
                           dies is waited for (--resume-window-ms) and its new session continues
  --channel-timeout-ms MS  how long the channels may take to connect, ${rangeText(LIMITS.timeoutMs)}
                           (default ${LIMITS.timeoutMs.default})
  --peer-timeout-ms MS     fail if the source stalls or goes silent this long,
                           ${rangeText(LIMITS.peerTimeoutMs)} (default ${DEFAULT_PEER_TIMEOUT_MS}, 0 disables)
  --resume-window-ms MS    how long a broken channel's or control connection's replacement
                           may take before the migration fails, and with --resume how long to
                           wait for a new session after the source went away,
                           ${rangeText(LIMITS.resumeWindowMs)} (default ${DEFAULT_RESUME_WINDOW_MS}, 0 fails at once)
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
    resume: { type: 'boolean' },
    'resume-window-ms': { type: 'string' },
    'channel-timeout-ms': { type: 'string' },
    'peer-timeout-ms': { type: 'string' },
    ...TLS_FLAGS,
    'tls-allow': { type: 'string', multiple: true },
  })
  const tls = tlsFiles(values)
  const o = check(
    z.object({
      channels: IntIn(LIMITS.channels).optional(),
      'channel-timeout-ms': IntIn(LIMITS.timeoutMs).default(DEFAULT_TIMEOUT_MS),
      'peer-timeout-ms': PeerTimeoutFlag.optional(),
      'resume-window-ms': IntIn(LIMITS.resumeWindowMs).default(DEFAULT_RESUME_WINDOW_MS),
    }),
    values,
  )
  const [address, ...extra] = positionals
  if (!address) throw new UsageError('recv needs an ADDRESS (tcp:HOST:PORT or unix:PATH)')
  if (extra.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(extra[0])}; output files go after --out`)
  const named = blockFiles(values.block as string[] | undefined, [])
  const outs = (values.out as string[] | undefined) ?? []
  if (named.length === 0 && outs.length === 0) throw new UsageError('recv needs --out FILE or --block NAME=FILE for the received blocks')
  refuseOverlap(tls ? [tls.cert, tls.key, tls.ca] : [], [...named.map((n) => n.file), ...outs])
  const json = values.json === true
  const inPlace = values['in-place'] === true
  const resume = values.resume === true
  if (resume && inPlace) throw new UsageError('--resume keeps a partial output beside each FILE; it does not combine with --in-place')
  const options: ReceiveOptions = {
    address,
    named,
    outs,
    inPlace,
    resume,
    json,
    destination: {
      ...(o.channels === undefined ? {} : { channels: o.channels }),
      channelTimeoutMs: o['channel-timeout-ms'],
      ...(o['peer-timeout-ms'] === undefined ? {} : { peerTimeoutMs: o['peer-timeout-ms'] }),
      resumeWindowMs: o['resume-window-ms'],
      ...(tls ? { tls: { ...tls, ...(values['tls-allow'] === undefined ? {} : { allow: values['tls-allow'] as string[] }) } } : {}),
    },
  }
  let r = await receiveOnce(options)
  // With --resume, a session that failed because the source went away leaves the partial
  // outputs and journals; a source started again within the window continues them.
  while (resume && r.retry && o['resume-window-ms'] > 0) {
    const reason = r.result.error ? `${r.result.error.code}: ${r.result.error.message}` : r.result.status
    process.stderr.write(`session ended (${reason}); partial outputs and journals kept; waiting up to ${o['resume-window-ms']} ms for a new session (Ctrl-C stops)\n`)
    const next = await receiveOnce({ ...options, address: r.address, windowMs: o['resume-window-ms'] })
    if (next.expired) break
    r = next
  }
  print(r.result, json, 'recv', r.lines)
  return r.result
}

/** What one receiving session needs. */
interface ReceiveOptions {
  address: string
  named: Array<{ name: string; file: string }>
  outs: string[]
  inPlace: boolean
  resume: boolean
  json: boolean
  destination: Omit<DestinationOptions, 'address' | 'blocks' | 'resume'>
  /** Give up (`expired`) unless a source connects within this many ms. */
  windowMs?: number
}

/** Failures a source started again cannot mend: the outputs or the configuration are wrong. */
const FINAL_CODES = new Set(['ERR_MULTIFD_RESUME_MISMATCH', 'ERR_MULTIFD_BLOCK_MISMATCH', 'ERR_MULTIFD_DUPLICATE_BLOCK', 'ERR_MULTIFD_CHANNEL_COUNT_MISMATCH', 'ERR_MULTIFD_NO_SPACE', 'ERR_MULTIFD_IO', 'ERR_MULTIFD_INVALID_ARGUMENT'])

/** One session of `recv`: listens, writes the outputs, commits or keeps them. */
async function receiveOnce(o: ReceiveOptions): Promise<{ result: CommandResult; lines: string[]; address: string; retry: boolean; expired?: boolean }> {
  const files: Array<{ name: string; file: string }> = []
  const outputs: Output[] = []
  const journals: Journal[] = []
  /** Pieces each block's journal lists as durable, offered to a resuming source. */
  const held = new Map<RamBlock, number[]>()
  let settled = false
  const dest = Destination.listen({
    ...o.destination,
    address: o.address,
    blocks: (table) => {
      // The whole table is matched to files before any file is created.
      let next = 0
      for (const b of table) {
        const file = o.named.find((n) => n.name === b.name)?.file ?? o.outs[next++]
        if (!file) throw new MultifdError('ERR_MULTIFD_BLOCK_MISMATCH', `no output file for block ${JSON.stringify(b.name)}: give --block ${b.name}=FILE or another --out`)
        if (files.some((f) => f.name === b.name)) throw new MultifdError('ERR_MULTIFD_DUPLICATE_BLOCK', `the source announces block ${JSON.stringify(b.name)} twice`)
        files.push({ name: b.name, file })
      }
      outputs.push(...files.map((f) => Output.plan(f.file, { inPlace: o.inPlace, resumable: o.resume })))
      if (!o.resume) return table.map((b, i) => RamBlock.mapFile({ name: b.name, path: outputs[i]!.create().writePath, size: b.length, pageSize: b.pageSize }))
      // Every journal is read (a mismatch refused) before any partial output is touched.
      const plans = table.map((b, i) => resumePlan(outputs[i]!.writePath, { name: b.name, length: b.length, pageSize: b.pageSize }))
      return plans.map((plan, i) => {
        const b = table[i]!
        if (plan.warning) process.stderr.write(`warning: ${plan.warning.code}: ${plan.warning.message}; starting that output over\n`)
        const block = RamBlock.mapFile({ name: b.name, path: outputs[i]!.create(plan.held !== undefined).writePath, size: b.length, pageSize: b.pageSize })
        if (plan.held === undefined) plan.journal.reset({ name: b.name, length: b.length, pageSize: b.pageSize })
        journals.push(plan.journal)
        held.set(block, plan.held ?? [])
        return block
      })
    },
    ...(o.resume
      ? {
          resume: {
            held: (block: RamBlock) => held.get(block) ?? [],
            onDurable: (d: DurablePieces) => {
              if (settled) return
              d.blocks.forEach(({ block, pieces }, i) => journals[i]?.write({ name: block.name, length: block.size, pageSize: block.pageSize }, d.epoch, pieces))
            },
          },
        }
      : {}),
  })
  process.stderr.write(`listening on ${dest.address}\n`)
  // Connections turned away (never fatal) and anything else that degraded, as they happen.
  dest.on('warning', (w) => process.stderr.write(`warning: ${w.code}: ${w.message}\n`))
  onInterrupt(() => dest.close())
  let window: NodeJS.Timeout | undefined
  let expired = false
  if (o.windowMs !== undefined) {
    window = setTimeout(() => {
      expired = true
      dest.close()
    }, o.windowMs)
    window.unref()
  }
  let progress: Progress | undefined
  dest.once('state', () => {
    clearTimeout(window)
    progress = progressOf(dest, o.json, 'receiving')
  })
  const resumedLine = (s: Summary): string[] => (s.resumedBytes === undefined ? [] : [`resumed: ${bytes(s.resumedBytes)} the destination already held were not sent again`])
  try {
    const s = await dest.done
    progress?.stop()
    const complete = s.status === 'completed'
    settled = true
    for (const out of outputs) {
      if (complete) out.commit()
      else out.discard()
    }
    if (complete) journals.forEach((j) => j.remove())
    const rejected = dest.stats().rejectedConnections
    const result = fromSummary(s, { address: dest.address, files, complete, rejectedConnections: rejected, ...(s.resumedBytes === undefined ? {} : { resumedBytes: s.resumedBytes }) })
    const rejectedLine = rejected > 0 ? [`rejected ${rejected} connection(s) that did not identify themselves as this session's`] : []
    return { result, lines: [...files.map((f) => `${f.name} -> ${f.file}`), ...resumedLine(s), ...channelLines(s), ...rejectedLine], address: dest.address, retry: false }
  } catch {
    settled = true
    clearTimeout(window)
    for (const out of outputs) out.discard()
    progress?.stop()
    const s = dest.summary()
    const result = fromSummary(s, { address: dest.address, complete: false, rejectedConnections: dest.stats().rejectedConnections, ...(s.resumedBytes === undefined ? {} : { resumedBytes: s.resumedBytes }) })
    if (wasInterrupted()) result.status = 'cancelled'
    const kept = o.resume && outputs.length > 0 ? [`partial outputs and journals kept for --resume: ${outputs.map((x) => x.writePath).join(', ')}`] : []
    const retry = !wasInterrupted() && !expired && !FINAL_CODES.has(s.error?.code ?? '')
    return { result, lines: [...(outputs.some((x) => x.inPlace) ? ['outputs written in place are incomplete'] : []), ...kept], address: dest.address, retry, expired }
  }
}

