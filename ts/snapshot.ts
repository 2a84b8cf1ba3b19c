/**
 * Snapshots of blocks to a file in QEMU's mapped-ram layout (docs/FORMAT.md), written and read
 * by N threads at fixed offsets; and restoring them.
 */
import { z } from 'zod'
import { binding, type NativeEvent } from './native.js'
import { MultifdError, asMultifdError, native, nativeError } from './errors.js'
import { RamBlock, RamBlockSchema } from './block.js'
import { Channels as ChannelCount, parseOptions } from './options.js'
import { Output } from './outputs.js'
import type { FileProgress, SnapshotBlockInfo, SnapshotFileInfo } from './native/binding.cjs'

export type { FileProgress, SnapshotBlockInfo } from './native/binding.cjs'
/** What a snapshot file holds (as `inspectSnapshot` reads it). */
export type SnapshotInfo = SnapshotFileInfo

export interface FileSummary {
  status: 'completed'
  /** Bytes of block memory covered. */
  bytes: number
  seconds: number
  bytesPerSecond: number
  channels: number
  /** Pages written (snapshot) or read (restore), and zero pages skipped. */
  pages: { normal: number; zero: number }
  file: SnapshotInfo
}

const Channels = ChannelCount.default(4)
const OnProgress = z.custom<(p: FileProgress) => void>((v) => typeof v === 'function').optional()

/** Runs a native file job and resolves with its summary. */
function run(job: InstanceType<typeof binding.NativeFileJob>, channels: number, start: (onEvent: (e: NativeEvent) => void) => void, onProgress?: (p: FileProgress) => void): Promise<FileSummary> {
  const t0 = performance.now()
  return new Promise<FileSummary>((resolve, reject) => {
    const timer = onProgress ? setInterval(() => onProgress(job.progress()), 200) : undefined
    native(() =>
      start((ev) => {
        if (ev.kind !== 'done' && ev.kind !== 'rejected') return
        if (timer) clearInterval(timer)
        job.finish()
        if (ev.kind === 'rejected') return reject(nativeError(ev.error))
        const p = job.progress()
        const seconds = (performance.now() - t0) / 1000
        onProgress?.(p)
        resolve({ status: 'completed', bytes: p.bytes, seconds, bytesPerSecond: seconds > 0 ? p.bytes / seconds : 0, channels, pages: { normal: p.pages, zero: p.zeroPages }, file: job.result()! })
      }),
    )
  })
}

const SnapshotOptions = z.strictObject({
  /** Threads writing pages in parallel, each with its own descriptor. */
  channels: Channels,
  /** Write pages with O_DIRECT (refused with ERR_MULTIFD_INVALID_ARGUMENT where unsupported). */
  directIo: z.boolean().default(false),
  /**
   * Write only dirty pages into an existing complete snapshot of the same blocks (at `path`
   * itself, as `inPlace`).
   */
  incremental: z.boolean().default(false),
  /**
   * Write at `path` itself rather than under a partial name renamed into place once complete;
   * a failed snapshot then leaves the file marked incomplete. A path that is not a regular file
   * (a device) is always written in place.
   */
  inPlace: z.boolean().default(false),
  onProgress: OnProgress,
})
export type SnapshotOptions = z.input<typeof SnapshotOptions>

/**
 * Writes `blocks` to `path`. Zero pages are not written (the file stays sparse); the bitmaps
 * and then the completion marker are written last, each followed by fdatasync. A full
 * snapshot is written under a partial name beside `path` (`.NAME.multifd-partial-PID`) and
 * renamed into place, the directory synced, once complete: on failure (disk full:
 * ERR_MULTIFD_NO_SPACE) or process exit the partial file is removed and whatever was at
 * `path` is untouched. Clears the blocks' dirty bits (a full snapshot) or takes them
 * (incremental).
 */
export async function snapshot(blocks: RamBlock[], path: string, options: SnapshotOptions = {}): Promise<FileSummary> {
  const o = parseOptions(SnapshotOptions, options, 'snapshot options')
  const bs = parseOptions(z.array(RamBlockSchema).min(1), blocks, 'snapshot blocks')
  const target = parseOptions(z.string().min(1), path, 'snapshot path')
  refuseBackingFile(bs, target, 'writing the snapshot there would destroy the block')
  const job = new binding.NativeFileJob()
  for (const b of bs) job.addBlock(b.native)
  let out: Output | undefined
  try {
    out = Output.plan(target, { inPlace: o.inPlace || o.incremental }).create()
    const { writePath } = out
    const summary = await run(job, o.channels, (cb) => job.startSnapshot(writePath, o.channels, o.directIo, o.incremental, cb), o.onProgress)
    out.commit(true)
    return summary
  } catch (e) {
    out?.discard()
    throw asMultifdError(e)
  }
}

/** Refuses a snapshot file that is the memory of one of `blocks` (a block mapped from it). */
function refuseBackingFile(blocks: readonly RamBlock[], path: string, why: string): void {
  const b = blocks.find((x) => x.native.isBackedBy(path))
  if (b) throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', `${path} is the file block ${JSON.stringify(b.name)} is mapped from: ${why}`)
}

const RestoreOptions = z.strictObject({
  /**
   * Where pages go: blocks with the snapshot's names and lengths, or a function creating them
   * for the file's table (e.g. mapped files). By default, new anonymous blocks.
   */
  blocks: z.union([z.array(RamBlockSchema), z.custom<(table: SnapshotBlockInfo[], pageSize: number) => RamBlock[]>((v) => typeof v === 'function')]).optional(),
  channels: Channels,
  onProgress: OnProgress,
})
export type RestoreOptions = z.input<typeof RestoreOptions>

/** Reads a complete snapshot into blocks. Resolves with the blocks and a summary. */
export async function restore(path: string, options: RestoreOptions = {}): Promise<FileSummary & { blocks: RamBlock[] }> {
  const o = parseOptions(RestoreOptions, options, 'restore options')
  const info = inspectSnapshot(path)
  if (!info.complete) throw new MultifdError('ERR_MULTIFD_INCOMPLETE', `${path} is not a complete snapshot (interrupted or still being written)`)
  const blocks =
    typeof o.blocks === 'function'
      ? o.blocks(info.blocks, info.pageSize)
      : (o.blocks ?? info.blocks.map((b) => RamBlock.allocate({ name: b.name, size: b.length, pageSize: info.pageSize })))
  refuseBackingFile(blocks, path, 'restoring into the block would overwrite the snapshot being read')
  const job = new binding.NativeFileJob()
  for (const b of blocks) job.addBlock(b.native)
  const summary = await run(job, o.channels, (cb) => job.startRestore(path, o.channels, cb), o.onProgress)
  return { ...summary, blocks }
}

/** Describes a snapshot file: completeness, generation, blocks and their layout. */
export function inspectSnapshot(path: string): SnapshotInfo {
  return native(() => binding.inspectSnapshot(parseOptions(z.string().min(1), path, 'snapshot path')))
}
