/**
 * Resumable transfers (docs/PROTOCOL.md, "Resume"): blocks are compared in pieces of
 * `RESUME_PIECE_BYTES` (1 MiB, the leaves of the integrity block digest; a block's last piece
 * may be shorter). A destination offers the pieces it holds with their xxh3-64; a source skips
 * a piece only when its own digest of it is equal. Piece sets cross the binding as bitmaps:
 * bit `i % 8` of byte `i / 8` for piece `i`.
 */
import { binding } from './native.js'
import type { RamBlock } from './block.js'

export const RESUME_PIECE_BYTES: number = binding.RESUME_PIECE_BYTES
export const HELD_RANGES_PER_FRAME: number = binding.HELD_RANGES_PER_FRAME

/** Pieces in a block of `size` bytes. */
export function pieceCount(size: number): number {
  return Math.ceil(size / RESUME_PIECE_BYTES)
}

/** Bytes of piece `index` of a block of `size` bytes (the last one may be shorter). */
export function pieceBytes(size: number, index: number): number {
  return Math.min(RESUME_PIECE_BYTES, size - index * RESUME_PIECE_BYTES)
}

/** The piece indexes set in `bits`, ascending. */
export function piecesOf(bits: Uint8Array): number[] {
  const out: number[] = []
  for (let byte = 0; byte < bits.length; byte++) {
    const v = bits[byte]!
    if (v === 0) continue
    for (let bit = 0; bit < 8; bit++) if (v & (1 << bit)) out.push(byte * 8 + bit)
  }
  return out
}

/** A bitmap of `count` pieces with `indexes` set. */
export function bitsOf(indexes: Iterable<number>, count: number): Uint8Array {
  const bits = new Uint8Array(Math.ceil(count / 8))
  for (const i of indexes) bits[i >> 3]! |= 1 << (i & 7)
  return bits
}

/** A byte range of a block. */
export interface PieceRange {
  offset: number
  length: number
}

/** The byte ranges of a block of `size` bytes outside the pieces in `skip`, merged into runs. */
export function rangesOutside(size: number, skip: ReadonlySet<number>): PieceRange[] {
  const out: PieceRange[] = []
  for (let i = 0; i < pieceCount(size); i++) {
    if (skip.has(i)) continue
    const offset = i * RESUME_PIECE_BYTES
    const length = pieceBytes(size, i)
    const last = out[out.length - 1]
    if (last && last.offset + last.length === offset) last.length += length
    else out.push({ offset, length })
  }
  return out
}

/** `ranges` cut into consecutive groups of at most `bytes` bytes each, in order. */
export function chunked(ranges: readonly PieceRange[], bytes: number): PieceRange[][] {
  const out: PieceRange[][] = []
  let group: PieceRange[] = []
  let inGroup = 0
  for (const r of ranges) {
    let { offset, length } = r
    while (length > 0) {
      const take = Math.min(length, bytes - inGroup)
      group.push({ offset, length: take })
      offset += take
      length -= take
      inGroup += take
      if (inGroup === bytes) {
        out.push(group)
        group = []
        inGroup = 0
      }
    }
  }
  if (group.length > 0) out.push(group)
  return out
}

/**
 * What a resuming destination has made durable: each block's complete pieces as of sync
 * `epoch` (every page of them landed, received or held from before), after the blocks were
 * flushed (`msync` + `fdatasync` for mapped files).
 */
export interface DurablePieces {
  epoch: number
  blocks: Array<{ block: RamBlock; pieces: Uint8Array }>
}
