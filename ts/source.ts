/**
 * The sending side: connects the control channel and N multifd channels to a destination,
 * moves pages of registered blocks, and drives sync rounds and completion.
 */
import { randomBytes } from 'node:crypto'
import { setTimeout as delay } from 'node:timers/promises'
import { z } from 'zod'
import { binding, type NativeEvent } from './native.js'
import { MultifdError, asMultifdError, native, nativeError } from './errors.js'
import { RamBlock, RamBlockSchema, blockDigests } from './block.js'
import { Address, Bandwidth as BandwidthLimit, ChannelRetries, Channels, MinChannels, CompressionMethod, DEFAULT_CHANNEL_RETRIES, DEFAULT_CHANNELS, DEFAULT_PAGE_SIZE, DEFAULT_PEER_TIMEOUT_MS, DEFAULT_TIMEOUT_MS, Integrity, PageSize, PeerTimeoutMs, TimeoutMs, ZeroPageDetection, checkSourceRules, parseOptions } from './options.js'
import { PROTOCOL_VERSION, remoteError, type ControlMessage } from './protocol.js'
import { Session } from './session.js'
import { type ChannelStats, type Summary, type TlsSummary } from './types.js'
import { SourceTlsOptions, tlsCredentials, tlsSummary } from './tls.js'
import { chunked, pieceBytes, pieceCount, rangesOutside, type PieceRange } from './resume.js'

const Bandwidth = BandwidthLimit.optional()
/** Beyond the native connect timeout, before a wait for a connection gives up on its own. */
const CONNECT_SLACK_MS = 2000

const SourceOptions = z.strictObject({
  /** `tcp:HOST:PORT` or `unix:PATH`. */
  address: Address,
  blocks: z.array(RamBlockSchema).min(1),
  /** Parallel multifd channels (QEMU's default is 2). Every range: docs/LIMITS.md. */
  channels: Channels.default(DEFAULT_CHANNELS),
  pageSize: PageSize.default(DEFAULT_PAGE_SIZE),
  compression: CompressionMethod.default('none'),
  /** In the method's range (docs/LIMITS.md; default 1, as QEMU). Only the source compresses. */
  compressionLevel: z.int().min(0).max(0xffff_ffff).optional(),
  /** Send zero pages as offsets only (QEMU's `zero-page-detection=multifd`). */
  zeroPageDetection: ZeroPageDetection.default('multifd'),
  /** 16 bytes; random by default. */
  uuid: z.instanceof(Uint8Array).refine((u) => u.length === 16, { error: 'uuid must be 16 bytes' }).optional(),
  /**
   * Send pages with MSG_ZEROCOPY (Linux, TCP only, no compression, as QEMU's
   * `zero-copy-send`). On loopback the kernel copies anyway; stats report it.
   */
  zeroCopySend: z.boolean().default(false),
  /**
   * Bound on opening each connection (TCP connect and, with TLS, the handshake). The control
   * connection opens first; then every channel at once, so all of them are up within this.
   */
  connectTimeoutMs: TimeoutMs.default(DEFAULT_TIMEOUT_MS),
  /**
   * No-progress bound: a destination that stops reading or answering fails the session with
   * ERR_MULTIFD_TIMEOUT after this long, on both sides. Channel writes block at most this
   * long, TCP user-timeout and keepalive are set, and the control connection must hear from
   * the peer this often (both sides ping every third of it). 30 s by default; 0 disables it.
   */
  peerTimeoutMs: PeerTimeoutMs.default(DEFAULT_PEER_TIMEOUT_MS),
  /**
   * End-to-end integrity (negotiated; not a QEMU feature): every packet carries an xxh3-64
   * digest of its data pages in a reserved header word (a QEMU peer would ignore it), the
   * destination checks it after the pages land, and each whole block's digest is compared at
   * completion. A mismatch fails with ERR_MULTIFD_INTEGRITY naming the channel, block and pages.
   */
  integrity: Integrity.default('none'),
  /**
   * QEMU's `max-bandwidth`: bytes per second over all channels of the session together
   * (headers included); absent for no limit. Change it while the session runs with
   * `setMaxBandwidth`.
   */
  maxBandwidth: Bandwidth,
  /** Bound on each control-channel reply (welcome, completed). */
  handshakeTimeoutMs: TimeoutMs.default(DEFAULT_TIMEOUT_MS),
  /**
   * Redials of a connection that breaks (reset, closed, nothing heard for `peerTimeoutMs`),
   * 50 ms apart and doubling up to 2 s, each with a fresh TLS handshake and the same checks.
   * A channel's replacement takes the old one's place at the destination and sends again every
   * page the channel sent since the last acknowledged sync, with its current contents. A
   * control connection's identifies itself with the session's UUID; an acknowledgement lost
   * with the old one is delivered once, a `complete` the destination may have missed is sent
   * again. Each repair is a `recovery` event. 0 fails the migration at the first broken
   * connection, as QEMU does.
   */
  channelRetries: ChannelRetries.default(DEFAULT_CHANNEL_RETRIES),
  /**
   * Channels that must remain (1..channels). A channel that cannot be redialled within
   * `channelRetries` is given up while more than this many are left: a `warning`, the
   * destination is told, the pages it owed go out on the others and the migration finishes
   * on the rest. With `minChannels` equal to `channels` it fails with the cause's code instead.
   */
  minChannels: MinChannels.default(1),
  /**
   * Mutual TLS on the control connection and every channel (see README, "TLS"). Each
   * connection's handshake, certificate checks and the destination's allow-list complete
   * within `connectTimeoutMs`, before any page moves. Not with `zeroCopySend`.
   */
  tls: SourceTlsOptions.optional(),
  /**
   * Resume an interrupted transfer (docs/PROTOCOL.md, "Resume"): after the handshake, ask the
   * destination which 1 MiB pieces it already holds, with their xxh3-64 digests, and leave
   * out of the first whole-block send (`sendBlock(block)` without ranges, `sendAll`) every
   * piece whose digest equals this side's. A piece that changed since is sent; so is
   * everything when the destination holds nothing. `resumedBytes` reports what was skipped.
   */
  resume: z.boolean().default(false),
})
  .superRefine((o, ctx) => {
    const names = new Set<string>()
    for (const [i, b] of o.blocks.entries()) {
      if (names.has(b.name)) ctx.addIssue({ code: 'custom', path: ['blocks', i], message: `duplicate block name ${JSON.stringify(b.name)}` })
      names.add(b.name)
      if (b.pageSize !== o.pageSize) ctx.addIssue({ code: 'custom', path: ['blocks', i], message: `block ${JSON.stringify(b.name)} has ${b.pageSize}-byte pages, the session uses ${o.pageSize}` })
    }
    // Compression levels and which options combine: the core's rules (docs/LIMITS.md).
    checkSourceRules({ ...o, tls: o.tls !== undefined }, ctx)
  })
export type SourceOptions = z.input<typeof SourceOptions>

/** A page range of a block, in bytes (rounded out to whole pages). */
export interface ByteRange {
  offset: number
  length: number
}

/** What the source waits to hear, from its native side or the destination; each is heard once. */
type Signal = 'controlConnected' | 'welcome' | 'held' | 'channelsReady' | 'completed' | 'controlClosed'

type NativeSource = InstanceType<typeof binding.NativeSource>

export class Source extends Session {
  readonly session: string
  readonly address: string
  readonly blocks: readonly RamBlock[]
  readonly #options: z.output<typeof SourceOptions>
  /** The native session: set by `connect`, cleared by close. */
  #native: NativeSource | undefined
  /** What has been heard so far (the public state machine is `state`, see `state.ts`). */
  #heard = new Set<Signal>()
  /** The highest sync the destination acknowledged (the native ledger checked it was owed). */
  #acked = 0
  #round = 0
  #completedAt: number | undefined
  #maxBandwidth: number | undefined
  #throttledMs = 0
  /** With `resume`: the pieces the destination offered, by block index, until `held` is done. */
  #offered: Map<number, Map<number, string>> | undefined
  /** With `resume`: per block, the pieces its first whole-block send leaves out (consumed by it). */
  #skip = new Map<RamBlock, Set<number>>()
  /** `held` messages heard so far. */
  #heldParts = 0
  #resumedBytes = 0
  /** Once `cancel()` or `abort()` begins: the error the session ends with, and how. */
  #ending: { error: MultifdError; final: 'failed' | 'cancelled' } | undefined

  private constructor(o: z.output<typeof SourceOptions>) {
    super('source')
    this.#options = o
    this.blocks = o.blocks
    this.address = o.address
    this.session = Buffer.from(o.uuid ?? randomBytes(16)).toString('hex')
    this.#maxBandwidth = o.maxBandwidth
  }

  /**
   * Connects to a destination: control handshake (session UUID, protocol version, channel
   * count, page size, block table), then the multifd channels. Resolves in state `active`.
   */
  static async connect(options: SourceOptions): Promise<Source> {
    const src = new Source(parseOptions(SourceOptions, options, 'source options'))
    await src.#start()
    return src
  }

  #hear(s: Signal): void {
    this.#heard.add(s)
    this.recheck()
  }

  #until(s: Signal, what: string, timeoutMs?: number): Promise<true> {
    return this.waitFor(() => (this.#heard.has(s) ? true : undefined), what, timeoutMs)
  }

  async #start(): Promise<void> {
    const o = this.#options
    this.setState('setup')
    try {
      const tls = o.tls ? tlsCredentials(o.tls) : undefined
      // Connects and TLS handshakes run on native threads; the event loop stays free.
      const n = native(() => binding.NativeSource.connect(o.address, o.connectTimeoutMs, tls, (ev) => this.#onEvent(ev)))
      this.#native = n
      await this.#until('controlConnected', 'the control connection', o.connectTimeoutMs + CONNECT_SLACK_MS)
      this.#send({
        type: 'hello',
        protocol: PROTOCOL_VERSION,
        session: this.session,
        channels: o.channels,
        pageSize: o.pageSize,
        compression: o.compression,
        blocks: o.blocks.map((b) => ({ name: b.name, length: b.size })),
        ...(o.integrity === 'none' ? {} : { integrity: o.integrity }),
      })
      await this.#until('welcome', 'the destination welcome', o.handshakeTimeoutMs)
      if (o.resume) await this.#askHeld()
      native(() =>
        n.startChannels({
          uuid: Buffer.from(this.session, 'hex'),
          channels: o.channels,
          pageSize: o.pageSize,
          compression: o.compression,
          ...(o.compressionLevel === undefined ? {} : { compressionLevel: o.compressionLevel }),
          zeroPageDetection: o.zeroPageDetection === 'multifd',
          zeroCopy: o.zeroCopySend,
          integrity: o.integrity === 'xxh3',
          connectTimeoutMs: o.connectTimeoutMs,
          ...(o.peerTimeoutMs === 0 ? {} : { peerTimeoutMs: o.peerTimeoutMs }),
          ...(o.maxBandwidth === undefined ? {} : { maxBandwidth: o.maxBandwidth }),
          channelRetries: o.channelRetries,
          minChannels: o.minChannels,
        }),
      )
      // Channels connect all at once (as QEMU's), each within connectTimeoutMs.
      await this.#until('channelsReady', 'the multifd channels', o.connectTimeoutMs + CONNECT_SLACK_MS)
      if (o.peerTimeoutMs > 0) this.startLiveness(o.peerTimeoutMs, () => this.#send({ type: 'ping' }), (e) => this.#repairControl(n, e))
      this.setState('active')
    } catch (e) {
      this.fail(e)
      throw this.error ?? asMultifdError(e)
    }
  }

  /** True while the control connection is being replaced after a silence (see `startLiveness`). */
  #repairing = false

  /** Nothing heard for peerTimeoutMs: the control connection is dropped and redialled, if it may be. */
  #repairControl(n: NativeSource, e: MultifdError): boolean {
    if (this.state !== 'active' && this.state !== 'device') return false
    this.#repairing = n.dropControl(e.code, e.message)
    return this.#repairing
  }

  #send(m: ControlMessage): void {
    const n = this.#native
    if (!n) throw new MultifdError('ERR_MULTIFD_STATE', 'the source is not connected')
    native(() => n.sendControl(m))
  }

  #onEvent(ev: NativeEvent): void {
    switch (ev.kind) {
      case 'done':
        return this.answer(ev.id, ev.value)
      case 'rejected':
        return this.answer(ev.id, nativeError(ev.error))
      case 'failed':
        return this.fail(nativeError(ev.error))
      case 'channel':
        this.emit('channel', ev.id)
        return
      case 'controlConnected':
        this.#hear('controlConnected')
        return this.publishTls()
      case 'channelsReady':
        return this.#hear('channelsReady')
      case 'warning':
        return this.warn(nativeError(ev.error))
      case 'recovery':
        // The replacement speaks for the destination: the liveness wait starts over.
        this.heard()
        if (ev.connection == null) this.#repairing = false
        return this.recovered(ev)
      case 'channelDropped':
        // The warning came first; the destination's barriers stop waiting for the channel.
        try {
          this.#send({ type: 'channelDropped', channel: ev.id })
        } catch (e) {
          this.fail(e)
        }
        return
      case 'control':
        return this.#onControl(ev.message)
      case 'controlRefused':
        this.heard()
        return this.fail(nativeError(ev.error))
      case 'controlClosed':
        this.#hear('controlClosed')
        // After completion, or while cancel/abort waits for exactly this, a closing peer is expected.
        if (this.#heard.has('completed') || this.#ending) return
        return this.fail(
          ev.error
            ? new MultifdError(nativeError(ev.error).code, `control connection: ${ev.error.message}`)
            : new MultifdError('ERR_MULTIFD_CONNECTION_CLOSED', 'the destination closed the control connection'),
        )
      case 'synced':
        return // the destination's event; a source hears `synced` on the control connection
    }
  }

  /** A message from the destination, decoded and checked by the core. */
  #onControl(m: ControlMessage): void {
    this.heard()
    const n = this.#native
    if (!n) return
    try {
      switch (m.type) {
        case 'welcome':
          if (m.protocol !== PROTOCOL_VERSION) throw new MultifdError('ERR_MULTIFD_PROTOCOL', `destination speaks control protocol ${m.protocol}, expected ${PROTOCOL_VERSION}`)
          return this.#hear('welcome')
        case 'synced':
          // Only for a sync this source sent and not acknowledged before (checked natively).
          // Up to what every page queued is delivered: `epoch`, or less while a given-up
          // channel's pages are still on their way.
          this.#acked = Math.max(this.#acked, native(() => n.synced(m.epoch)))
          this.publishSync(m.epoch, m.packetNum)
          return this.recheck()
        case 'completed':
          // Only after this source sent `complete` (checked natively).
          native(() => n.completed())
          this.#completedAt ??= performance.now()
          return this.#hear('completed')
        case 'held':
          return this.#onHeld(m.ranges, m.done)
        case 'ping':
          return
        case 'error':
          return this.fail(remoteError(m, 'destination'))
        default:
          throw new MultifdError('ERR_MULTIFD_PROTOCOL', `unexpected control message ${m.type} from the destination`)
      }
    } catch (e) {
      this.fail(e)
    }
  }

  /**
   * Resume: asks what the destination holds, digests the same pieces here (off the
   * JavaScript thread) and keeps the equal ones out of each block's first whole-block send.
   */
  async #askHeld(): Promise<void> {
    const offered = (this.#offered = new Map())
    this.#send({ type: 'resume' })
    // Bounded per message, not in all: a destination digesting 64 GiB answers in 16 parts.
    while (!this.#heard.has('held')) {
      const parts = this.#heldParts
      await this.waitFor(() => (this.#heard.has('held') || this.#heldParts !== parts ? true : undefined), 'the pieces the destination holds', this.#options.handshakeTimeoutMs)
    }
    for (const [index, pieces] of offered) {
      const block = this.blocks[index]!
      const indexes = [...pieces.keys()]
      const here = await block.native.pieceDigests(indexes)
      const skip = new Set<number>()
      indexes.forEach((p, i) => {
        if (here[i] !== pieces.get(p)) return
        skip.add(p)
        this.#resumedBytes += pieceBytes(block.size, p)
      })
      this.#skip.set(block, skip)
    }
    this.#send({ type: 'resumed', bytes: this.#resumedBytes })
  }

  /** A `held` message: ranges of blocks this source announced, each offered once, before `done`. */
  #onHeld(ranges: Array<{ block: number; index: number; xxh3: string }>, done: boolean): void {
    const offered = this.#offered
    if (!offered || this.#heard.has('held')) throw new MultifdError('ERR_MULTIFD_OUT_OF_SEQUENCE', 'the destination sent held ranges this source did not ask for')
    for (const r of ranges) {
      const block = this.blocks[r.block]
      if (!block || r.index >= pieceCount(block.size)) throw new MultifdError('ERR_MULTIFD_PROTOCOL', `the destination offers piece ${r.index} of block number ${r.block}, which this source does not have`)
      const pieces = offered.get(r.block) ?? new Map<number, string>()
      if (pieces.has(r.index)) throw new MultifdError('ERR_MULTIFD_PROTOCOL', `the destination offers piece ${r.index} of block ${JSON.stringify(block.name)} twice`)
      offered.set(r.block, pieces.set(r.index, r.xxh3))
    }
    this.#heldParts += 1
    if (done) this.#hear('held')
    else this.recheck()
  }

  /** With `resume`: bytes left out because the destination held them (digests equal). */
  get resumedBytes(): number {
    return this.#resumedBytes
  }

  protected override resumed(): number | undefined {
    return this.#options.resume ? this.#resumedBytes : undefined
  }

  #requireActive(what: string): NativeSource {
    if (this.error) throw this.error
    if (!this.#native || (this.state !== 'active' && this.state !== 'device')) {
      throw new MultifdError('ERR_MULTIFD_STATE', `cannot ${what} in state ${this.state}`)
    }
    return this.#native
  }

  #blockOf(block: RamBlock): RamBlock {
    if (!this.blocks.includes(block)) throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', `block ${JSON.stringify(block.name)} is not one of this session's blocks`)
    return block
  }

  /**
   * Sends every page of `block` (or of the given byte ranges). Resolves with pages queued.
   * With `resume`, the first send of a whole block leaves out the pieces the destination holds.
   */
  async sendBlock(block: RamBlock, ranges?: ByteRange[]): Promise<number> {
    return this.#sendRanges(this.#blockOf(block), ranges ?? this.#wholeBlock(block))
  }

  /** The ranges a whole-block send covers: all of it, or (once, with `resume`) what the destination lacks. */
  #wholeBlock(block: RamBlock): PieceRange[] | undefined {
    const skip = this.#skip.get(block)
    if (!skip) return undefined
    this.#skip.delete(block)
    return rangesOutside(block.size, skip)
  }

  #sendRanges(block: RamBlock, ranges: ByteRange[] | undefined): Promise<number> {
    const n = this.#requireActive('send')
    if (ranges?.length === 0) return Promise.resolve(0)
    return this.request((id) => n.send(id, block.native, ranges, false))
  }

  /** Sends the pages of every block marked dirty since the last call, clearing their bits. */
  async sendDirty(): Promise<number> {
    const n = this.#requireActive('send')
    const counts = await Promise.all(this.blocks.map((b) => this.request((id) => n.send(id, b.native, undefined, true))))
    return counts.reduce((a, c) => a + c, 0)
  }

  /**
   * Sends every page of every block (with `resume`, what the destination lacks). With
   * `syncEveryBytes`, the blocks go one after the other in groups of that many bytes, each
   * followed by a sync, so a destination that keeps a resume journal advances it as the
   * transfer goes (a kill loses at most about one group).
   */
  async sendAll(options: { syncEveryBytes?: number } = {}): Promise<number> {
    const every = parseOptions(z.int().positive().optional(), options.syncEveryBytes, 'syncEveryBytes')
    if (every === undefined) {
      const counts = await Promise.all(this.blocks.map((b) => this.sendBlock(b)))
      return counts.reduce((a, c) => a + c, 0)
    }
    let pages = 0
    // The acknowledgement of one group's sync is awaited while the next group goes out.
    let acked: Promise<number> | undefined
    for (const b of this.blocks) {
      for (const group of chunked(this.#wholeBlock(b) ?? [{ offset: 0, length: b.size }], every)) {
        pages += await this.#sendRanges(b, group)
        const next = this.sync()
        next.catch(() => {}) // awaited below; a failure rejects every pending request anyway
        await acked
        acked = next
      }
    }
    await acked
    return pages
  }

  /**
   * A barrier on both sides: a SYNC packet goes out on every channel after its queued pages,
   * and this resolves once the destination reports that every channel has passed it, so every
   * page sent before is in destination memory. The destination's channel threads send that
   * report themselves, so its latency does not depend on the destination's event loop.
   * Resolves with the sync epoch.
   */
  async sync(): Promise<number> {
    const n = this.#requireActive('sync')
    const epoch = await this.request((id) => n.sync(id))
    // Every channel wrote its SYNC: from here the destination owes the acknowledgement.
    return this.#acknowledged(epoch, n)
  }

  /**
   * Resolves once the destination acknowledged `epoch`. With `peerTimeoutMs`, fails with
   * ERR_MULTIFD_TIMEOUT when the acknowledgement is missing and nothing moved for that long:
   * the destination has stopped taking the bytes still queued on the channels (on a slow
   * link they drain for a while, which is progress) and has not answered.
   */
  #acknowledged(epoch: number, n: NativeSource): Promise<number> {
    const acked = this.waitFor(() => (this.#acked >= epoch ? epoch : undefined), `sync ${epoch}`)
    const bound = this.#options.peerTimeoutMs
    if (bound === 0) return acked
    let queued = n.unsentBytes()
    let moved = performance.now()
    const watchdog = setInterval(() => {
      const now = n.unsentBytes()
      // Bytes drained, or the control connection being replaced (the acknowledgement follows).
      if (now < queued || this.#repairing) moved = performance.now()
      queued = now
      const idle = performance.now() - moved
      if (idle <= bound) return
      const e = new MultifdError('ERR_MULTIFD_TIMEOUT', `source: the destination neither took the channels' bytes nor acknowledged sync ${epoch} for ${Math.round(idle)} ms (peerTimeoutMs ${bound})`)
      // A control connection that is itself quiet may be hung, with the acknowledgement on it:
      // the liveness check replaces it (or fails the session) within peerTimeoutMs.
      if (this.silentMs() > bound / 2) return
      this.fail(e)
    }, Math.max(10, Math.floor(bound / 10)))
    watchdog.unref()
    return acked.finally(() => clearInterval(watchdog))
  }

  /** The no-progress bound in ms (`peerTimeoutMs`; 0: off). */
  get peerTimeoutMs(): number {
    return this.#options.peerTimeoutMs
  }

  /** The bandwidth limit in bytes per second over all channels, or undefined for none. */
  get maxBandwidth(): number | undefined {
    return this.#maxBandwidth
  }

  /**
   * Changes the bandwidth limit while the session runs (QEMU's `max-bandwidth`; undefined
   * lifts it). Applies to the next packet of every channel, including channels waiting for
   * the old limit.
   */
  setMaxBandwidth(bytesPerSecond: number | undefined): void {
    const rate = parseOptions(Bandwidth, bytesPerSecond, 'max bandwidth')
    const n = this.#requireActive('set the bandwidth limit')
    native(() => n.setMaxBandwidth(rate))
    this.#maxBandwidth = rate
  }

  /** Milliseconds the channels waited for the bandwidth limit so far, all channels added up. */
  get throttledMs(): number {
    return this.#native?.throttledMs() ?? this.#throttledMs
  }

  /**
   * When the destination reported completion (`performance.now()` of the `completed` message),
   * or undefined before. Live migration measures downtime up to here.
   */
  get completedAt(): number | undefined {
    return this.#completedAt
  }

  /**
   * Fails the session with `error`, on both sides: for orchestration that decides to give up,
   * e.g. a live migration that does not converge. Like `cancel()` it is a handshake (see
   * there), ending `failed` with `error` on both sides. Pending promises reject with `error`;
   * resolves once the session is failed. First error wins: if the session already ended,
   * nothing changes.
   */
  async abort(error: MultifdError): Promise<void> {
    if (!(error instanceof MultifdError)) throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', 'abort needs a MultifdError')
    if (this.error || this.#ending || this.state === 'completed') return
    return this.#stop(error, 'failed', { type: 'error', code: error.code, message: error.message })
  }

  /**
   * Cancels: both sides stop, every pending promise rejects with ERR_MULTIFD_CANCELLED, and
   * both sides end `cancelled`. A handshake, as `abort()`.
   */
  async cancel(): Promise<void> {
    if (this.error || this.#ending || this.state === 'completed') return
    this.setState('cancelling')
    return this.#stop(new MultifdError('ERR_MULTIFD_CANCELLED', 'the migration was cancelled by the source'), 'cancelled', { type: 'cancel' })
  }

  /**
   * The stop handshake of `cancel()` and `abort()`: this side stops queuing at once (channels
   * finish the packet in hand), tells the destination with `announce`, and closes its
   * channels only once the destination has stopped (or after 2 s), so the destination ends
   * with this side's reason rather than with the closed sockets it would otherwise see first.
   */
  async #stop(error: MultifdError, final: 'failed' | 'cancelled', announce: ControlMessage): Promise<void> {
    this.#ending = { error, final }
    this.#native?.stopQueuing()
    try {
      this.#send(announce)
      await Promise.race([this.#until('controlClosed', 'the destination to stop'), delay(2000, undefined, { ref: false })])
    } catch {
      // the destination may already be gone; the session ends with `error` below regardless
    }
    this.fail(error, final)
  }

  /** While stopping, whatever breaks (the destination closing its sockets) is the stop's reason. */
  protected override fail(e: unknown, final: 'failed' | 'cancelled' = 'failed'): void {
    const ending = this.#ending
    if (ending && !this.error && e !== ending.error) {
      ending.error.secondary.push(e)
      return super.fail(ending.error, ending.final)
    }
    super.fail(e, final)
  }

  /** Tells the destination a new dirty round starts (an event there). */
  markRound(): number {
    this.#requireActive('mark a round')
    this.#round += 1
    this.#send({ type: 'round', round: this.#round })
    return this.#round
  }

  /**
   * Finishes: a final sync, then both sides complete and close. Resolves with the summary.
   * Nothing may write the blocks from here on.
   */
  async complete(): Promise<Summary> {
    const n = this.#requireActive('complete')
    this.setState('device')
    try {
      const epoch = await this.sync()
      // Once every page is delivered, the block digests combine the digests the channels took of
      // the pages as they sent them (native work off the JavaScript thread; pages never sent or
      // marked dirty since are hashed from memory).
      const digests = this.#options.integrity === 'xxh3' ? await blockDigests(this.blocks, (b) => n.completionDigest(b.native)) : undefined
      // After a given-up channel the source synced once more on its own: the last sync is that one.
      native(() => n.sendComplete(Math.max(epoch, this.#acked), digests))
      await this.#until('completed', 'the destination completion', this.#options.handshakeTimeoutMs)
      this.succeed()
    } catch (e) {
      this.fail(e)
    }
    return this.done
  }

  protected override tellPeer(e: MultifdError): void {
    // A cancel was announced with `cancel`, an abort with its own `error` message already.
    if (e.code === 'ERR_MULTIFD_CANCELLED' || e === this.#ending?.error) return
    try {
      this.#send({ type: 'error', code: e.code, message: e.message })
    } catch {
      // best effort: the control connection may be what failed
    }
  }

  protected override nativeTls(): TlsSummary | undefined {
    return tlsSummary(this.#native?.tlsInfo())
  }

  protected override closeNative(abort: boolean): void {
    const n = this.#native
    if (!n) return
    this.#throttledMs = n.throttledMs()
    this.#native = undefined
    n.close(abort)
  }

  protected override nativeStats(): ChannelStats[] {
    return this.#native?.stats() ?? []
  }

  protected override channelCount(): number {
    return this.#options.channels
  }
}
