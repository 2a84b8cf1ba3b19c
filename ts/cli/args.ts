/** Argument parsing shared by the commands: node:util parseArgs, then zod, usage errors as exit 2. */
import { basename } from 'node:path'
import { parseArgs, type ParseArgsConfig } from 'node:util'
import { z } from 'zod'
import { binding } from '../native.js'
import { parseSize } from './format.js'
import { LIMITS, type IntRange } from '../options.js'

/** A mistake on the command line: printed with a hint, exit status 2. */
export class UsageError extends Error {
  override readonly name = 'UsageError'
}

export function parse<T extends ParseArgsConfig['options']>(argv: string[], options: T): { values: Record<string, unknown>; positionals: string[] } {
  try {
    const r = parseArgs({ args: argv, options: { ...options, json: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true })
    return { values: r.values as Record<string, unknown>, positionals: r.positionals }
  } catch (e) {
    throw new UsageError((e as Error).message)
  }
}

/** Validates parsed values with zod; problems become one usage error listing each. */
export function check<S extends z.ZodType>(schema: S, input: unknown): z.output<S> {
  const r = schema.safeParse(input)
  if (!r.success) throw new UsageError(z.prettifyError(r.error))
  return r.data
}

export const Size = z.string().transform((s, ctx) => {
  const n = parseSize(s)
  if (n === undefined || n <= 0) {
    ctx.addIssue({ code: 'custom', message: `size ${JSON.stringify(s)} is not like 512M, 1G or 4096` })
    return z.NEVER
  }
  return n
})

/** A rate in bytes per second: `500M`, `1.5G`, `500MiB/s`, `65536` (binary units, as sizes). */
export const Rate = z.string().transform((s, ctx) => {
  const n = parseSize(s.replace(/\/s$/i, ''))
  if (n === undefined || n <= 0) {
    ctx.addIssue({ code: 'custom', message: `rate ${JSON.stringify(s)} is not like 500M, 1G or 500MiB/s (bytes per second)` })
    return z.NEVER
  }
  return n
})

export const IntString = (min: number, max: number): z.ZodType<number, string> =>
  z.string().transform((s, ctx) => {
    const n = Number(s)
    if (!Number.isInteger(n) || n < min || n > max) {
      ctx.addIssue({ code: 'custom', message: `${JSON.stringify(s)} must be an integer from ${min} to ${max}` })
      return z.NEVER
    }
    return n
  })

/** An integer flag in one of the core's ranges (`LIMITS`). */
export const IntIn = (r: IntRange): z.ZodType<number, string> => IntString(r.min, r.max)

/** `--peer-timeout-ms`: 0 turns the no-progress bound off, otherwise within the core's range. */
export const PeerTimeoutFlag: z.ZodType<number, string> = z.union([z.literal('0').transform(() => 0), IntIn(LIMITS.peerTimeoutMs)])

/** `--block NAME=FILE` pairs, then plain FILE positionals named after the file. */
export function blockFiles(blocks: string[] | undefined, files: string[]): Array<{ name: string; file: string }> {
  const out = (blocks ?? []).map((b) => {
    const at = b.indexOf('=')
    if (at <= 0 || at === b.length - 1) throw new UsageError(`--block takes NAME=FILE, got ${JSON.stringify(b)}`)
    return { name: b.slice(0, at), file: b.slice(at + 1) }
  })
  out.push(...files.map((f) => ({ name: basename(f), file: f })))
  const seen = new Set<string>()
  for (const { name } of out) {
    if (seen.has(name)) throw new UsageError(`block name ${JSON.stringify(name)} is used twice; name blocks with --block NAME=FILE`)
    seen.add(name)
  }
  return out
}

/** A block name as a file name: characters other than letters, digits, `.`, `_`, `-`, `@` are %XX. */
export const fileNameFor = (block: string): string => binding.fileNameFor(block)
