/**
 * `multifd inspect`: what a captured channel stream or a snapshot file holds, and
 * `--rebuild DIR` to turn channel captures back into block images.
 */
import { closeSync, openSync, readFileSync, readSync } from 'node:fs'
import { decodeInitPacket, decodePacketHeader } from '../codec.js'
import { MultifdError, native } from '../errors.js'
import { binding } from '../native.js'
import { inspectSnapshot } from '../snapshot.js'
import { inspectQemuFile } from '../qemu.js'
import { IntIn, Size, UsageError, check, parse } from './args.js'
import { DEFAULT_PAGE_SIZE, LIMITS, PageSize } from '../options.js'
import { bytes } from './format.js'
import { z } from 'zod'

export const INSPECT_HELP = `multifd inspect FILE [--json] [--verbose]
multifd inspect CAPTURE... --rebuild DIR [--max-size SIZE]

Decodes a captured multifd channel byte stream (QEMU's or ours: init packet, then packets), a
snapshot file of ours, or a QEMU migration file written with mapped-ram: headers, blocks, page
counts, bitmap population, and the first error if the input is invalid (exit status 1).
With --json: one JSON object per line (type init | packet | block | error | summary).
With --rebuild: rebuilds the blocks carried by the channel captures (any compression) and
writes each to DIR/NAME as a sparse file (characters outside [A-Za-z0-9._@-] in block names
become %XX). Nothing may exist at DIR/NAME, not even a symbolic link
(ERR_MULTIFD_OUTPUT_EXISTS); the files are written under partial names and moved into place
at the end. Blocks adding up to more than --max-size are refused before anything is written.

  --page-size N    page size of the stream (default 4096)
  --max-size SIZE  most bytes the rebuilt blocks may add up to (default 64G)
  --verbose        every packet, not just a summary (human output)`

type Line = Record<string, unknown> & { type: string }

function kindOf(file: string): 'channel' | 'snapshot' | 'qemu' | 'unknown' {
  const head = Buffer.alloc(8)
  const fd = openSync(file, 'r')
  try {
    readSync(fd, head, 0, 8, 0)
  } finally {
    closeSync(fd)
  }
  if (head.readUInt32BE(0) === 0x11223344) return 'channel'
  if (head.toString('latin1') === 'MFDSNAP\0') return 'snapshot'
  if (head.readUInt32BE(0) === 0x5145564d) return 'qemu'
  return 'unknown'
}

function* channelLines(buf: Buffer, pageSize: number): Generator<Line> {
  const init = decodeInitPacket(buf)
  yield { type: 'init', channel: init.channelId, uuid: init.uuid.toString('hex') }
  let off = 64
  while (off < buf.length) {
    const h = decodePacketHeader(buf.subarray(off), { pageSize })
    const payloadBytes = h.nextPacketSize
    if (off + h.headerBytes + payloadBytes > buf.length) throw new MultifdError('ERR_MULTIFD_TRUNCATED', `packet ${h.packetNum} at byte ${off} needs ${h.headerBytes + payloadBytes} bytes, ${buf.length - off} are left`)
    yield { type: 'packet', offset: off, packetNum: Number(h.packetNum), flags: h.flags, sync: h.sync, compression: h.compression, block: h.block, normal: h.normalOffsets.map(Number), zero: h.zeroOffsets.map(Number), payloadBytes }
    off += h.headerBytes + payloadBytes
  }
}

function fileLines(file: string, pageSize: number): Generator<Line> | Line[] {
  switch (kindOf(file)) {
    case 'channel':
      return channelLines(readFileSync(file), pageSize)
    case 'snapshot': {
      const i = inspectSnapshot(file)
      return [
        { type: 'snapshot', format: 'multifd', complete: i.complete, generation: i.generation, pageSize: i.pageSize, fileLength: i.fileLength },
        ...i.blocks.map((b) => ({ type: 'block', name: b.name, length: b.length, pageSize: i.pageSize, pagesPresent: b.pagesPresent, pagesOffset: b.pagesOffset })),
      ]
    }
    case 'qemu': {
      const q = inspectQemuFile(file)
      return [
        { type: 'snapshot', format: 'qemu-mapped-ram', machine: q.machine, fileLength: q.fileLength },
        ...q.blocks.map((b) => ({ type: 'block', name: b.name, length: b.length, pageSize: b.pageSize, pagesPresent: b.pagesPresent, pagesOffset: b.pagesOffset })),
      ]
    }
    default:
      throw new MultifdError('ERR_MULTIFD_BAD_MAGIC', `${file} is neither a multifd channel capture (0x11223344), a multifd snapshot (MFDSNAP) nor a QEMU migration file (QEVM)`)
  }
}

/** Human lines for the records: packets are summarised unless verbose. */
function human(file: string, lines: Line[], verbose: boolean): string[] {
  const out = [`${file}:`]
  const packets = lines.filter((l) => l.type === 'packet')
  for (const l of lines) {
    if (l.type === 'init') out.push(`  multifd channel ${l.channel}, session ${l.uuid}`)
    else if (l.type === 'snapshot') out.push(`  ${l.format === 'multifd' ? `multifd snapshot, ${l.complete ? 'complete' : 'INCOMPLETE'}, generation ${l.generation}` : `QEMU migration file, machine ${l.machine}`}, ${bytes(l.fileLength as number)}`)
    else if (l.type === 'block') out.push(`  block ${JSON.stringify(l.name)}: ${bytes(l.length as number)}, ${l.pagesPresent} of ${(l.length as number) / (l.pageSize as number)} pages present`)
    else if (l.type === 'packet' && verbose) out.push(`  packet ${l.packetNum}${l.sync ? ' SYNC' : ''} ${l.compression} ${l.block || '-'}: ${(l.normal as number[]).length} normal, ${(l.zero as number[]).length} zero, ${l.payloadBytes} payload bytes`)
    else if (l.type === 'error') out.push(`  error: ${l.code}: ${l.message}`)
  }
  if (packets.length > 0) {
    const sum = (k: 'normal' | 'zero'): number => packets.reduce((a, p) => a + (p[k] as number[]).length, 0)
    const blocks = [...new Set(packets.map((p) => p.block as string).filter(Boolean))]
    out.push(`  ${packets.length} packets (${packets.filter((p) => p.sync).length} SYNC), ${sum('normal')} normal pages, ${sum('zero')} zero pages, ${bytes(packets.reduce((a, p) => a + (p.payloadBytes as number), 0))} payload; blocks: ${blocks.join(', ') || '-'}`)
  }
  return out
}

/** Returns the exit status: 0, or 1 when an input is invalid. */
export function inspect(argv: string[]): number {
  const { values, positionals } = parse(argv, { rebuild: { type: 'string' }, 'page-size': { type: 'string' }, 'max-size': { type: 'string' }, verbose: { type: 'boolean' } })
  const o = check(z.object({ 'page-size': IntIn(LIMITS.pageSize).pipe(PageSize).default(DEFAULT_PAGE_SIZE), 'max-size': Size.default(64 * 2 ** 30) }), values)
  if (positionals.length === 0) throw new UsageError('inspect needs a FILE')
  const json = values.json === true
  if (typeof values.rebuild === 'string') {
    const dir = values.rebuild
    try {
      const r = native(() => binding.rebuildCapturesToDir(positionals, o['page-size'], dir, o['max-size']))
      const written = r.blocks
      if (json) for (const w of written) process.stdout.write(JSON.stringify({ type: 'block', ...w }) + '\n')
      else process.stdout.write([`rebuilt ${written.length} block(s) from ${r.channels.length} channel(s):`, ...written.map((w) => `  ${w.name} -> ${w.file} (${bytes(w.length)})`)].join('\n') + '\n')
      return 0
    } catch (e) {
      const err = e instanceof MultifdError ? e : new MultifdError('ERR_MULTIFD_IO', String(e))
      process.stdout.write(json ? JSON.stringify({ type: 'error', code: err.code, message: err.message }) + '\n' : `rebuild failed: ${err.code}: ${err.message}\n`)
      return 1
    }
  }
  let status = 0
  for (const file of positionals) {
    const lines: Line[] = []
    try {
      for (const l of fileLines(file, o['page-size'])) {
        if (json) process.stdout.write(JSON.stringify(l) + '\n')
        lines.push(l)
      }
    } catch (e) {
      const err = e instanceof MultifdError ? e : new MultifdError('ERR_MULTIFD_IO', e instanceof Error ? e.message : String(e))
      const l = { type: 'error', file, code: err.code, message: err.message }
      if (json) process.stdout.write(JSON.stringify(l) + '\n')
      lines.push(l)
      status = 1
    }
    if (!json) process.stdout.write(human(file, lines, values.verbose === true).join('\n') + '\n')
  }
  return status
}
