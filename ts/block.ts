import { z } from 'zod'
import { binding } from './native.js'
import { native } from './errors.js'
import { BlockName, DEFAULT_PAGE_SIZE, PageSize, parseOptions } from './options.js'

const AllocateOptions = z.strictObject({
  name: BlockName,
  /** Bytes; a positive multiple of the page size. */
  size: z.int().positive(),
  pageSize: PageSize.default(DEFAULT_PAGE_SIZE),
  /** Fault every page in now, so the transfer does not pay for first touches. */
  prefault: z.boolean().default(false),
})
export type AllocateOptions = z.input<typeof AllocateOptions>

const MapFileOptions = z.strictObject({
  name: BlockName,
  path: z.string().min(1),
  /** Create or resize the file to this many bytes; without it, the file's size is used. */
  size: z.int().positive().optional(),
  pageSize: PageSize.default(DEFAULT_PAGE_SIZE),
  prefault: z.boolean().default(false),
})
export type MapFileOptions = z.input<typeof MapFileOptions>

const ShareToken = z.int().min(1).max(0xffff_ffff)

/**
 * A named, page-aligned memory region owned by Rust. JavaScript reads and writes it through
 * zero-copy views; channel threads hold their own reference, so nothing JavaScript does frees
 * memory that is in flight.
 */
export class RamBlock {
  /** @internal */
  readonly native: InstanceType<typeof binding.Block>

  private constructor(nativeBlock: InstanceType<typeof binding.Block>) {
    this.native = nativeBlock
  }

  /** Anonymous, zero-filled memory. */
  static allocate(options: AllocateOptions): RamBlock {
    const o = parseOptions(AllocateOptions, options, 'block options')
    return new RamBlock(native(() => binding.Block.allocate(o.name, o.size, o.pageSize, o.prefault)))
  }

  /**
   * The block another thread of this process registered with `share()`: same memory, same
   * dirty bitmap. This is how a `worker_threads` worker writes into a block a Source sends
   * (`block.write(...)` or its `view()` + `markDirty()`).
   */
  static fromShared(token: number): RamBlock {
    const t = parseOptions(ShareToken, token, 'shared block token')
    return new RamBlock(native(() => binding.Block.fromShared(t)))
  }

  /** A file (e.g. a VM memory image in /dev/shm) mapped shared: writes reach the file. */
  static mapFile(options: MapFileOptions): RamBlock {
    const o = parseOptions(MapFileOptions, options, 'block options')
    return new RamBlock(native(() => binding.Block.mapFile(o.name, o.path, o.pageSize, o.size, o.prefault)))
  }

  /**
   * Registers the block for the other threads of this process and returns a token to pass
   * them (e.g. in `workerData`); `RamBlock.fromShared(token)` there gives the same memory.
   * Sharing again returns the same token. The registry keeps the memory alive until
   * `unshare()` (or process exit), whether or not JavaScript still refers to the block.
   */
  share(): number {
    return native(() => this.native.share())
  }

  /**
   * Removes the block from the registry (returns whether it was shared). Blocks already made
   * with `fromShared` keep working; the memory goes away with the last of them.
   */
  unshare(): boolean {
    return this.native.unshare()
  }

  /** Whether `other` is the same memory (e.g. made by `fromShared` from this block's token). */
  sameMemory(other: RamBlock): boolean {
    return this.native.sameMemory(other.native)
  }

  get name(): string {
    return this.native.name
  }

  /** Length in bytes. */
  get size(): number {
    return this.native.length
  }

  get pageSize(): number {
    return this.native.pageSize
  }

  get backing(): 'anonymous' | 'file' {
    return this.native.backing as 'anonymous' | 'file'
  }

  /** A zero-copy view of the block (or of `length` bytes at `offset`). */
  view(offset = 0, length?: number): Uint8Array {
    return native(() => this.native.view(offset, length))
  }

  /** Marks the pages covering `length` bytes at `offset` dirty: one call per range. */
  markDirty(offset: number, length: number): void {
    native(() => this.native.markDirty(offset, length))
  }

  /**
   * Copies `data` into the block at `offset` and marks the pages it touched dirty. Write
   * first, mark after (as this does): a page marked before it changes may be sent, and its
   * bit cleared, before the change lands.
   */
  write(offset: number, data: Uint8Array): void {
    this.view(offset, data.length).set(data)
    this.markDirty(offset, data.length)
  }

  markAllDirty(): void {
    this.native.markAllDirty()
  }

  /**
   * The block digest the integrity check compares at completion (16 hex digits), of memory as
   * it is now: xxh3-64 over the little-endian digests of the block's 1 MiB pieces, each the
   * xxh3-64 over the little-endian xxh3-64 digests of its pages (docs/PROTOCOL.md,
   * "Integrity"), hashed in parallel in Rust. This blocks the calling thread;
   * {@link digestAsync} does not.
   */
  digest(): string {
    return this.native.digest()
  }

  /** {@link digest}, computed off the JavaScript thread: the event loop keeps running meanwhile. */
  digestAsync(): Promise<string> {
    return this.native.digestAsync()
  }

  /** Pages marked dirty and not yet sent. */
  get dirtyPages(): number {
    return this.native.dirtyPages()
  }

  clearDirty(): void {
    this.native.clearDirty()
  }
}

/** Zod schema for a RamBlock argument. */
export const RamBlockSchema = z.custom<RamBlock>((v) => v instanceof RamBlock, { error: 'expected a RamBlock' })

/**
 * The block digests the integrity check exchanges at completion, in the order given, each from
 * `digest` (a session's digest from the page digests it took, or the block's own from memory).
 * One block at a time: each is native work off the JavaScript thread that already spreads over
 * every core.
 */
export async function blockDigests(blocks: readonly RamBlock[], digest: (b: RamBlock) => Promise<string> = (b) => b.digestAsync()): Promise<Array<{ name: string; xxh3: string }>> {
  const out: Array<{ name: string; xxh3: string }> = []
  for (const b of blocks) out.push({ name: b.name, xxh3: await digest(b) })
  return out
}
