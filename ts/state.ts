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

/** `multifd:recovery` — `{ role, session, address, ...Recovery }` when a broken connection was replaced. */
export const recoveryChannel = diagnostics.channel('multifd:recovery')

/** `multifd:warning` — `{ role, session, address, warning }` when something degrades. */
export const warningChannel = diagnostics.channel('multifd:warning')

/**
 * `multifd:round` — `{ role, session, address, ...RoundStats }` after every round of a live
 * migration (source side): pages, bytes, duration, bandwidth, dirty pages left, expected
 * downtime; the final round also carries the real downtime.
 */
export const roundChannel = diagnostics.channel('multifd:round')

/**
 * The state machine, as one table: the states each state may move to. Any state but a final
 * one may fail or be cancelled; `cancelling` ends `cancelled` (or `failed`, when the
 * cancellation itself broke). Every transition a session makes is checked against it.
 */
const TRANSITIONS: Readonly<Record<MigrationState, readonly MigrationState[]>> = {
  none: ['setup', 'failed', 'cancelling', 'cancelled'],
  setup: ['active', 'failed', 'cancelling', 'cancelled'],
  active: ['device', 'failed', 'cancelling', 'cancelled'],
  device: ['completed', 'failed', 'cancelling', 'cancelled'],
  cancelling: ['cancelled', 'failed'],
  completed: [],
  failed: [],
  cancelled: [],
}

export function isFinal(s: MigrationState): boolean {
  return TRANSITIONS[s].length === 0
}

/** Whether a session in state `from` may move to `to`. */
export function canMove(from: MigrationState, to: MigrationState): boolean {
  return TRANSITIONS[from].includes(to)
}
