/** Pieces the loopback benchmarks share: the source bytes and one two-process transfer. */
import { closeSync, existsSync, openSync, statSync, writeSync } from 'node:fs'
import { randomFillSync } from 'node:crypto'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { runJson, startJson } from './run.js'

const peer = join(dirname(fileURLToPath(import.meta.url)), 'peer.ts')
const GiB = 2 ** 30

export interface Result {
  gbps: number
  srcCpu: number
  dstCpu: number
  /** Both sides' sha256 (or checksum) agree. */
  ok: boolean
  /** Extra figures a peer reported (e.g. zero-copy counters). */
  extra?: Record<string, unknown>
}

/** Random bytes in /dev/shm (memory, like guest RAM), created once per size. */
export function sourceFile(size: number, log: (s: string) => void): string {
  const file = `/dev/shm/multifd-bench-${size}.ram`
  if (!existsSync(file) || statSync(file).size !== size) {
    log(`writing ${size} random bytes to ${file}`)
    const fd = openSync(file, 'w')
    const chunk = Buffer.alloc(64 << 20)
    for (let off = 0; off < size; off += chunk.length) writeSync(fd, randomFillSync(chunk).subarray(0, Math.min(chunk.length, size - off)))
    closeSync(fd)
  }
  return file
}

export const timeoutFor = (size: number): number => Math.max(120_000, (size / GiB) * 60_000)

/** Destination and source each in their own process; times the source's whole migration. */
export async function pair(size: number, destMode: string, srcMode: string, srcArgs: string[]): Promise<Result> {
  const timeout = timeoutFor(size)
  const dest = startJson(process.execPath, ['--import=tsx', peer, destMode, String(size)], timeout, 'listening')
  const { address } = (await dest.first) as { address: string }
  const src = await runJson(process.execPath, ['--import=tsx', peer, srcMode, address, ...srcArgs], timeout)
  const d = (await dest.all).find((l) => l.type === 'done')!
  const s = src.find((l) => l.type === 'done')!
  return { gbps: size / (s.seconds as number) / 1e9, srcCpu: s.cpuSeconds as number, dstCpu: d.cpuSeconds as number, ok: s.sha256 === d.sha256, extra: s }
}

/** This package: `channels` channels, optionally with MSG_ZEROCOPY. */
export const ours = (size: number, file: string, channels: number, zeroCopy = false): Promise<Result> =>
  pair(size, 'mfd-dest', 'mfd-src', [file, String(size), String(channels), zeroCopy ? 'zero-copy' : 'copy'])

/** A single node:net stream of the same bytes. */
export const nodeNet = (size: number, file: string): Promise<Result> => pair(size, 'net-dest', 'net-src', [file, String(size)])

/** Lets the machine settle between runs: a process that just exited may still be returning
 * gigabytes of memory, which slows whoever runs next. */
export const settle = (): Promise<void> => new Promise((r) => setTimeout(r, 750))
