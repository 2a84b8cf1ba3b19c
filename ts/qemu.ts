/** QEMU migration files written with the mapped-ram capability (`migrate file:...`). */
import { z } from 'zod'
import { binding } from './native.js'
import { MultifdError, asMultifdError, native } from './errors.js'
import { parseOptions } from './options.js'
import { Output, sameFile } from './outputs.js'
import type { QemuFileInfo } from './native/binding.cjs'

export type { QemuBlockInfo, QemuFileInfo } from './native/binding.cjs'

/** Parses the stream header, configuration section and RAM block list of a QEMU file. */
export function inspectQemuFile(path: string): QemuFileInfo {
  return native(() => binding.inspectQemuFile(parseOptions(z.string().min(1), path, 'QEMU file path')))
}

const ExtractOptions = z.strictObject({
  /** Write at `out` itself rather than under a partial name renamed into place once complete. */
  inPlace: z.boolean().default(false),
})
export type ExtractOptions = z.input<typeof ExtractOptions>

/**
 * Writes RAM block `block` of a QEMU mapped-ram file to `out`; returns the bytes written.
 * `out` is written under a partial name beside it and renamed into place once the whole block
 * is: on failure the partial file is removed and whatever was at `out` is untouched. `out` may
 * not be the QEMU file itself (ERR_MULTIFD_INVALID_ARGUMENT).
 */
export function extractQemuBlock(path: string, block: string, out: string, options: ExtractOptions = {}): number {
  const o = parseOptions(z.strictObject({ path: z.string().min(1), block: z.string().min(1), out: z.string().min(1) }), { path, block, out }, 'extract arguments')
  const { inPlace } = parseOptions(ExtractOptions, options, 'extract options')
  if (sameFile(o.path, o.out)) throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', `${o.out} is the QEMU file ${o.path}; writing it would destroy it`)
  let output: Output | undefined
  try {
    output = Output.plan(o.out, { inPlace }).create()
    const { writePath } = output
    const n = native(() => binding.extractQemuBlock(o.path, o.block, writePath))
    output.commit()
    return n
  } catch (e) {
    output?.discard()
    throw asMultifdError(e)
  }
}
