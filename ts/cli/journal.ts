/**
 * `recv --resume`'s journal (docs/OUTPUTS.md, "Resume"): beside each resumable partial output,
 * which of its 1 MiB pieces are durable there. It is advanced after each sync barrier, once the
 * output was flushed (the destination's `resume.onDurable`), and always replaced atomically:
 * written under a temporary name, synced, renamed over the old one, directory synced. A
 * journal never makes anything trusted: a resuming source still compares every offered
 * piece's digest with its own before it skips it.
 */
import { createHash } from 'node:crypto'
import { closeSync, fsyncSync, openSync, readFileSync, renameSync, statSync, unlinkSync, writeSync } from 'node:fs'
import { dirname } from 'node:path'
import { z } from 'zod'
import { MultifdError } from '../errors.js'
import { RESUME_PIECE_BYTES, bitsOf, pieceCount, piecesOf } from '../resume.js'

const FORMAT = 'multifd-resume-journal'

/** What the journal says, checksum aside. */
const Body = z.strictObject({
  format: z.literal(FORMAT),
  version: z.literal(1),
  block: z.string().min(1),
  length: z.int().positive(),
  pageSize: z.int().positive(),
  pieceBytes: z.literal(RESUME_PIECE_BYTES),
  /** The sync barrier the durable pieces were taken at (informational). */
  epoch: z.int().nonnegative(),
  /** Durable pieces: a bitmap (bit `i % 8` of byte `i / 8` for piece `i`), base64. */
  durable: z.base64(),
})
type Body = z.infer<typeof Body>

const File = Body.extend({ sha256: z.string().regex(/^[0-9a-f]{64}$/) })

const digest = (b: Body): string => createHash('sha256').update(JSON.stringify(b)).digest('hex')

/** The block a journal describes. */
export interface JournalBlock {
  name: string
  length: number
  pageSize: number
}

/** The journal beside a resumable partial output. */
export class Journal {
  readonly path: string

  constructor(partial: string) {
    this.path = `${partial}.journal`
  }

  /**
   * The durable pieces this journal lists for `block`: `undefined` when there is none,
   * ERR_MULTIFD_RESUME_JOURNAL (an error value, to be reported and ignored) when it cannot be
   * read as one. Throws ERR_MULTIFD_RESUME_MISMATCH when it is a sound journal of another
   * block, length or page size: the partial output it describes is not this transfer's.
   */
  read(block: JournalBlock): number[] | MultifdError | undefined {
    let text: string
    try {
      text = readFileSync(this.path, 'utf8')
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined
      return new MultifdError('ERR_MULTIFD_RESUME_JOURNAL', `cannot read the journal ${this.path}: ${(e as Error).message}`)
    }
    let file: z.infer<typeof File>
    try {
      file = File.parse(JSON.parse(text))
    } catch {
      return new MultifdError('ERR_MULTIFD_RESUME_JOURNAL', `${this.path} is not a multifd resume journal (corrupt or foreign)`)
    }
    const { sha256, ...body } = file
    if (digest(body) !== sha256) return new MultifdError('ERR_MULTIFD_RESUME_JOURNAL', `${this.path} fails its checksum (corrupt)`)
    if (body.block !== block.name || body.length !== block.length || body.pageSize !== block.pageSize) {
      throw new MultifdError(
        'ERR_MULTIFD_RESUME_MISMATCH',
        `${this.path} is the journal of block ${JSON.stringify(body.block)} (${body.length} bytes, ${body.pageSize}-byte pages), but the source sends ${JSON.stringify(block.name)} (${block.length} bytes, ${block.pageSize}-byte pages) there; remove the journal and its partial output to start over`,
      )
    }
    const bits = Buffer.from(body.durable, 'base64')
    const count = pieceCount(block.length)
    if (bits.length !== Math.ceil(count / 8)) return new MultifdError('ERR_MULTIFD_RESUME_JOURNAL', `${this.path} lists ${bits.length * 8} pieces, the block has ${count} (corrupt)`)
    return piecesOf(bits).filter((p) => p < count)
  }

  /** Replaces the journal atomically: temporary file, fsync, rename, fsync of the directory. */
  write(block: JournalBlock, epoch: number, pieces: Uint8Array): void {
    const body: Body = { format: FORMAT, version: 1, block: block.name, length: block.length, pageSize: block.pageSize, pieceBytes: RESUME_PIECE_BYTES, epoch, durable: Buffer.from(pieces).toString('base64') }
    const temp = `${this.path}.tmp-${process.pid}`
    const fd = openSync(temp, 'w', 0o644)
    try {
      writeSync(fd, JSON.stringify({ ...body, sha256: digest(body) }) + '\n')
      fsyncSync(fd)
    } finally {
      closeSync(fd)
    }
    renameSync(temp, this.path)
    syncDirectory(this.path)
  }

  /** Starts a journal that lists nothing (a fresh partial output). */
  reset(block: JournalBlock): void {
    this.write(block, 0, bitsOf([], pieceCount(block.length)))
  }

  remove(): void {
    try {
      unlinkSync(this.path)
    } catch {
      // Already gone.
    }
  }
}

/**
 * What a resumable partial output (`partial`) holds for `block`, before anything touches it:
 * the journal, and the durable pieces to offer when the journal is sound and the partial file
 * has the block's length (`held`); otherwise the output starts over, with a `warning` when a
 * journal was there but unusable. Throws ERR_MULTIFD_RESUME_MISMATCH (see `Journal.read`).
 */
export function resumePlan(partial: string, block: JournalBlock): { journal: Journal; held?: number[]; warning?: MultifdError } {
  const journal = new Journal(partial)
  const pieces = journal.read(block)
  if (pieces === undefined) return { journal }
  if (pieces instanceof MultifdError) return { journal, warning: pieces }
  if (sizeOf(partial) !== block.length) return { journal, warning: new MultifdError('ERR_MULTIFD_RESUME_JOURNAL', `${journal.path} has no partial output of ${block.length} bytes beside it`) }
  return { journal, held: pieces }
}

function sizeOf(path: string): number | undefined {
  try {
    return statSync(path).size
  } catch {
    return undefined
  }
}

function syncDirectory(path: string): void {
  const fd = openSync(dirname(path), 'r')
  try {
    fsyncSync(fd)
  } finally {
    closeSync(fd)
  }
}
