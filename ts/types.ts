/**
 * Types the facade's modules share (sessions, live migration, TLS, the CLI): one module, so
 * no facade file needs another's implementation for a type.
 */
import type { ChannelCounters, LinkState } from './native/binding.cjs'
import type { MultifdError, MultifdErrorCode } from './errors.js'
import type { MigrationState, Role } from './state.js'

/**
 * Where a channel's connection stands: `up`; `recovering` (source: redialling after a
 * connection fault); `lost` (destination: broken, its replacement awaited within
 * `resumeWindowMs`; source: given up on).
 */
export type ChannelState = `${LinkState}`

/** One channel's counters, read from Rust atomics (fields documented in `ChannelCounters`), and its state. */
export type ChannelStats = Omit<ChannelCounters, 'state'> & { state: ChannelState }

/** One repaired connection: the `recovery` event, `multifd:recovery` on diagnostics_channel, `stats().recoveries`, the summary. */
export interface Recovery {
  /** A channel id, or 'control'. */
  connection: number | 'control'
  side: 'source' | 'destination'
  /** Why it broke. */
  cause: { code: MultifdErrorCode; message: string }
  /** Pages sent again (source) or expected again (destination) because of it. */
  pagesResent: number
  /** From the break being noticed to the replacement carrying traffic, in ms. */
  ms: number
}

export interface Stats extends Omit<ChannelStats, 'state'> {
  channels: ChannelStats[]
  /** Every connection repaired so far, in order. */
  recoveries: Recovery[]
  /** Seconds since the session became active. */
  seconds: number
  /** Bytes per second over `seconds`. */
  bytesPerSecond: number
}

/** A destination's stats: its session's, and the connections it turned away. */
export interface DestinationStats extends Stats {
  /**
   * Connections closed because they never identified themselves as this session's control
   * connection or one of its channels (a port scanner, a health check, a foreign certificate,
   * another session's channel): never fatal, each reported as a `warning` naming the peer and
   * the reason (at most 10 a second, then one summary a second).
   */
  rejectedConnections: number
}

/** The outcome of a session, as the CLI prints it. */
export interface Summary {
  role: Role
  status: 'completed' | 'failed' | 'cancelled'
  /** Bytes moved on the multifd channels, headers included. */
  bytes: number
  seconds: number
  bytesPerSecond: number
  channels: number
  pages: { normal: number; zero: number }
  syncs: number
  perChannel: ChannelStats[]
  /** Every connection repaired during the session, in order. */
  recoveries: Recovery[]
  error?: { code: string; message: string }
  /** With TLS: what the control connection negotiated and who the peer is. */
  tls?: TlsSummary
  /**
   * With resume on (`resume` on the source, the destination's `resume` option): bytes the
   * source did not send because the destination already held them (equal piece digests).
   */
  resumedBytes?: number
}

/** A session's TLS, as negotiated on its control connection (the channels use the same credentials). */
export interface TlsSummary {
  /** `TLS 1.3` or `TLS 1.2`. */
  protocol: string
  /** e.g. `TLS13_AES_128_GCM_SHA256`. */
  cipherSuite: string
  /** The identity in the peer's verified certificate. */
  peer?: { subject: string; altNames: string[] }
}

/** What the live loop decided at the end of a round. */
export type RoundDecision =
  /** More dirty bytes than the limit allows: another round. */
  | 'continue'
  /** The dirty bytes left fit the downtime limit: switch over. */
  | 'switchover'
  /** `maxRounds` reached without fitting, `onNoConvergence: 'switchover'`: switch over anyway. */
  | 'forced-switchover'
  /** `maxRounds` reached without fitting, `onNoConvergence: 'fail'`: the migration fails. */
  | 'fail'
  /** The final round (writers paused): the migration completed. */
  | 'complete'

/** One round of a live migration, as the `round` event and `multifd:round` carry it. */
export interface RoundStats {
  /** 0 is the full pass; every later round sends the pages dirtied during the one before. */
  round: number
  /** The round sent after switchover, with the writers paused. */
  final: boolean
  /** Dirty pages this round sent (zero pages included). */
  pages: number
  /** Bytes on the channels during the round (headers and SYNC packets included). */
  bytes: number
  /** From the start of the round until the destination passed its sync (final: completed). */
  durationMs: number
  /** `bytes / durationMs`, in bytes per second: the bandwidth measured in this round. */
  bandwidth: number
  /** Pages dirtied while the round ran: the next round's work. */
  dirtyPagesLeft: number
  dirtyBytesLeft: number
  /**
   * The downtime if the switchover came now: `switchoverCostMs` (the round trips the final
   * round pays whatever its size) plus `dirtyBytesLeft / bandwidth`.
   */
  expectedDowntimeMs: number
  decision: RoundDecision
  /** Final round only: from `onSwitchover` returning to the destination reporting completion. */
  downtimeMs?: number
}

export interface SessionEvents {
  state: [state: MigrationState, previous: MigrationState]
  sync: [epoch: number, packetNum: number]
  channel: [id: number]
  failed: [error: MultifdError]
  /** Something degraded without failing the session (e.g. zero-copy fell back to copying). */
  warning: [warning: MultifdError]
  /** A broken connection was repaired (also on `multifd:recovery`). */
  recovery: [recovery: Recovery]
  /** Source of a live migration: a round ended (also on `multifd:round`). */
  round: [stats: RoundStats]
  /** With TLS: the control connection is authenticated both ways (also on `multifd:tls`). */
  tls: [tls: TlsSummary]
}

