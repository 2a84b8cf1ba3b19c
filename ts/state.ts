/**
 * Migration states, as QEMU's, and their observation: every transition is an event on the
 * session and a message on the `multifd:state` diagnostics channel.
 */
import diagnostics from 'node:diagnostics_channel'

export type MigrationState = 'none' | 'setup' | 'active' | 'device' | 'completed' | 'failed' | 'cancelling' | 'cancelled'

export type Role = 'source' | 'destination'

/** `multifd:state` — `{ role, session, address, from, to }` on every transition. */
export const stateChannel = diagnostics.channel('multifd:state')
/** `multifd:sync` — `{ role, session, address, epoch, packetNum }` when a sync barrier is passed. */
export const syncChannel = diagnostics.channel('multifd:sync')
/** `multifd:error` — `{ role, session, address, error }` when a session fails. */
export const errorChannel = diagnostics.channel('multifd:error')

/**
 * `multifd:tls` — `{ role, session, address, protocol, cipherSuite, peer }` once a session's
 * control connection is authenticated both ways: who is on the other end.
 */
export const tlsChannel = diagnostics.channel('multifd:tls')

/** `multifd:warning` — `{ role, session, address, warning }` when something degrades. */
export const warningChannel = diagnostics.channel('multifd:warning')

/**
 * `multifd:round` — `{ role, session, address, ...RoundStats }` after every round of a live
 * migration (source side): pages, bytes, duration, bandwidth, dirty pages left, expected
 * downtime; the final round also carries the real downtime.
 */
export const roundChannel = diagnostics.channel('multifd:round')

const FINAL: ReadonlySet<MigrationState> = new Set(['completed', 'failed', 'cancelled'])

export function isFinal(s: MigrationState): boolean {
  return FINAL.has(s)
}
