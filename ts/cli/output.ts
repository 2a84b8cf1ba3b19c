/** What every long-running command prints at the end: a human summary or one JSON object. */
import { MultifdError } from '../errors.js'
import { bytes, duration, rate } from './format.js'

export interface CommandResult {
  status: 'completed' | 'failed' | 'cancelled'
  bytes: number
  seconds: number
  bytesPerSecond: number
  channels: number
  pages: { normal: number; zero: number }
  error?: { code: string; message: string }
  /** Command-specific fields (wire bytes, rounds, files, ...). */
  [extra: string]: unknown
}

export function failure(e: unknown, channels: number, status: 'failed' | 'cancelled' = 'failed'): CommandResult {
  const err = e instanceof MultifdError ? { code: e.code, message: e.message } : { code: 'ERR_MULTIFD_IO', message: e instanceof Error ? e.message : String(e) }
  return { status, bytes: 0, seconds: 0, bytesPerSecond: 0, channels, pages: { normal: 0, zero: 0 }, error: err }
}

export function print(r: CommandResult, json: boolean, title: string, lines: string[] = []): void {
  if (json) {
    process.stdout.write(JSON.stringify(r) + '\n')
    return
  }
  const out: string[] = []
  if (r.status === 'completed') {
    out.push(`${title}: completed, ${bytes(r.bytes)} in ${duration(r.seconds)} = ${rate(r.bytesPerSecond)} over ${r.channels} channel(s)`)
    out.push(`  pages: ${r.pages.normal} with data, ${r.pages.zero} zero (not sent as data)`)
  } else {
    out.push(`${title}: ${r.status}${r.error ? `: ${r.error.code}: ${r.error.message}` : ''}`)
  }
  out.push(...lines.map((l) => `  ${l}`))
  process.stdout.write(out.join('\n') + '\n')
}
