/** `multifd snapshot`, `multifd restore`: blocks to and from snapshot files. */
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { z } from 'zod'
import { RamBlock } from '../block.js'
import { MultifdError } from '../errors.js'
import { restore, snapshot, type FileProgress, type FileSummary } from '../snapshot.js'
import { IntIn, UsageError, blockFiles, check, fileNameFor, parse } from './args.js'
import { LIMITS } from '../options.js'
import { bytes } from './format.js'
import { interruptStatus, onInterrupt } from './interrupt.js'
import { type CommandResult, failure, print } from './output.js'
import { Output } from '../outputs.js'
import { refuseOverlap } from './outputs.js'
import { Progress } from './progress.js'

function fromFile(s: FileSummary, extra: Record<string, unknown> = {}): CommandResult {
  return { status: 'completed', bytes: s.bytes, seconds: s.seconds, bytesPerSecond: s.bytesPerSecond, channels: s.channels, pages: s.pages, file: s.file, ...extra }
}

function tracked(json: boolean, label: string): { onProgress: (p: FileProgress) => void; progress: Progress } {
  let last: FileProgress = { bytes: 0, total: 0, pages: 0, zeroPages: 0 }
  const progress = new Progress(!json, () => ({ done: last.bytes, total: last.total, label })).start()
  return { onProgress: (p) => (last = p), progress }
}

export const SNAPSHOT_HELP = `multifd snapshot FILE... [--block NAME=FILE]... --to SNAPSHOT [options]

Writes image files (mapped) as blocks into a snapshot file: QEMU's mapped-ram layout behind a
small header (docs/FORMAT.md). Zero pages are not written; the file is synced before it is
marked complete. SNAPSHOT is written under a partial name beside it and renamed into place
(and the directory synced) once complete; a failed or interrupted snapshot leaves whatever
was at SNAPSHOT untouched. An input given as SNAPSHOT is refused (exit 2).

  --channels N     writer threads (default 4)
  --direct-io      write pages with O_DIRECT
  --in-place       write SNAPSHOT where it is (a device always is); marked incomplete on failure
  --json           print one JSON object at the end`

export async function snapshotCommand(argv: string[]): Promise<CommandResult> {
  const { values, positionals } = parse(argv, { to: { type: 'string' }, block: { type: 'string', multiple: true }, channels: { type: 'string' }, 'direct-io': { type: 'boolean' }, 'in-place': { type: 'boolean' } })
  const o = check(z.object({ to: z.string({ error: 'snapshot needs --to SNAPSHOT' }).min(1), channels: IntIn(LIMITS.channels).default(4), 'direct-io': z.boolean().default(false), 'in-place': z.boolean().default(false) }), values)
  const specs = blockFiles(values.block as string[] | undefined, positionals)
  if (specs.length === 0) throw new UsageError('snapshot needs at least one FILE (or --block NAME=FILE)')
  refuseOverlap(specs.map((s) => s.file), [o.to])
  const json = values.json === true
  const { onProgress, progress } = tracked(json, 'snapshot')
  const inPlace = Output.plan(o.to, { inPlace: o['in-place'] }).inPlace
  cancelByExit(json, 'snapshot', o.channels, progress)
  try {
    const blocks = specs.map((s) => RamBlock.mapFile({ name: s.name, path: s.file }))
    const s = await snapshot(blocks, o.to, { channels: o.channels, directIo: o['direct-io'], inPlace: o['in-place'], onProgress })
    progress.stop()
    const r = fromFile(s, { snapshot: o.to, complete: true })
    print(r, json, 'snapshot', [`${o.to}: ${bytes(s.file.fileLength)} (sparse), generation ${s.file.generation}`, ...specs.map((b) => `${b.name} <- ${b.file}`)])
    return r
  } catch (e) {
    progress.stop()
    const r = { ...failure(e, o.channels), complete: false }
    print(r, json, 'snapshot', [inPlace ? `${o.to} is left marked incomplete` : `${o.to} is untouched`])
    return r
  }
}

/**
 * A file job cannot be cancelled half-way: a signal prints the summary and exits, and the
 * partial outputs go with the process (outputs.ts removes them at exit).
 */
function cancelByExit(json: boolean, title: string, channels: number, progress: Progress): void {
  onInterrupt(() => {
    progress.stop()
    print({ ...failure(new MultifdError('ERR_MULTIFD_CANCELLED', 'interrupted by a signal'), channels, 'cancelled'), complete: false }, json, title)
    process.exit(interruptStatus())
  })
}

export const RESTORE_HELP = `multifd restore SNAPSHOT --out DIR [options]

Reads a complete snapshot and writes each block to DIR/NAME (characters outside
[A-Za-z0-9._@-] in block names become %XX). Nothing may exist at DIR/NAME, not even a
symbolic link (ERR_MULTIFD_OUTPUT_EXISTS); each file is written under a partial name and moved
into place once the whole snapshot is restored.

  --channels N     reader threads (default 4)
  --json           print one JSON object at the end`

export async function restoreCommand(argv: string[]): Promise<CommandResult> {
  const { values, positionals } = parse(argv, { out: { type: 'string' }, channels: { type: 'string' } })
  const o = check(z.object({ out: z.string({ error: 'restore needs --out DIR' }).min(1), channels: IntIn(LIMITS.channels).default(4) }), values)
  const [snap, ...extra] = positionals
  if (!snap || extra.length > 0) throw new UsageError('restore takes exactly one SNAPSHOT')
  const json = values.json === true
  const { onProgress, progress } = tracked(json, 'restore')
  const outputs: Output[] = []
  cancelByExit(json, 'restore', o.channels, progress)
  try {
    mkdirSync(o.out, { recursive: true })
    const files: Array<{ name: string; file: string }> = []
    const s = await restore(snap, {
      channels: o.channels,
      onProgress,
      blocks: (table, pageSize) => {
        // Every name is checked before any file is created.
        for (const b of table) {
          const file = join(o.out, fileNameFor(b.name))
          refuseOverlap([snap], [file])
          outputs.push(Output.plan(file, { exclusive: true }))
          files.push({ name: b.name, file })
        }
        return table.map((b, i) => RamBlock.mapFile({ name: b.name, path: outputs[i]!.create().writePath, size: b.length, pageSize }))
      },
    })
    for (const out of outputs) out.commit()
    progress.stop()
    const r = fromFile(s, { files })
    print(r, json, 'restore', files.map((f) => `${f.name} -> ${f.file}`))
    return r
  } catch (e) {
    for (const out of outputs) out.discard()
    progress.stop()
    if (e instanceof UsageError) throw e
    const r = failure(e, o.channels)
    print(r, json, 'restore')
    if (!(e instanceof MultifdError)) throw e
    return r
  }
}
