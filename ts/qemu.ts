/** QEMU migration files written with the mapped-ram capability (`migrate file:...`). */
import { z } from 'zod'
import { binding } from './native.js'
import { native } from './errors.js'
import { parseOptions } from './options.js'
import type { QemuFileInfo } from './native/binding.cjs'

export type { QemuBlockInfo, QemuFileInfo } from './native/binding.cjs'

/** Parses the stream header, configuration section and RAM block list of a QEMU file. */
export function inspectQemuFile(path: string): QemuFileInfo {
  return native(() => binding.inspectQemuFile(parseOptions(z.string().min(1), path, 'QEMU file path')))
}

/** Writes RAM block `block` of a QEMU mapped-ram file to `out`; returns the bytes written. */
export function extractQemuBlock(path: string, block: string, out: string): number {
  const o = parseOptions(z.strictObject({ path: z.string().min(1), block: z.string().min(1), out: z.string().min(1) }), { path, block, out }, 'extract arguments')
  return native(() => binding.extractQemuBlock(o.path, o.block, o.out))
}
