import { Source, type SourceOptions } from './source.js'
import type { Summary } from './session.js'

export type MigrateOptions = SourceOptions & {
  /** Called with the connected source, e.g. to subscribe to its events or cancel it. */
  onSource?: (source: Source) => void
}

/**
 * Moves every page of `blocks` to the destination at `address` and completes: connect,
 * send all, final sync, complete. Resolves with the source's summary.
 */
export async function migrate(options: MigrateOptions): Promise<Summary> {
  const { onSource, ...sourceOptions } = options
  const source = await Source.connect(sourceOptions)
  onSource?.(source)
  await source.sendAll()
  return source.complete()
}
