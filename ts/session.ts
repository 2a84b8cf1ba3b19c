/**
 * What Source and Destination share: state transitions with their events, first-error-wins
 * failure, request promises keyed by id, and stats.
 */
import { EventEmitter } from 'node:events'
import { MultifdError, asMultifdError, codeOf, nativeError } from './errors.js'
import { type MigrationState, type Role, canMove, errorChannel, isFinal, recoveryChannel, stateChannel, syncChannel, tlsChannel, warningChannel } from './state.js'
import type { ChannelStats, Recovery, SessionEvents, Stats, Summary, TlsSummary } from './types.js'
import type { NativeEvent } from './native.js'

export type { ChannelStats, Recovery, SessionEvents, Stats, Summary, TlsSummary } from './types.js'

interface Pending {
  resolve: (v: number) => void
  reject: (e: MultifdError) => void
}

type Counter = Exclude<keyof ChannelStats, 'state'>

export function totals(channels: ChannelStats[], startedAt: number | undefined, recoveries: Recovery[] = []): Stats {
  const sum = (k: Counter): number => channels.reduce((a, c) => a + c[k], 0)
  const seconds = startedAt === undefined ? 0 : (performance.now() - startedAt) / 1000
  const bytes = sum('bytes')
  // Barriers every channel passed: a channel given up (or awaiting its replacement) is not waited for.
  const counted = channels.filter((c) => c.state !== 'lost')
  return {
    channels,
    recoveries,
    bytes,
    packets: sum('packets'),
    normalPages: sum('normalPages'),
    zeroPages: sum('zeroPages'),
    zeroCopySends: sum('zeroCopySends'),
    zeroCopyCompletions: sum('zeroCopyCompletions'),
    zeroCopyCopied: sum('zeroCopyCopied'),
    zeroCopyEnobufs: sum('zeroCopyEnobufs'),
    zeroCopyFallbacks: sum('zeroCopyFallbacks'),
    syncs: counted.length === 0 ? 0 : Math.min(...counted.map((c) => c.syncs)),
    seconds,
    bytesPerSecond: seconds > 0 ? bytes / seconds : 0,
  }
}

export abstract class Session extends EventEmitter<SessionEvents> {
  readonly role: Role
  /** Session UUID as 32 hex digits (a destination learns it from the source's hello). */
  abstract readonly session: string
  /** The destination's address (where the source connects, where the destination listens). */
  abstract readonly address: string
  #state: MigrationState = 'none'
  #error: MultifdError | undefined
  #pending = new Map<number, Pending>()
  #waiters = new Set<(e?: MultifdError) => void>()
  #nextId = 1
  #startedAt: number | undefined
  /** Counters as they were when the native side closed. */
  #finalStats: ChannelStats[] | undefined
  #endedAt: number | undefined
  #recoveries: Recovery[] = []
  #settled: Promise<Summary>
  #settle!: { resolve: (s: Summary) => void; reject: (e: MultifdError) => void }

  protected constructor(role: Role) {
    super()
    this.role = role
    this.#settled = new Promise<Summary>((resolve, reject) => {
      this.#settle = { resolve, reject }
    })
    // A failure is reported through the promise and the 'failed' event; nobody has to await.
    this.#settled.catch(() => undefined)
  }

  get state(): MigrationState {
    return this.#state
  }

  /** The first error, once the session has failed or was cancelled. */
  get error(): MultifdError | undefined {
    return this.#error
  }

  /** Settles when the session ends: resolves with the summary, rejects with the first error. */
  get done(): Promise<Summary> {
    return this.#settled
  }

  protected abstract nativeStats(): ChannelStats[]
  protected abstract channelCount(): number
  /** Shuts sockets down and joins threads; `abort` for failure or cancel. */
  protected abstract closeNative(abort: boolean): void
  /** The native session's TLS, while its control connection is open; undefined without TLS. */
  protected abstract nativeTls(): TlsSummary | undefined
  /** Tells the peer why this side failed (best effort). */
  protected abstract tellPeer(e: MultifdError): void

  /** With resume on: bytes the source left out because the destination held them. */
  protected resumed(): number | undefined {
    return undefined
  }

  stats(): Stats {
    const s = totals(this.#finalStats ?? this.nativeStats(), this.#startedAt, [...this.#recoveries])
    if (this.#endedAt !== undefined && this.#startedAt !== undefined) {
      s.seconds = (this.#endedAt - this.#startedAt) / 1000
      s.bytesPerSecond = s.seconds > 0 ? s.bytes / s.seconds : 0
    }
    return s
  }

  /** Moves to `next`, checked against the state table (`state.ts`); a final state stays. */
  protected setState(next: MigrationState): void {
    const previous = this.#state
    if (previous === next || isFinal(previous)) return
    if (!canMove(previous, next)) throw new MultifdError('ERR_MULTIFD_STATE', `${this.role}: no transition from ${previous} to ${next}`)
    this.#state = next
    if (next === 'active' && this.#startedAt === undefined) this.#startedAt = performance.now()
    if (isFinal(next)) this.#endedAt = performance.now()
    if (stateChannel.hasSubscribers) stateChannel.publish({ role: this.role, session: this.session, address: this.address, from: previous, to: next })
    this.emit('state', next, previous)
  }

  /** With TLS, announces the authenticated peer (event `tls`, channel `multifd:tls`). */
  protected publishTls(): void {
    const tls = this.tls
    if (!tls) return
    if (tlsChannel.hasSubscribers) tlsChannel.publish({ role: this.role, session: this.session, address: this.address, ...tls })
    this.emit('tls', tls)
  }

  protected publishSync(epoch: number, packetNum: number): void {
    if (syncChannel.hasSubscribers) syncChannel.publish({ role: this.role, session: this.session, address: this.address, epoch, packetNum })
    this.emit('sync', epoch, packetNum)
  }

  #liveness: NodeJS.Timeout | undefined
  #lastHeard = 0

  /**
   * Peer liveness over the control connection: sends `ping` every third of `timeoutMs` and
   * fails with ERR_MULTIFD_TIMEOUT when nothing has been heard from the peer for `timeoutMs`
   * (an idle but healthy peer keeps pinging; a stalled or hung one does not), unless
   * `repair(error)` drops the control connection to have it replaced (then the wait restarts).
   */
  protected startLiveness(timeoutMs: number, ping: () => void, repair: (e: MultifdError) => boolean = () => false): void {
    this.#lastHeard = performance.now()
    this.#liveness = setInterval(() => {
      if (isFinal(this.#state)) return this.stopLiveness()
      if (performance.now() - this.#lastHeard > timeoutMs) {
        const silent = new MultifdError('ERR_MULTIFD_TIMEOUT', `${this.role}: nothing heard from the peer for ${timeoutMs} ms (peerTimeoutMs)`)
        if (repair(silent)) {
          this.heard()
          return
        }
        this.stopLiveness()
        this.fail(silent)
        return
      }
      try {
        ping()
      } catch {
        // a failing control connection is reported by its own event
      }
    }, Math.max(10, Math.floor(timeoutMs / 3)))
    this.#liveness.unref()
  }

  /** Milliseconds since the peer last spoke on the control connection. */
  protected silentMs(): number {
    return performance.now() - this.#lastHeard
  }

  /** Records that the peer spoke (any control message). */
  protected heard(): void {
    this.#lastHeard = performance.now()
  }

  protected stopLiveness(): void {
    clearInterval(this.#liveness)
    this.#liveness = undefined
  }

  /** A native `recovery` event: recorded, emitted and published on `multifd:recovery`. */
  protected recovered(ev: Extract<NativeEvent, { kind: 'recovery' }>): void {
    const r: Recovery = {
      connection: ev.connection ?? 'control',
      side: this.role,
      cause: { code: nativeError(ev.cause).code, message: ev.cause.message },
      pagesResent: ev.pagesResent,
      ms: ev.ms,
    }
    this.#recoveries.push(r)
    if (recoveryChannel.hasSubscribers) recoveryChannel.publish({ role: this.role, session: this.session, address: this.address, ...r })
    this.emit('recovery', r)
  }

  protected warn(w: MultifdError): void {
    if (warningChannel.hasSubscribers) warningChannel.publish({ role: this.role, session: this.session, address: this.address, warning: w })
    this.emit('warning', w)
  }

  /** Registers a request the native side will answer with a `done` event. */
  protected request(start: (id: number) => void): Promise<number> {
    if (this.#error) return Promise.reject(this.#error)
    const id = this.#nextId++
    return new Promise<number>((resolve, reject) => {
      this.#pending.set(id, { resolve, reject })
      try {
        start(id)
      } catch (e) {
        this.#pending.delete(id)
        reject(asMultifdError(e))
      }
    })
  }

  protected answer(id: number, value: number | MultifdError): void {
    const p = this.#pending.get(id)
    if (!p) return
    this.#pending.delete(id)
    if (value instanceof MultifdError) p.reject(value)
    else p.resolve(value)
  }

  /**
   * Resolves with `check()`'s value once it is defined, re-checked whenever `recheck()` runs;
   * rejects when the session fails, or after `timeoutMs` (which also fails the session).
   */
  protected waitFor<T>(check: () => T | undefined, what: string, timeoutMs?: number): Promise<T> {
    if (this.#error) return Promise.reject(this.#error)
    const now = check()
    if (now !== undefined) return Promise.resolve(now)
    return new Promise<T>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined
      const waiter = (e?: MultifdError): void => {
        if (e) return finish(() => reject(e))
        const v = check()
        if (v !== undefined) finish(() => resolve(v))
      }
      const finish = (settle: () => void): void => {
        if (timer) clearTimeout(timer)
        this.#waiters.delete(waiter)
        settle()
      }
      this.#waiters.add(waiter)
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.fail(new MultifdError('ERR_MULTIFD_TIMEOUT', `${this.role}: ${what} did not happen within ${timeoutMs} ms`))
        }, timeoutMs)
      }
    })
  }

  /** Re-checks every `waitFor` condition. */
  protected recheck(): void {
    for (const w of [...this.#waiters]) w()
  }

  /**
   * First error wins: the first failure fails the session, tells the peer, shuts every socket
   * down, joins every thread, and rejects every pending promise with that error. Later errors
   * are kept on the first as `secondary`.
   */
  protected fail(e: unknown, final: 'failed' | 'cancelled' = 'failed'): void {
    let err = asMultifdError(e)
    // While cancelling, whatever breaks (the peer closing its sockets) is the cancellation.
    if (this.#state === 'cancelling' && !this.#error) {
      final = 'cancelled'
      if (err.code !== 'ERR_MULTIFD_CANCELLED') {
        const cancelled = new MultifdError('ERR_MULTIFD_CANCELLED', 'the migration was cancelled')
        cancelled.secondary.push(err)
        err = cancelled
      }
    }
    if (this.#error) {
      if (err !== this.#error) this.#error.secondary.push(err)
      return
    }
    if (isFinal(this.#state)) return
    this.#error = err
    if (!err.remote) this.tellPeer(err)
    this.#close(true)
    for (const [, p] of this.#pending) p.reject(err)
    this.#pending.clear()
    for (const w of [...this.#waiters]) w(err)
    this.setState(final)
    if (errorChannel.hasSubscribers) errorChannel.publish({ role: this.role, session: this.session, address: this.address, error: err })
    this.emit('failed', err)
    this.#settle.reject(err)
  }

  /** Ends the session successfully. */
  protected succeed(): void {
    this.#close(false)
    this.setState('completed')
    this.#settle.resolve(this.summary())
  }

  #close(abort: boolean): void {
    this.stopLiveness()
    this.#finalStats ??= this.nativeStats()
    this.#tls ??= this.nativeTls()
    this.closeNative(abort)
  }

  #tls: TlsSummary | undefined

  /** With TLS, what was negotiated and who the peer is (once connected); otherwise undefined. */
  get tls(): TlsSummary | undefined {
    return (this.#tls ??= this.nativeTls())
  }

  summary(): Summary {
    const s = this.stats()
    const status = this.#state === 'completed' ? 'completed' : this.#state === 'cancelled' ? 'cancelled' : 'failed'
    const resumedBytes = this.resumed()
    return {
      role: this.role,
      status,
      bytes: s.bytes,
      seconds: s.seconds,
      bytesPerSecond: s.bytesPerSecond,
      channels: this.channelCount(),
      pages: { normal: s.normalPages, zero: s.zeroPages },
      syncs: s.syncs,
      perChannel: s.channels,
      recoveries: s.recoveries,
      ...(this.#error ? { error: { code: this.#error.code, message: this.#error.message } } : {}),
      ...(this.tls ? { tls: this.tls } : {}),
      ...(resumedBytes === undefined ? {} : { resumedBytes }),
    }
  }
}
