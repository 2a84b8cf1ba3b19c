/**
 * Output files that hold only a complete result (docs/OUTPUTS.md): a regular-file output is
 * written under a partial name beside it and renamed into place at the end; on failure, cancel
 * or process exit the partial file is removed and whatever was at the path is untouched. Used
 * by `snapshot()`, `extractQemuBlock()` and every command of the CLI.
 */
import { randomBytes } from 'node:crypto'
import { closeSync, constants, fsyncSync, linkSync, lstatSync, mkdirSync, openSync, realpathSync, renameSync, rmSync, statSync, unlinkSync, type Stats } from 'node:fs'
import { basename, dirname, join } from 'node:path'
import { MultifdError } from './errors.js'

/** Partial files of this process, removed at exit unless committed. */
const partials = new Set<string>()
/** Private directories (mode 0700) holding the partial files of outputs named from input, by parent. */
const privateDirs = new Map<string, string>()

function removePartials(): void {
  for (const p of partials) {
    try {
      unlinkSync(p)
    } catch {
      // Already gone.
    }
  }
  partials.clear()
  for (const d of privateDirs.values()) rmSync(d, { recursive: true, force: true })
  privateDirs.clear()
}
process.on('exit', removePartials)

/**
 * A directory only this process writes in, inside `parent`: files named from input are made
 * there, so nobody else can swap a link in between creating one and mapping it by name.
 */
function privateDir(parent: string): string {
  let d = privateDirs.get(parent)
  if (d === undefined) {
    d = join(parent, `.multifd-partial-${process.pid}-${randomBytes(4).toString('hex')}`)
    mkdirSync(d, { mode: 0o700 })
    privateDirs.set(parent, d)
  }
  return d
}

/** The name a regular-file output is written under until it is complete. */
export function partialName(path: string): string {
  return join(dirname(path), `.${basename(path)}.multifd-partial-${process.pid}`)
}

/**
 * The name a resumable output (`recv --resume`) is written under until it is complete: the
 * same for every run, so a later run finds it, and like every partial name hidden and never
 * the output's own.
 */
export function resumableName(path: string): string {
  return join(dirname(path), `.${basename(path)}.multifd-resume`)
}

export function statOf(path: string, follow = true): Stats | undefined {
  try {
    return follow ? statSync(path) : lstatSync(path)
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined
    throw e
  }
}

/** A file's identity: device and inode. */
export const identity = (s: Stats): string => `${s.dev}:${s.ino}`

/** True when both paths name one existing file (same device and inode, links followed). */
export function sameFile(a: string, b: string): boolean {
  const sa = statOf(a)
  const sb = statOf(b)
  return sa !== undefined && sb !== undefined && identity(sa) === identity(sb)
}

export interface OutputOptions {
  /** Write at the path itself (`--in-place`); a non-regular target (a device) always is. */
  inPlace?: boolean
  /**
   * The name comes from the input (a block name): nothing may exist at the path, not even a
   * symbolic link, and the final rename does not replace anything (ERR_MULTIFD_OUTPUT_EXISTS).
   */
  exclusive?: boolean
  /**
   * Written under the stable `resumableName` and kept there on failure, cancel or signal, for
   * a later run to continue (`recv --resume`); not with `inPlace` or `exclusive`.
   */
  resumable?: boolean
}

/** One output file: written at `writePath`, found at `path` only once committed. */
export class Output {
  readonly path: string
  /**
   * Where the bytes go until commit: the partial name (for a name from input, inside a private
   * directory beside the path), or the path itself in place.
   */
  writePath: string
  readonly inPlace: boolean
  readonly resumable: boolean
  readonly #exclusive: boolean
  #settled = false

  private constructor(path: string, writePath: string, inPlace: boolean, exclusive: boolean, resumable: boolean) {
    this.path = path
    this.writePath = writePath
    this.inPlace = inPlace
    this.#exclusive = exclusive
    this.resumable = resumable
  }

  /** Checks the path; nothing is created (see `create`). */
  static plan(path: string, options: OutputOptions = {}): Output {
    const l = statOf(path, false)
    if (options.exclusive && l) {
      throw new MultifdError('ERR_MULTIFD_OUTPUT_EXISTS', `${path} already exists${l.isSymbolicLink() ? ' as a symbolic link (not followed)' : ''}; remove it or choose another directory`)
    }
    const s = l?.isSymbolicLink() ? statOf(path) : l
    if (s?.isDirectory()) throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', `output ${path} is a directory`)
    const inPlace = options.inPlace === true || (s !== undefined && !s.isFile() && !s.isDirectory())
    // A link the user named is followed: the result replaces its target, not the link.
    const target = l?.isSymbolicLink() && s !== undefined ? realpathSync(path) : path
    const resumable = options.resumable === true && !inPlace
    return new Output(target, inPlace ? target : resumable ? resumableName(target) : partialName(target), inPlace, options.exclusive === true, resumable)
  }

  /**
   * Creates the partial file (new, never through a link); in place, nothing. A resumable
   * output's partial file is kept as it is with `keep` (a later run continuing it), and is
   * never removed by this process.
   */
  create(keep = false): this {
    if (this.inPlace || (this.resumable && keep)) return this
    if (this.#exclusive) this.writePath = join(privateDir(dirname(this.path)), basename(this.path))
    if (partials.has(this.writePath)) throw new MultifdError('ERR_MULTIFD_STATE', `${this.path} is already being written by this process`)
    if (!this.resumable) partials.add(this.writePath)
    const flags = constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW
    let fd: number
    try {
      fd = openSync(this.writePath, flags, 0o644)
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e
      // Left by a process that had this pid, or a resumable partial not continued: ours to
      // replace (unlink removes a link, never its target).
      unlinkSync(this.writePath)
      fd = openSync(this.writePath, flags, 0o644)
    }
    closeSync(fd)
    return this
  }

  /** Moves the complete file into place; `durable` also syncs the directory entry. */
  commit(durable = false): void {
    if (this.#settled) return
    this.#settled = true
    if (this.inPlace) return
    if (this.#exclusive) {
      // A hard link does not replace what may have appeared at the path since `plan`.
      try {
        linkSync(this.writePath, this.path)
        unlinkSync(this.writePath)
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code
        if (code === 'EEXIST') {
          this.discard()
          throw new MultifdError('ERR_MULTIFD_OUTPUT_EXISTS', `${this.path} appeared while it was being written; the result was not moved into place`)
        }
        if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP') throw e
        // A filesystem without hard links: the best it offers.
        renameSync(this.writePath, this.path)
      }
    } else {
      renameSync(this.writePath, this.path)
    }
    partials.delete(this.writePath)
    if (durable) {
      const fd = openSync(dirname(this.path), 'r')
      try {
        fsyncSync(fd)
      } finally {
        closeSync(fd)
      }
    }
  }

  /**
   * Removes the partial file (in place, nothing: the target was written as far as it got; a
   * resumable partial is kept for the next run).
   */
  discard(): void {
    this.#settled = true
    if (this.inPlace || this.resumable || !partials.delete(this.writePath)) return
    try {
      unlinkSync(this.writePath)
    } catch {
      // Never created or already gone.
    }
  }
}
