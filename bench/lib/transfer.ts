/** Pieces the loopback benchmarks share: the source bytes and one two-process transfer. */
import { closeSync, existsSync, openSync, statSync, writeSync } from 'node:fs'
import { randomFillSync } from 'node:crypto'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { runJson, startJson } from './run.js'
import type { DestinationOptions, SourceOptions } from '../../ts/index.js'

const peer = join(dirname(fileURLToPath(import.meta.url)), 'peer.ts')
const GiB = 2 ** 30

export interface Result {
  gbps: number
  srcCpu: number
  dstCpu: number
  /** Both sides' sha256 (or checksum) agree. */
  ok: boolean
  /** Bytes on the channels, when known. */
  wireBytes?: number
  /** Extra figures a peer reported (e.g. zero-copy counters). */
  extra?: Record<string, unknown>
}

/** What a benchmark's source memory holds. */
export type DataKind = 'random' | 'half-zero' | 'text'

const TEXT = Buffer.from('The quick brown fox jumps over the lazy dog while multifd moves pages over parallel channels. ')

/** Fills one 64 MiB chunk of source data of `kind`; `chunkIndex` keeps text pages varied. */
function fillChunk(chunk: Buffer, kind: DataKind, chunkIndex: number): Buffer {
  if (kind === 'text') {
    for (let off = 0; off < chunk.length; off += 4096) {
      const line = Buffer.from(`page ${chunkIndex}:${off / 4096} `)
      let at = off
      for (const part of [line, TEXT, TEXT, TEXT]) at += part.copy(chunk, at, 0, Math.min(part.length, off + 4096 - at))
      while (at < off + 4096) at += TEXT.copy(chunk, at, 0, Math.min(TEXT.length, off + 4096 - at))
    }
    return chunk
  }
  randomFillSync(chunk)
  // Half the pages zero, in runs of 16 pages (64 KiB) as freed memory tends to be.
  if (kind === 'half-zero') for (let off = 0; off < chunk.length; off += 128 * 1024) chunk.fill(0, off, off + 64 * 1024)
  return chunk
}

/**
 * Source bytes in /dev/shm (memory, like guest RAM), one file per size, kind and process: two
 * benches running at once never share (or delete) each other's source, and the caller removes
 * it when done.
 */
export function sourceFile(size: number, log: (s: string) => void, kind: DataKind = 'random'): string {
  const file = `/dev/shm/multifd-bench-${kind}-${size}-${process.pid}.ram`
  if (!existsSync(file) || statSync(file).size !== size) {
    log(`writing ${size} bytes of ${kind} data to ${file}`)
    const fd = openSync(file, 'w')
    const chunk = Buffer.alloc(64 << 20)
    for (let off = 0, i = 0; off < size; off += chunk.length, i++) writeSync(fd, fillChunk(chunk, kind, i).subarray(0, Math.min(chunk.length, size - off)))
    closeSync(fd)
  }
  return file
}

export const timeoutFor = (size: number): number => Math.max(120_000, (size / GiB) * 60_000)

/** Destination and source each in their own process; times the source's whole migration. */
export async function pair(size: number, destMode: string, srcMode: string, srcArgs: string[], destArgs: string[] = []): Promise<Result> {
  const timeout = timeoutFor(size)
  const dest = startJson(process.execPath, ['--import=tsx', peer, destMode, String(size), ...destArgs], timeout, 'listening')
  const { address } = (await dest.first) as { address: string }
  const src = await runJson(process.execPath, ['--import=tsx', peer, srcMode, address, ...srcArgs], timeout)
  const d = (await dest.all).find((l) => l.type === 'done')!
  const s = src.find((l) => l.type === 'done')!
  return { gbps: size / (s.seconds as number) / 1e9, srcCpu: s.cpuSeconds as number, dstCpu: d.cpuSeconds as number, ok: s.sha256 === d.sha256, wireBytes: s.bytes as number, extra: s }
}

/** This package with these source options (channels, zeroCopySend, compression, ...) and
 * destination options (tls). */
export const ours = (size: number, file: string, options: Partial<SourceOptions>, destOptions: Partial<DestinationOptions> = {}): Promise<Result> =>
  pair(size, 'mfd-dest', 'mfd-src', [file, String(size), JSON.stringify(options)], [JSON.stringify(destOptions)])

/** This package receiving into a new file at `path` (pages allocated as they arrive). */
export const oursIntoNewFile = (size: number, file: string, path: string, options: Partial<SourceOptions>): Promise<Result> =>
  pair(size, 'mfd-dest-file', 'mfd-src', [file, String(size), JSON.stringify(options)], [path])

/** A single node:net stream of the same bytes. */
export const nodeNet = (size: number, file: string): Promise<Result> => pair(size, 'net-dest', 'net-src', [file, String(size)])

/** Lets the machine settle between runs: a process that just exited may still be returning
 * gigabytes of memory, which slows whoever runs next. */
export const settle = (): Promise<void> => new Promise((r) => setTimeout(r, 750))

/** QEMU 10 multifd, QEMU to QEMU, on the same source bytes (bench/qemu/qemu_mig.py). */
export async function qemu(size: number, file: string, o: { channels: number; compression?: string; zeroCopy?: boolean; tlsDir?: string; fresh?: boolean }): Promise<Result | undefined> {
  const args = [join(dirname(peer), '..', 'qemu', 'qemu_mig.py'), '--size-mib', String(Math.floor(size / 2 ** 20)), '--channels', String(o.channels), '--prealloc', o.fresh ? 'none' : 'both', '--src-ram', file, '--reps', '1']
  if (o.compression) args.push('--compression', o.compression)
  if (o.zeroCopy) args.push('--zero-copy')
  if (o.tlsDir) args.push('--tls-dir', o.tlsDir)
  const l = (await runJson('python3', args, timeoutFor(size) * 4))[0]
  if (!l) return undefined
  return {
    gbps: (l.bytesPerSecond as number) / 1e9,
    srcCpu: l.srcCpuSeconds as number,
    dstCpu: l.dstCpuSeconds as number,
    ok: l.sha256Match === true,
    wireBytes: l.multifdBytes as number,
  }
}
