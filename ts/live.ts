/**
 * Live migration, as QEMU's precopy loop (ram.c, migration.c): memory keeps changing while it
 * is copied. Round 0 sends every page; each later round takes and clears the dirty bitmaps,
 * sends those pages and syncs. After every round the loop compares the dirty bytes left with
 * what the bandwidth measured in that round moves within the downtime limit. Once they fit
 * (or the no-convergence policy says so), `onSwitchover` pauses the application's writers,
 * the final round goes out, and both sides complete.
 *
 * Rounds, the convergence test and switchover are decided here; bytes and throttling are the
 * Rust data plane's (the session-wide token bucket behind `maxBandwidth`).
 */
import { z } from 'zod'
import { MultifdError, asMultifdError } from './errors.js'
import { parseOptions } from './options.js'
import { Source, type SourceOptions } from './source.js'
import { roundChannel } from './state.js'
import type { RoundDecision, RoundStats, Summary } from './types.js'

export type { RoundDecision, RoundStats } from './types.js'

const LiveOptionsSchema = z.strictObject({
  live: z.literal(true),
  /** Longest acceptable pause of the writers, in ms (QEMU's `downtime-limit`, default 300). */
  downtimeLimitMs: z.number().positive().default(300),
  /**
   * Rounds before the switchover, round 0 included (default 30). If the last of them still
   * leaves more dirty bytes than the limit allows, `onNoConvergence` decides.
   */
  maxRounds: z.int().min(1).max(1_000_000).default(30),
  /**
   * Called once, when the loop switches over: pause every writer of the blocks (e.g. tell
   * worker threads to stop and wait for their answer) and return (or resolve) once they
   * stopped. Nothing may write the blocks after it returns.
   */
  onSwitchover: z.custom<() => unknown>((v) => typeof v === 'function', { error: 'onSwitchover must be a function that pauses the writers' }),
  /**
   * What to do when `maxRounds` pass without converging: `fail` (default) fails both sides
   * with `ERR_MULTIFD_NO_CONVERGENCE` and leaves the writers running; `switchover` switches
   * over anyway and accepts a downtime above the limit.
   */
  onNoConvergence: z.enum(['fail', 'switchover']).default('fail'),
})

export type LiveOptions = z.input<typeof LiveOptionsSchema>

export type LiveMigrateOptions = SourceOptions &
  LiveOptions & {
    /** Called with the connected source, e.g. to subscribe to `round` events, change the bandwidth limit or cancel. */
    onSource?: (source: Source) => void
  }

/** The source's summary of a live migration. */
export interface LiveSummary extends Summary {
  live: true
  /** Every round, the final one last. */
  rounds: RoundStats[]
  /** Whether the dirty bytes left came to fit the downtime limit. */
  converged: boolean
  /** Why the loop switched over: convergence, or `onNoConvergence: 'switchover'`. */
  switchoverReason: 'converged' | 'no-convergence'
  /** What the last round before the switchover predicted. */
  expectedDowntimeMs: number
  /**
   * The part of every downtime that does not depend on the dirty bytes: the final sync and the
   * completion exchange, two round trips to the destination, measured before round 0 with an
   * empty sync (the best of three).
   */
  switchoverCostMs: number
  /** The real downtime: from `onSwitchover` returning to the destination reporting completion. */
  downtimeMs: number
  downtimeLimitMs: number
}

const LIVE_KEYS = ['live', 'downtimeLimitMs', 'maxRounds', 'onSwitchover', 'onNoConvergence'] as const

/** Connects a source and runs the live loop on it: `migrate({ live: true, ... })`. */
export async function migrateLive(options: LiveMigrateOptions): Promise<LiveSummary> {
  const { onSource, ...rest } = options
  const live: Record<string, unknown> = {}
  const sourceOptions: Record<string, unknown> = { ...rest }
  for (const k of LIVE_KEYS) {
    if (k in sourceOptions) live[k] = sourceOptions[k]
    delete sourceOptions[k]
  }
  const o = parseOptions(LiveOptionsSchema, live, 'live migration options')
  const source = await Source.connect(sourceOptions as SourceOptions)
  onSource?.(source)
  return runLive(source, o)
}

/**
 * Runs the live loop on a connected source (state `active`, nothing sent yet or pages already
 * sent: round 0 sends everything regardless) and completes it. Resolves with the summary;
 * rejects with the source's first error (cancel, failure, `ERR_MULTIFD_NO_CONVERGENCE`).
 */
export async function runLiveMigration(source: Source, options: Omit<LiveOptions, 'live'>): Promise<LiveSummary> {
  return runLive(source, parseOptions(LiveOptionsSchema, { ...options, live: true }, 'live migration options'))
}

async function runLive(source: Source, o: z.output<typeof LiveOptionsSchema>): Promise<LiveSummary> {
  const pageSize = source.blocks[0]!.pageSize
  const dirtyPages = (): number => source.blocks.reduce((a, b) => a + b.dirtyPages, 0)
  const rounds: RoundStats[] = []
  const publish = (r: RoundStats): void => {
    rounds.push(r)
    if (roundChannel.hasSubscribers) roundChannel.publish({ role: source.role, session: source.session, address: source.address, ...r })
    source.emit('round', r)
  }
  // The final round pays two round trips (its sync, then complete/completed) however little it
  // sends: an empty sync measures one, so the estimate below does not promise what the
  // destination's reply time alone would break.
  let switchoverCostMs = 0
  const measure = (round: number, started: number, bytesBefore: number, pages: number, final: boolean) => {
    const durationMs = performance.now() - started
    const bytes = source.stats().bytes - bytesBefore
    const bandwidth = durationMs > 0 ? (bytes * 1000) / durationMs : 0
    const dirtyPagesLeft = dirtyPages()
    const dirtyBytesLeft = dirtyPagesLeft * pageSize
    const expectedDowntimeMs = switchoverCostMs + (dirtyBytesLeft === 0 ? 0 : bandwidth > 0 ? (dirtyBytesLeft * 1000) / bandwidth : Infinity)
    return { round, final, pages, bytes, durationMs, bandwidth, dirtyPagesLeft, dirtyBytesLeft, expectedDowntimeMs }
  }

  let switchoverFailed: MultifdError | undefined
  try {
    // The best of three empty syncs: load only ever adds to a round trip, so the minimum is
    // the estimate least disturbed by a busy moment.
    let roundTripMs = Infinity
    for (let i = 0; i < 3; i++) {
      const probeStarted = performance.now()
      await source.sync()
      roundTripMs = Math.min(roundTripMs, performance.now() - probeStarted)
    }
    switchoverCostMs = 2 * roundTripMs
    // Iterative rounds, the writers running.
    let reason: LiveSummary['switchoverReason'] | undefined
    let last: RoundStats | undefined
    for (let round = 0; reason === undefined; round++) {
      const started = performance.now()
      const bytesBefore = source.stats().bytes
      if (round === 0) {
        // Every page, taken atomically as one bitmap: a write during the round marks its page
        // for round 1, whether or not its first copy has gone yet.
        for (const b of source.blocks) b.markAllDirty()
      } else {
        source.markRound()
      }
      const pages = await source.sendDirty()
      await source.sync()
      const m = measure(round, started, bytesBefore, pages, false)
      let decision: RoundDecision = 'continue'
      if (m.expectedDowntimeMs <= o.downtimeLimitMs) {
        decision = 'switchover'
        reason = 'converged'
      } else if (round + 1 >= o.maxRounds) {
        decision = o.onNoConvergence === 'fail' ? 'fail' : 'forced-switchover'
        reason = 'no-convergence'
      }
      last = { ...m, decision }
      publish(last)
      if (decision === 'fail') {
        const err = new MultifdError(
          'ERR_MULTIFD_NO_CONVERGENCE',
          `live migration did not converge in ${round + 1} round(s): ${m.dirtyBytesLeft} dirty bytes left would take ` +
            `${m.expectedDowntimeMs.toFixed(1)} ms at the ${Math.round(m.bandwidth)} bytes/s measured in the last round, the downtime limit is ${o.downtimeLimitMs} ms`,
        )
        await source.abort(err)
        throw err
      }
    }

    // Switchover: the application pauses its writers; from here on the clock runs.
    try {
      await o.onSwitchover()
    } catch (e) {
      // Writers in an unknown state: nothing more is sent, both sides end cancelled.
      await source.cancel()
      switchoverFailed = new MultifdError('ERR_MULTIFD_CANCELLED', `onSwitchover failed, the migration was cancelled: ${e instanceof Error ? e.message : String(e)}`, { cause: e })
      throw switchoverFailed
    }
    const paused = performance.now()
    const round = last!.round + 1
    const bytesBefore = source.stats().bytes
    source.markRound()
    const pages = await source.sendDirty()
    const summary = await source.complete()
    const downtimeMs = (source.completedAt ?? performance.now()) - paused
    const m = measure(round, paused, bytesBefore, pages, true)
    // dirtyPagesLeft of the final round should be 0: a page dirty now was written after
    // onSwitchover returned, which the contract rules out; it is reported, not hidden.
    publish({ ...m, durationMs: downtimeMs, bandwidth: downtimeMs > 0 ? (m.bytes * 1000) / downtimeMs : 0, expectedDowntimeMs: 0, decision: 'complete', downtimeMs })
    return {
      ...summary,
      live: true,
      rounds,
      converged: reason === 'converged',
      switchoverReason: reason!,
      expectedDowntimeMs: last!.expectedDowntimeMs,
      switchoverCostMs,
      downtimeMs,
      downtimeLimitMs: o.downtimeLimitMs,
    }
  } catch (e) {
    // A failed or cancelled session rejects with its first error, whatever step noticed it
    // (a failing onSwitchover keeps its own error, the cause).
    if (e === switchoverFailed) throw e
    // A cancel in progress makes the next call fail with ERR_MULTIFD_STATE; wait for the
    // cancellation itself, which is the real outcome.
    if (!source.error && source.state === 'cancelling') await source.done.catch(() => undefined)
    throw source.error ?? asMultifdError(e)
  }
}
