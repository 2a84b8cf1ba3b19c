/**
 * One side of a benchmark transfer, in its own process so each side's CPU time is its own.
 * Prints one JSON line per event on stdout.
 *
 *   mfd-dest SIZE [OPTIONS_JSON]          listen on loopback, receive into preallocated memory
 *   mfd-dest-file SIZE PATH               listen, receive into a new file at PATH (as `recv --out`)
 *   mfd-src ADDRESS FILE SIZE OPTIONS_JSON  send FILE (mapped, prefaulted) with these Source options
 *   snap-save FILE SNAPSHOT SIZE CHANNELS     snapshot FILE (mapped, prefaulted) to SNAPSHOT
 *   snap-restore SNAPSHOT SIZE CHANNELS       restore SNAPSHOT into preallocated memory
 *   net-dest SIZE                         node:net server reading into a preallocated Buffer
 *   net-src ADDRESS FILE SIZE             node:net client writing FILE in 512 KiB chunks
 */
import { createHash } from 'node:crypto'
import { closeSync, openSync, readSync } from 'node:fs'
import net from 'node:net'
import { Destination, RamBlock, migrate, restore, snapshot, type DestinationOptions, type SourceOptions } from '../../ts/index.js'

const say = (m: object): void => void process.stdout.write(JSON.stringify(m) + '\n')
const cpu = (): number => {
  const u = process.cpuUsage()
  return (u.user + u.system) / 1e6
}
const GiB = 2 ** 30
/** sha256 of a block, read in 1 GiB views (one view cannot exceed V8's typed-array limit). */
const hashBlock = (b: RamBlock): string => {
  const h = createHash('sha256')
  for (let off = 0; off < b.size; off += GiB) h.update(b.view(off, Math.min(GiB, b.size - off)))
  return h.digest('hex')
}
const [mode, ...args] = process.argv.slice(2)

switch (mode) {
  case 'mfd-dest': {
    const block = RamBlock.allocate({ name: 'bench', size: Number(args[0]), prefault: true })
    const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [block], ...(JSON.parse(args[1] ?? '{}') as Partial<DestinationOptions>) })
    const cpu0 = cpu()
    say({ type: 'listening', address: dest.address })
    const s = await dest.done
    say({ type: 'done', cpuSeconds: cpu() - cpu0, bytes: s.bytes, sha256: hashBlock(block) })
    break
  }
  case 'mfd-dest-file': {
    // A new file, pages allocated as they arrive (the CLI's `recv --out` on tmpfs).
    const [sizeArg, path] = args
    const dest = Destination.listen({
      address: 'tcp:127.0.0.1:0',
      blocks: (table) => table.map((b) => RamBlock.mapFile({ name: b.name, path: path!, size: b.length, pageSize: b.pageSize })),
    })
    const cpu0 = cpu()
    say({ type: 'listening', address: dest.address })
    const s = await dest.done
    const block = RamBlock.mapFile({ name: 'bench', path: path!, size: Number(sizeArg) })
    say({ type: 'done', cpuSeconds: cpu() - cpu0, bytes: s.bytes, sha256: hashBlock(block) })
    break
  }
  case 'mfd-src': {
    const [address, file, size, options] = args
    const block = RamBlock.mapFile({ name: 'bench', path: file!, size: Number(size), prefault: true })
    const cpu0 = cpu()
    const t0 = performance.now()
    const s = await migrate({ address: address!, blocks: [block], ...(JSON.parse(options!) as Partial<SourceOptions>) })
    const seconds = (performance.now() - t0) / 1000
    const zc = s.perChannel.reduce((a, c) => ({ sends: a.sends + c.zeroCopySends, copied: a.copied + c.zeroCopyCopied, enobufs: a.enobufs + c.zeroCopyEnobufs }), { sends: 0, copied: 0, enobufs: 0 })
    say({ type: 'done', seconds, cpuSeconds: cpu() - cpu0, bytes: s.bytes, sha256: hashBlock(block), zeroCopy: zc })
    break
  }
  case 'net-dest': {
    // Preallocated memory in 1 GiB buffers (one Buffer cannot hold more than 2-4 GiB).
    const size = Number(args[0])
    const target = Array.from({ length: Math.ceil(size / GiB) }, (_, i) => Buffer.allocUnsafe(Math.min(GiB, size - i * GiB)).fill(0xff))
    let at = 0
    let cpu0 = 0
    const server = net.createServer((sock) => {
      cpu0 = cpu()
      sock.on('data', (chunk: Buffer) => {
        for (let from = 0; from < chunk.length; ) {
          const part = target[Math.floor(at / GiB)]!
          const n = chunk.copy(part, at % GiB, from)
          from += n
          at += n
        }
        if (at === size) {
          sock.end(Buffer.from([1]))
          server.close()
          const h = createHash('sha256')
          for (const part of target) h.update(part)
          say({ type: 'done', cpuSeconds: cpu() - cpu0, bytes: at, sha256: h.digest('hex') })
        }
      })
    })
    server.listen(0, '127.0.0.1', () => {
      const a = server.address() as net.AddressInfo
      say({ type: 'listening', address: `tcp:127.0.0.1:${a.port}` })
    })
    break
  }
  case 'net-src': {
    // The file is read in 512 KiB chunks as it is written (readFileSync stops at 2 GiB), and
    // hashed as it goes; the source side's hash is of what was sent.
    const [address, file, sizeArg] = args
    const size = Number(sizeArg)
    const fd = openSync(file!, 'r')
    const port = Number(/:(\d+)$/.exec(address!)![1])
    const h = createHash('sha256')
    const cpu0 = cpu()
    const t0 = performance.now()
    const sock = net.connect(port, '127.0.0.1')
    let off = 0
    const CHUNK = 512 * 1024
    const pump = (): void => {
      while (off < size) {
        const chunk = Buffer.allocUnsafe(Math.min(CHUNK, size - off))
        const n = readSync(fd, chunk, 0, chunk.length, off)
        if (n !== chunk.length) throw new Error(`${file}: short read at ${off}`)
        h.update(chunk)
        off += n
        if (!sock.write(chunk)) return void sock.once('drain', pump)
      }
    }
    sock.on('connect', pump)
    sock.once('data', () => {
      const seconds = (performance.now() - t0) / 1000
      closeSync(fd)
      say({ type: 'done', seconds, cpuSeconds: cpu() - cpu0, bytes: size, sha256: h.digest('hex') })
      sock.destroy()
    })
    break
  }
  case 'snap-save': {
    const [file, snap, size, channels] = args
    const block = RamBlock.mapFile({ name: 'bench', path: file!, size: Number(size), prefault: true })
    const cpu0 = cpu()
    const s = await snapshot([block], snap!, { channels: Number(channels) })
    say({ type: 'done', seconds: s.seconds, cpuSeconds: cpu() - cpu0, bytes: s.bytes, sha256: hashBlock(block) })
    break
  }
  case 'snap-restore': {
    const [snap, size, channels] = args
    const block = RamBlock.allocate({ name: 'bench', size: Number(size), prefault: true })
    const cpu0 = cpu()
    const s = await restore(snap!, { blocks: [block], channels: Number(channels) })
    say({ type: 'done', seconds: s.seconds, cpuSeconds: cpu() - cpu0, bytes: s.bytes, sha256: hashBlock(block) })
    break
  }
  default:
    throw new Error(`unknown mode ${mode}`)
}
