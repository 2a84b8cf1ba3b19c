/**
 * The sending side: connects the control channel and N multifd channels to a destination,
 * moves pages of registered blocks, and drives sync rounds and completion.
 */
import { randomBytes } from 'node:crypto'
import { setTimeout as delay } from 'node:timers/promises'
import { z } from 'zod'
import { binding, type NativeEvent } from './native.js'
import { MultifdError, asMultifdError, native } from './errors.js'
import { RamBlock, RamBlockSchema } from './block.js'
import { Address, Bandwidth as BandwidthLimit, Channels, CompressionMethod, DEFAULT_CHANNELS, DEFAULT_PAGE_SIZE, DEFAULT_TIMEOUT_MS, Integrity, PageSize, PeerTimeoutMs, TimeoutMs, ZeroPageDetection, checkSourceRules, parseOptions } from './options.js'
import { PROTOCOL_VERSION, decodeMessage, encodeMessage, remoteError, type ControlMessage } from './protocol.js'
import { Session, type ChannelStats, type Summary, type TlsSummary } from './session.js'
import { SourceTlsOptions, tlsCredentials, tlsSummary } from './tls.js'

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
  connectTimeoutMs: TimeoutMs.default(DEFAULT_TIMEOUT_MS),
  /**
   * Detect a stalled or hung destination: channel writes block at most this long, TCP
   * user-timeout and keepalive are set, and the control connection must hear from the peer
   * this often (both sides ping). Fails with ERR_MULTIFD_TIMEOUT. Off by default.
   */
  peerTimeoutMs: PeerTimeoutMs.optional(),
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
   * Mutual TLS on the control connection and every channel (see README, "TLS"). Each
   * connection's handshake, certificate checks and the destination's allow-list complete
   * within `connectTimeoutMs`, before any page moves. Not with `zeroCopySend`.
   */
  tls: SourceTlsOptions.optional(),
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

export class Source extends Session {
  readonly session: string
  readonly address: string
  readonly blocks: readonly RamBlock[]
  readonly #options: z.output<typeof SourceOptions>
  #native: InstanceType<typeof binding.NativeSource> | undefined
  #closed = false
  #welcomed = false
  #controlUp = false
  #channelsUp = false
  #syncedEpoch = 0
  #completed = false
  #controlClosed = false
  #round = 0
  #completedAt: number | undefined
  #maxBandwidth: number | undefined
  #throttledMs = 0
  #aborting: MultifdError | undefined

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

  async #start(): Promise<void> {
    const o = this.#options
    this.setState('setup')
    try {
      const tls = o.tls ? tlsCredentials(o.tls) : undefined
      // Connects and TLS handshakes run on native threads; the event loop stays free.
      this.#native = native(() => binding.NativeSource.connect(o.address, o.connectTimeoutMs, tls, (ev) => this.#onEvent(ev)))
      await this.waitFor(() => (this.#controlUp ? true : undefined), 'the control connection', o.connectTimeoutMs + CONNECT_SLACK_MS)
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
      await this.waitFor(() => (this.#welcomed ? true : undefined), 'the destination welcome', o.handshakeTimeoutMs)
      const nativeSource = this.#native
      native(() =>
        nativeSource.startChannels({
          uuid: Buffer.from(this.session, 'hex'),
          channels: o.channels,
          pageSize: o.pageSize,
          compression: o.compression,
          ...(o.compressionLevel === undefined ? {} : { compressionLevel: o.compressionLevel }),
          zeroPageDetection: o.zeroPageDetection === 'multifd',
          zeroCopy: o.zeroCopySend,
          integrity: o.integrity === 'xxh3',
          connectTimeoutMs: o.connectTimeoutMs,
          ...(o.peerTimeoutMs === undefined ? {} : { peerTimeoutMs: o.peerTimeoutMs }),
          ...(o.maxBandwidth === undefined ? {} : { maxBandwidth: o.maxBandwidth }),
        }),
      )
      // Channels connect one after another, each within connectTimeoutMs.
      await this.waitFor(() => (this.#channelsUp ? true : undefined), 'the multifd channels', o.connectTimeoutMs * o.channels + CONNECT_SLACK_MS)
      if (o.peerTimeoutMs !== undefined) this.startLiveness(o.peerTimeoutMs, () => this.#send({ type: 'ping' }))
      this.setState('active')
    } catch (e) {
      this.fail(e)
      throw this.error ?? asMultifdError(e)
    }
  }

  #send(m: ControlMessage): void {
    const n = this.#native
    if (!n) throw new MultifdError('ERR_MULTIFD_STATE', 'the source is not connected')
    native(() => n.sendControl(encodeMessage(m)))
  }

  #onEvent(ev: NativeEvent): void {
    switch (ev.kind) {
      case 'done':
        this.answer(ev.id!, ev.code ? new MultifdError(ev.code as MultifdError['code'], ev.message ?? '') : (ev.pages ?? 0))
        break
      case 'failed':
        this.fail(new MultifdError(ev.code as MultifdError['code'], ev.message ?? ''))
        break
      case 'channel':
        this.emit('channel', ev.channel!)
        break
      case 'controlConnected':
        this.#controlUp = true
        this.publishTls()
        this.recheck()
        break
      case 'channelsReady':
        this.#channelsUp = true
        this.recheck()
        break
      case 'warning':
        this.warn(new MultifdError(ev.code as MultifdError['code'], ev.message ?? ''))
        break
      case 'control':
        this.#onControl(ev.frame!)
        break
      case 'controlClosed':
        this.#controlClosed = true
        this.recheck()
        if (!this.#completed && this.state !== 'cancelling') {
          this.fail(ev.code ? new MultifdError(ev.code as MultifdError['code'], `control connection: ${ev.message}`) : new MultifdError('ERR_MULTIFD_CONNECTION_CLOSED', 'the destination closed the control connection'))
        }
        break
    }
  }

  #onControl(frame: Buffer): void {
    this.heard()
    let m: ControlMessage
    try {
      m = decodeMessage(frame)
    } catch (e) {
      return this.fail(e)
    }
    switch (m.type) {
      case 'welcome':
        if (m.protocol !== PROTOCOL_VERSION) return this.fail(new MultifdError('ERR_MULTIFD_PROTOCOL', `destination speaks control protocol ${m.protocol}, expected ${PROTOCOL_VERSION}`))
        this.#welcomed = true
        break
      case 'synced':
        this.#syncedEpoch = Math.max(this.#syncedEpoch, m.epoch)
        this.publishSync(m.epoch, m.packetNum)
        break
      case 'completed':
        this.#completed = true
        this.#completedAt ??= performance.now()
        break
      case 'ping':
        return
      case 'error':
        return this.fail(remoteError(m, 'destination'))
      default:
        return this.fail(new MultifdError('ERR_MULTIFD_PROTOCOL', `unexpected control message ${m.type} from the destination`))
    }
    this.recheck()
  }

  #requireActive(what: string): InstanceType<typeof binding.NativeSource> {
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

  /** Sends every page of `block` (or of the given byte ranges). Resolves with pages queued. */
  async sendBlock(block: RamBlock, ranges?: ByteRange[]): Promise<number> {
    const n = this.#requireActive('send')
    const b = this.#blockOf(block)
    return this.request((id) => n.send(id, b.native, ranges, false))
  }

  /** Sends the pages of every block marked dirty since the last call, clearing their bits. */
  async sendDirty(): Promise<number> {
    const n = this.#requireActive('send')
    const counts = await Promise.all(this.blocks.map((b) => this.request((id) => n.send(id, b.native, undefined, true))))
    return counts.reduce((a, c) => a + c, 0)
  }

  /** Sends every page of every block. */
  async sendAll(): Promise<number> {
    const counts = await Promise.all(this.blocks.map((b) => this.sendBlock(b)))
    return counts.reduce((a, c) => a + c, 0)
  }

  /**
   * A barrier on both sides: a SYNC packet goes out on every channel after its queued pages,
   * and this resolves once the destination reports that every channel has passed it, so every
   * page sent before is in destination memory. Resolves with the sync epoch.
   */
  async sync(): Promise<number> {
    const n = this.#requireActive('sync')
    const epoch = await this.request((id) => n.sync(id))
    await this.waitFor(() => (this.#syncedEpoch >= epoch ? epoch : undefined), `sync ${epoch}`)
    return epoch
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
    return this.#closed ? this.#throttledMs : (this.#native?.throttledMs() ?? 0)
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
   * e.g. a live migration that does not converge. Like `cancel()` it is a handshake: this side
   * stops queuing, tells the destination, and closes its channels only once the destination
   * has stopped (or after 2 s), so the destination fails with this code rather than with the
   * closed sockets it would otherwise see first. Pending promises reject with `error`;
   * resolves once the session is failed. First error wins: if the session already ended,
   * nothing changes.
   */
  async abort(error: MultifdError): Promise<void> {
    if (!(error instanceof MultifdError)) throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', 'abort needs a MultifdError')
    if (this.error || this.#aborting || this.state === 'completed' || this.state === 'cancelling') return
    this.#aborting = error
    this.#native?.stopQueuing()
    try {
      this.#send({ type: 'error', code: error.code, message: error.message })
      await Promise.race([
        this.waitFor(() => (this.#controlClosed ? true : undefined), 'the destination to stop'),
        delay(2000, undefined, { ref: false }),
      ])
    } catch {
      // the destination may already be gone; the session fails with `error` below regardless
    }
    this.fail(error)
  }

  /** While aborting, whatever breaks (the destination closing its sockets) is the abort. */
  protected override fail(e: unknown, final: 'failed' | 'cancelled' = 'failed'): void {
    const aborting = this.#aborting
    if (aborting && !this.error && e !== aborting) {
      aborting.secondary.push(e)
      return super.fail(aborting, final)
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
   */
  async complete(): Promise<Summary> {
    this.#requireActive('complete')
    this.setState('device')
    try {
      const epoch = await this.sync()
      this.#send({ type: 'complete', epoch, ...(this.#options.integrity === 'xxh3' ? { digests: this.blocks.map((b) => ({ name: b.name, xxh3: b.digest() })) } : {}) })
      await this.waitFor(() => (this.#completed ? true : undefined), 'the destination completion', this.#options.handshakeTimeoutMs)
      this.succeed()
    } catch (e) {
      this.fail(e)
    }
    return this.done
  }

  /**
   * Cancels: both sides stop, every pending promise rejects with ERR_MULTIFD_CANCELLED. This
   * side stops queuing at once (channels finish the packet in hand), the destination hears it
   * on the control connection, and the channels close only once the destination has stopped
   * (or after 2 s), so both sides end `cancelled`, not `failed`.
   */
  async cancel(): Promise<void> {
    if (this.error || this.state === 'completed' || this.state === 'cancelling') return
    this.setState('cancelling')
    this.#native?.stopQueuing()
    try {
      this.#send({ type: 'cancel' })
      await Promise.race([
        this.waitFor(() => (this.#controlClosed ? true : undefined), 'the destination to stop'),
        delay(2000, undefined, { ref: false }),
      ])
    } catch {
      // the destination may already be gone
    }
    this.fail(new MultifdError('ERR_MULTIFD_CANCELLED', 'the migration was cancelled by the source'), 'cancelled')
  }

  protected override tellPeer(e: MultifdError): void {
    // A cancel was announced with `cancel`, an abort with its own `error` message already.
    if (e.code === 'ERR_MULTIFD_CANCELLED' || e === this.#aborting) return
    try {
      this.#send({ type: 'error', code: e.code, message: e.message })
    } catch {
      // best effort: the control connection may be what failed
    }
  }

  protected override nativeTls(): TlsSummary | undefined {
    return this.#closed ? undefined : tlsSummary(this.#native?.tlsInfo())
  }

  protected override closeNative(abort: boolean): void {
    if (this.#closed || !this.#native) return
    this.#throttledMs = this.#native.throttledMs()
    this.#closed = true
    this.#native.close(abort)
  }

  protected override nativeStats(): ChannelStats[] {
    return this.#native?.stats() ?? []
  }

  protected override channelCount(): number {
    return this.#options.channels
  }
}
