import { z } from 'zod'
import { binding } from './native.js'
import { native } from './errors.js'
import { BlockName, PageSize, parseOptions } from './options.js'

const AllocateOptions = z.strictObject({
  name: BlockName,
  /** Bytes; a positive multiple of the page size. */
  size: z.int().positive(),
  pageSize: PageSize.default(4096),
  /** Fault every page in now, so the transfer does not pay for first touches. */
  prefault: z.boolean().default(false),
})
export type AllocateOptions = z.input<typeof AllocateOptions>

const MapFileOptions = z.strictObject({
  name: BlockName,
  path: z.string().min(1),
  /** Create or resize the file to this many bytes; without it, the file's size is used. */
  size: z.int().positive().optional(),
  pageSize: PageSize.default(4096),
  prefault: z.boolean().default(false),
})
export type MapFileOptions = z.input<typeof MapFileOptions>

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

  /** A file (e.g. a VM memory image in /dev/shm) mapped shared: writes reach the file. */
  static mapFile(options: MapFileOptions): RamBlock {
    const o = parseOptions(MapFileOptions, options, 'block options')
    return new RamBlock(native(() => binding.Block.mapFile(o.name, o.path, o.pageSize, o.size, o.prefault)))
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

  /** Copies `data` into the block at `offset` and marks the pages it touched dirty. */
  write(offset: number, data: Uint8Array): void {
    this.view(offset, data.length).set(data)
    this.markDirty(offset, data.length)
  }

  markAllDirty(): void {
    this.native.markAllDirty()
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
