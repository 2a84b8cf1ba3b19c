/** QEMU migration files written with the mapped-ram capability (`migrate file:...`). */
import { z } from 'zod'
import { binding } from './native.js'
import { native } from './errors.js'
import { parseOptions } from './options.js'

export interface QemuBlockInfo {
  name: string
  length: number
  pageSize: number
  pagesPresent: number
  bitmapOffset: number
  pagesOffset: number
}

export interface QemuFileInfo {
  /** Machine type from the configuration section, e.g. `pc-i440fx-10.0`. */
  machine: string
  capabilities: string[]
  fileLength: number
  /** The stream reaches its end marker (an interrupted save does not). */
  complete: boolean
  blocks: QemuBlockInfo[]
}

/** Parses the stream header, configuration section and RAM block list of a QEMU file. */
export function inspectQemuFile(path: string): QemuFileInfo {
  return native(() => binding.inspectQemuFile(parseOptions(z.string().min(1), path, 'QEMU file path')))
}

/** Writes RAM block `block` of a QEMU mapped-ram file to `out`; returns the bytes written. */
export function extractQemuBlock(path: string, block: string, out: string): number {
  const o = parseOptions(z.strictObject({ path: z.string().min(1), block: z.string().min(1), out: z.string().min(1) }), { path, block, out }, 'extract arguments')
  return native(() => binding.extractQemuBlock(o.path, o.block, o.out))
}
