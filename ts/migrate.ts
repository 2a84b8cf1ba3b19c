import { Source, type SourceOptions } from './source.js'
import type { Summary } from './types.js'
import { migrateLive, type LiveMigrateOptions, type LiveSummary } from './live.js'

export type MigrateOptions = SourceOptions & {
  /** Called with the connected source, e.g. to subscribe to its events or cancel it. */
  onSource?: (source: Source) => void
  /** `true` runs the live loop (see `LiveMigrateOptions`); absent or false sends once. */
  live?: false
}

/**
 * Moves every page of `blocks` to the destination at `address` and completes: connect,
 * send all, final sync, complete. Resolves with the source's summary.
 *
 * With `live: true`, memory may change while it is copied: rounds of dirty pages follow the
 * full pass until what is left fits `downtimeLimitMs`, then `onSwitchover` pauses the writers
 * and the last round completes the migration (ts/live.ts). Resolves with a `LiveSummary`.
 */
export function migrate(options: LiveMigrateOptions): Promise<LiveSummary>
export function migrate(options: MigrateOptions): Promise<Summary>
export async function migrate(options: MigrateOptions | LiveMigrateOptions): Promise<Summary | LiveSummary> {
  if (options.live === true) return migrateLive(options)
  const { onSource, live: _live, ...sourceOptions } = options
  const source = await Source.connect(sourceOptions)
  onSource?.(source)
  await source.sendAll()
  return source.complete()
}
