/**
 * The receiving side: listens on one address, accepts the control connection and the multifd
 * channels, checks the source's handshake against its blocks (or creates blocks for the
 * announced table), and writes pages straight into block memory.
 */
import { z } from 'zod'
import { binding, type NativeEvent } from './native.js'
import { MultifdError, codeOf, native, nativeError } from './errors.js'
import { RamBlock, RamBlockSchema, blockDigests } from './block.js'
import { Address, Channels, DEFAULT_PEER_TIMEOUT_MS, DEFAULT_RESUME_WINDOW_MS, DEFAULT_TIMEOUT_MS, PeerTimeoutMs, ResumeWindowMs, TimeoutMs, parseOptions } from './options.js'
import { PROTOCOL_VERSION, remoteError, type ControlMessage, type Hello } from './protocol.js'
import { Session } from './session.js'
import { type ChannelStats, type DestinationStats, type TlsSummary } from './types.js'
import { DestinationTlsOptions, tlsCredentials, tlsSummary } from './tls.js'
import { HELD_RANGES_PER_FRAME, pieceCount, type DurablePieces } from './resume.js'

/** One entry of the block table a source announces. */
export interface AnnouncedBlock {
  name: string
  length: number
  pageSize: number
}

const ResumeOptions = z.strictObject({
  /**
   * The 1 MiB pieces of `block` (by index) this destination holds from an earlier session
   * and may offer a resuming source, or `'all'`. Called when a source asks (after the blocks
   * are resolved, before any page arrives); the pieces are digested here and the source skips
   * those it has with equal digests. What a piece holds is never trusted without that check.
   */
  held: z.custom<(block: RamBlock) => readonly number[] | 'all'>((v) => typeof v === 'function', { error: 'resume.held must be a function' }),
  /**
   * Called after each sync barrier once the blocks were flushed (mapped files: `msync` and
   * `fdatasync`) with the pieces that are complete as of it: every page received in this
   * session or held before. A journal written here survives a crash of this process or the
   * machine. Calls never overlap; epochs that pass meanwhile are folded into the next call.
   */
  onDurable: z.custom<(durable: DurablePieces) => void | Promise<void>>((v) => typeof v === 'function', { error: 'resume.onDurable must be a function' }).optional(),
})

const DestinationOptions = z.strictObject({
  /** `tcp:HOST:PORT` (port 0 picks a free port; see `address` after listen) or `unix:PATH`. */
  address: Address,
  /**
   * The blocks pages go into. Either a list (the source's table must match it exactly), or a
   * function that creates blocks for the table the source announces (e.g. mapped files).
   */
  blocks: z.union([
    z.array(RamBlockSchema),
    z.custom<(table: AnnouncedBlock[]) => RamBlock[] | Promise<RamBlock[]>>((v) => typeof v === 'function', { error: 'blocks must be an array of RamBlock or a function' }),
  ]),
  /** Expected channel count; by default whatever the source announces. */
  channels: Channels.optional(),
  /** How long, after the handshake, every announced channel has to connect. */
  channelTimeoutMs: TimeoutMs.default(DEFAULT_TIMEOUT_MS),
  /**
   * No-progress bound: a source that stops sending mid-packet or stops answering fails the
   * session with ERR_MULTIFD_TIMEOUT after this long, on both sides. TCP user-timeout and
   * keepalive are set, and the control connection must hear from the peer this often (both
   * sides ping every third of it). 30 s by default; 0 disables it.
   */
  peerTimeoutMs: PeerTimeoutMs.default(DEFAULT_PEER_TIMEOUT_MS),
  /**
   * How long a connection may take to identify itself: to send its first bytes (with TLS: to
   * complete its handshake and pass the allow-list too), and, for the control connection, its
   * hello. A connection that does not is closed and counted in `rejectedConnections`.
   */
  handshakeTimeoutMs: TimeoutMs.default(DEFAULT_TIMEOUT_MS),
  /**
   * How long a channel whose connection broke (reset, closed mid-migration, `peerTimeoutMs`)
   * may take to be replaced by the source before the migration fails with the cause's code.
   * A protocol error is never waited out. 0 fails at once, as QEMU does.
   */
  resumeWindowMs: ResumeWindowMs.default(DEFAULT_RESUME_WINDOW_MS),
  /**
   * Require mutual TLS on every connection (see README, "TLS"). A connection is read only
   * after its handshake, certificate checks and the `allow` list pass; a plaintext peer, an
   * untrusted, expired or unlisted certificate is rejected: closed, counted in
   * `rejectedConnections` and reported as a `warning` with its own code (the source fails with
   * that code), while this destination keeps waiting for its source.
   */
  tls: DestinationTlsOptions.optional(),
  /** Resumable transfers (docs/PROTOCOL.md, "Resume"): what this side holds, and a hook at each durable epoch. */
  resume: ResumeOptions.optional(),
})
export type DestinationOptions = z.input<typeof DestinationOptions>

export class Destination extends Session {
  #session = ''
  readonly #options: z.output<typeof DestinationOptions>
  readonly #native: InstanceType<typeof binding.NativeDestination>
  #blocks: RamBlock[] = []
  #channels = 0
  #integrity = false
  #round = 0
  #closed = false
  #helloTimer: NodeJS.Timeout | undefined
  /** A source asked what this side holds (once per session). */
  #askedHeld = false
  #resumedBytes: number | undefined
  /** The latest complete pieces not yet made durable, and whether a flush is under way. */
  #undurable: { epoch: number; blocks: Buffer[] } | undefined
  #flushing = false
  /** A `complete` is being handled (one sent again after a control reconnect is a repeat). */
  #completing = false
  /** `completed` went out: the control connection's end is now the expected one. */
  #completedSent = false
  #controlEnded: (() => void) | undefined

  get session(): string {
    return this.#session
  }

  private constructor(o: z.output<typeof DestinationOptions>) {
    super('destination')
    this.#options = o
    const tls = o.tls ? tlsCredentials(o.tls) : undefined
    this.#native = native(() => binding.NativeDestination.listen(o.address, o.handshakeTimeoutMs, tls, (ev) => this.#onEvent(ev)))
  }

  /** Starts listening. The returned destination reports its real `address` (port 0 resolved). */
  static listen(options: DestinationOptions): Destination {
    return new Destination(parseOptions(DestinationOptions, options, 'destination options'))
  }

  /** The address sources connect to. */
  get address(): string {
    return this.#native.address
  }

  /** The blocks receiving pages (known after the handshake when created from the table). */
  get blocks(): readonly RamBlock[] {
    return this.#blocks
  }

  /** The no-progress bound in ms (`peerTimeoutMs`; 0: off). */
  get peerTimeoutMs(): number {
    return this.#options.peerTimeoutMs
  }

  /** Dirty rounds the source has announced. */
  get round(): number {
    return this.#round
  }

  /** Stops listening; a migration in progress (or still awaited) ends `cancelled`. */
  close(): void {
    if (this.state === 'completed' || this.error) {
      this.closeNative(true)
      return
    }
    this.fail(new MultifdError('ERR_MULTIFD_CANCELLED', 'the destination was closed'), 'cancelled')
  }

  #onEvent(ev: NativeEvent): void {
    switch (ev.kind) {
      case 'controlConnected':
        this.setState('setup')
        this.#helloTimer = setTimeout(() => this.fail(new MultifdError('ERR_MULTIFD_TIMEOUT', `no hello from the source within ${this.#options.handshakeTimeoutMs} ms`)), this.#options.handshakeTimeoutMs)
        return
      case 'control':
        return void this.#onControl(ev.message)
      case 'controlRefused':
        this.heard()
        return this.fail(nativeError(ev.error))
      case 'controlClosed':
        if (this.state === 'completed') return
        // The source heard `completed` and closed, or never came back for it: either way
        // every page is here.
        if (this.#completedSent) return this.#controlEnded?.()
        return this.fail(
          ev.error
            ? new MultifdError(nativeError(ev.error).code, `control connection: ${ev.error.message}`)
            : new MultifdError('ERR_MULTIFD_CONNECTION_CLOSED', 'the source closed the control connection before completing'),
        )
      case 'channel':
        this.emit('channel', ev.id)
        return
      case 'synced':
        // Told, not asked: the channel threads already acknowledged it to the source.
        this.publishSync(ev.epoch, ev.packetNum)
        return this.#durableAt()
      case 'failed':
        return this.fail(nativeError(ev.error))
      case 'warning':
        return this.warn(nativeError(ev.error))
      case 'recovery':
        // The replacement speaks for the source: the liveness wait starts over.
        this.heard()
        return this.recovered(ev)
      case 'done':
      case 'rejected':
      case 'channelsReady':
      case 'channelDropped':
        return // source events
    }
  }

  #send(m: ControlMessage): void {
    try {
      native(() => this.#native.sendControl(m))
    } catch (e) {
      this.fail(e)
    }
  }

  /** A message from the source, decoded and checked (announcement included) by the core. */
  async #onControl(m: ControlMessage): Promise<void> {
    this.heard()
    try {
      switch (m.type) {
        case 'ping':
          return
        case 'hello':
          return await this.#onHello(m)
        case 'round':
          this.#round = m.round
          return
        case 'channelDropped':
          native(() => this.#native.dropChannel(m.channel))
          return this.warn(new MultifdError('ERR_MULTIFD_CONNECTION_CLOSED', `the source gave channel ${m.channel} up; the migration goes on without it`))
        case 'resume':
          return await this.#offerHeld()
        case 'resumed':
          this.#resumedBytes = m.bytes
          return
        case 'complete':
          return await this.#onComplete(m.epoch, m.digests)
        case 'cancel':
          return this.fail(Object.assign(new MultifdError('ERR_MULTIFD_CANCELLED', 'the source cancelled the migration'), { remote: true }), 'cancelled')
        case 'error':
          return this.fail(remoteError(m, 'source'))
        default:
          throw new MultifdError('ERR_MULTIFD_PROTOCOL', `unexpected control message ${m.type} from the source`)
      }
    } catch (e) {
      this.fail(e)
    }
  }

  async #onHello(h: Hello): Promise<void> {
    clearTimeout(this.#helloTimer)
    if (this.state !== 'setup') throw new MultifdError('ERR_MULTIFD_PROTOCOL', 'a second hello on the control connection')
    if (h.protocol !== PROTOCOL_VERSION) throw new MultifdError('ERR_MULTIFD_PROTOCOL', `source speaks control protocol ${h.protocol}, this destination ${PROTOCOL_VERSION}`)
    this.#session = h.session
    // The control connection (and its TLS session) is registered before its first frame.
    this.publishTls()
    const expected = this.#options.channels
    if (expected !== undefined && expected !== h.channels) {
      throw new MultifdError('ERR_MULTIFD_CHANNEL_COUNT_MISMATCH', `source announced ${h.channels} channel(s), this destination expects ${expected}`)
    }
    // The whole announcement (page size, block names once, lengths) was checked by the core
    // before this hello reached us, so nothing is made, resized or written for a bad one.
    const blocks = await this.#resolveBlocks(h)
    this.#blocks = blocks
    this.#channels = h.channels
    this.#integrity = h.integrity === 'xxh3'
    for (const b of blocks) this.#native.addBlock(b.native)
    native(() =>
      this.#native.configure({
        uuid: Buffer.from(h.session, 'hex'),
        channels: h.channels,
        pageSize: h.pageSize,
        compression: h.compression,
        channelTimeoutMs: this.#options.channelTimeoutMs,
        integrity: this.#integrity,
        resumeWindowMs: this.#options.resumeWindowMs,
        ...(this.#options.peerTimeoutMs === 0 ? {} : { peerTimeoutMs: this.#options.peerTimeoutMs }),
      }),
    )
    this.#send({ type: 'welcome', protocol: PROTOCOL_VERSION })
    if (this.#options.peerTimeoutMs > 0) this.startLiveness(this.#options.peerTimeoutMs, () => this.#send({ type: 'ping' }), (e) => this.#native.dropControl(e.code, e.message))
    this.setState('active')
  }

  /**
   * A source asks what this side holds: the `resume.held` pieces with their digests (none
   * without the option), one `held` message per HELD_RANGES_PER_FRAME pieces, each sent as
   * soon as its digests are ready (so a large block keeps the source's wait moving).
   */
  async #offerHeld(): Promise<void> {
    if (this.state !== 'active' || this.#askedHeld) throw new MultifdError('ERR_MULTIFD_OUT_OF_SEQUENCE', 'resume arrived twice, or before the handshake')
    this.#askedHeld = true
    const held = this.#options.resume?.held
    const offered: Array<{ block: number; index: number }> = []
    for (const [i, b] of this.#blocks.entries()) {
      if (!held) break
      const count = pieceCount(b.size)
      const asked = held(b)
      const pieces = asked === 'all' ? Array.from({ length: count }, (_, p) => p) : [...new Set(asked)].sort((x, y) => x - y)
      const bad = pieces.find((p) => !Number.isInteger(p) || p < 0 || p >= count)
      if (bad !== undefined) throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', `resume.held names piece ${bad} of block ${JSON.stringify(b.name)}, which has ${count}`)
      native(() => b.native.markHeld(pieces))
      offered.push(...pieces.map((index) => ({ block: i, index })))
    }
    for (let at = 0; at === 0 || at < offered.length; at += HELD_RANGES_PER_FRAME) {
      const part = offered.slice(at, at + HELD_RANGES_PER_FRAME)
      const ranges: Array<{ block: number; index: number; xxh3: string }> = []
      // One digest task per run of pieces of one block, off the JavaScript thread.
      for (let k = 0; k < part.length; ) {
        let end = k
        while (end < part.length && part[end]!.block === part[k]!.block) end++
        const run = part.slice(k, end)
        const digests = await this.#blocks[part[k]!.block]!.native.pieceDigests(run.map((r) => r.index))
        run.forEach((r, j) => ranges.push({ ...r, xxh3: digests[j]! }))
        k = end
      }
      if (this.state !== 'active') return
      this.#send({ type: 'held', ranges, done: at + HELD_RANGES_PER_FRAME >= offered.length })
    }
  }

  /** A sync barrier passed: with `resume.onDurable`, flush the blocks and report the pieces complete as of it. */
  #durableAt(): void {
    const hook = this.#options.resume?.onDurable
    if (!hook) return
    // Taken now, at the barrier the event reports (or a later one): only pages that landed.
    this.#undurable = native(() => this.#native.completePieces()) ?? undefined
    if (this.#flushing) return
    this.#flushing = true
    void (async () => {
      try {
        for (let next = this.#undurable; next; next = this.#undurable) {
          this.#undurable = undefined
          for (const b of this.#blocks) {
            const failure = await b.native.flush()
            if (failure) throw new MultifdError(codeOf(failure.code), failure.message)
          }
          if (this.state === 'completed') return
          const blocks = next.blocks
          await hook({ epoch: next.epoch, blocks: this.#blocks.map((block, i) => ({ block, pieces: new Uint8Array(blocks[i]!) })) })
        }
      } catch (e) {
        this.fail(e)
      } finally {
        this.#flushing = false
      }
    })()
  }

  protected override resumed(): number | undefined {
    return this.#options.resume ? (this.#resumedBytes ?? 0) : undefined
  }

  async #resolveBlocks(h: Hello): Promise<RamBlock[]> {
    const spec = this.#options.blocks
    const table = h.blocks.map((b) => ({ ...b, pageSize: h.pageSize }))
    const blocks = typeof spec === 'function' ? await spec(table) : spec
    const problems: string[] = []
    const byName = new Map(blocks.map((b) => [b.name, b]))
    for (const t of table) {
      const b = byName.get(t.name)
      if (!b) problems.push(`${JSON.stringify(t.name)} (${t.length} bytes) is not registered here`)
      else if (b.size !== t.length) problems.push(`${JSON.stringify(t.name)} is ${t.length} bytes on the source, ${b.size} here`)
      else if (b.pageSize !== h.pageSize) problems.push(`${JSON.stringify(t.name)} has ${b.pageSize}-byte pages here, the source uses ${h.pageSize}`)
    }
    const announced = new Set(table.map((t) => t.name))
    for (const b of blocks) if (!announced.has(b.name)) problems.push(`${JSON.stringify(b.name)} is registered here but not sent by the source`)
    if (problems.length > 0) throw new MultifdError('ERR_MULTIFD_BLOCK_MISMATCH', `block tables differ: ${problems.join('; ')}`)
    return table.map((t) => byName.get(t.name)!)
  }

  async #onComplete(epoch: number, digests?: Array<{ name: string; xxh3: string }>): Promise<void> {
    // A source whose control connection broke sends `complete` again if it may have been lost.
    if (this.#completing) return
    this.#completing = true
    if (this.state !== 'active') throw new MultifdError('ERR_MULTIFD_PROTOCOL', `complete arrived in state ${this.state}`)
    // Accepted natively only when every announced channel was admitted and delivered this
    // epoch's SYNC (ERR_MULTIFD_OUT_OF_SEQUENCE otherwise); the channel readers are joined.
    native(() => this.#native.complete(epoch))
    if (this.#integrity) {
      if (!digests || digests.length !== this.#blocks.length) throw new MultifdError('ERR_MULTIFD_PROTOCOL', 'integrity was negotiated but complete carries no block digests')
      const blocks = digests.map((d) => {
        const b = this.#blocks.find((x) => x.name === d.name)
        if (!b) throw new MultifdError('ERR_MULTIFD_PROTOCOL', `complete carries a digest for unknown block ${JSON.stringify(d.name)}`)
        return b
      })
      // From the digests the channels took of the pages as they landed (pages never received in
      // this session are hashed from memory): native work off the JavaScript thread; a cancel
      // or error may end the session meanwhile.
      const here = await blockDigests(blocks, (b) => this.#native.completionDigest(b.native))
      if (this.state !== 'active') return
      digests.forEach((d, i) => {
        if (here[i]!.xxh3 !== d.xxh3) throw new MultifdError('ERR_MULTIFD_INTEGRITY', `block ${JSON.stringify(d.name)} differs after the migration: xxh3 ${here[i]!.xxh3} here, ${d.xxh3} on the source`)
      })
    }
    this.setState('device')
    this.#send({ type: 'completed' })
    this.#completedSent = true
    // Until the source closes the control connection it may still have to reconnect to hear
    // `completed` (a break just after it went out), so the listener stays up until then:
    // at most resumeWindowMs after a break, or handshakeTimeoutMs for a source that lingers.
    if (this.#options.resumeWindowMs > 0) await this.#controlEnd()
    if (!this.error) this.succeed()
  }

  #controlEnd(): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => this.#controlEnded?.(), this.#options.handshakeTimeoutMs + this.#options.resumeWindowMs)
      this.#controlEnded = () => {
        clearTimeout(timer)
        this.#controlEnded = undefined
        resolve()
      }
    })
  }

  protected override tellPeer(e: MultifdError): void {
    if (e.code === 'ERR_MULTIFD_CANCELLED' && e.remote) return
    try {
      this.#native.sendControl({ type: 'error', code: e.code, message: e.message })
    } catch {
      // the control connection may be what failed, or never existed
    }
  }

  protected override nativeTls(): TlsSummary | undefined {
    return this.#closed ? undefined : tlsSummary(this.#native.tlsInfo())
  }

  protected override closeNative(_abort: boolean): void {
    clearTimeout(this.#helloTimer)
    if (this.#closed) return
    this.#closed = true
    this.#native.close()
  }

  protected override nativeStats(): ChannelStats[] {
    return this.#native.stats()
  }

  /** The session's stats, and the connections rejected so far (see `DestinationStats`). */
  override stats(): DestinationStats {
    return { ...super.stats(), rejectedConnections: this.#native.rejectedConnections() }
  }

  protected override channelCount(): number {
    return this.#channels
  }
}
