/**
 * One side of a benchmark transfer, in its own process so each side's CPU time is its own.
 * Prints one JSON line per event on stdout.
 *
 *   mfd-dest SIZE [OPTIONS_JSON]          listen on loopback, receive into preallocated memory
 *   mfd-src ADDRESS FILE SIZE OPTIONS_JSON  send FILE (mapped, prefaulted) with these Source options
 *   snap-save FILE SNAPSHOT SIZE CHANNELS     snapshot FILE (mapped, prefaulted) to SNAPSHOT
 *   snap-restore SNAPSHOT SIZE CHANNELS       restore SNAPSHOT into preallocated memory
 *   net-dest SIZE                         node:net server reading into a preallocated Buffer
 *   net-src ADDRESS FILE SIZE             node:net client writing FILE in 512 KiB chunks
 */
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import net from 'node:net'
import { Destination, RamBlock, migrate, restore, snapshot, type DestinationOptions, type SourceOptions } from '../../ts/index.js'

const say = (m: object): void => void process.stdout.write(JSON.stringify(m) + '\n')
const cpu = (): number => {
  const u = process.cpuUsage()
  return (u.user + u.system) / 1e6
}
const hash = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex')
/** sha256 of a block, read in 1 GiB views (one view cannot exceed V8's typed-array limit). */
const hashBlock = (b: RamBlock): string => {
  const h = createHash('sha256')
  for (let off = 0; off < b.size; off += 2 ** 30) h.update(b.view(off, Math.min(2 ** 30, b.size - off)))
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
    const size = Number(args[0])
    const target = Buffer.allocUnsafe(size).fill(0xff)
    let at = 0
    let cpu0 = 0
    const server = net.createServer((sock) => {
      cpu0 = cpu()
      sock.on('data', (chunk: Buffer) => {
        chunk.copy(target, at)
        at += chunk.length
        if (at === size) {
          sock.end(Buffer.from([1]))
          server.close()
          say({ type: 'done', cpuSeconds: cpu() - cpu0, bytes: at, sha256: hash(target) })
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
    const [address, file, size] = args
    const data = readFileSync(file!).subarray(0, Number(size))
    const port = Number(/:(\d+)$/.exec(address!)![1])
    const cpu0 = cpu()
    const t0 = performance.now()
    const sock = net.connect(port, '127.0.0.1')
    let off = 0
    const CHUNK = 512 * 1024
    const pump = (): void => {
      while (off < data.length) {
        const ok = sock.write(data.subarray(off, off + CHUNK))
        off += CHUNK
        if (!ok) return void sock.once('drain', pump)
      }
    }
    sock.on('connect', pump)
    sock.once('data', () => {
      const seconds = (performance.now() - t0) / 1000
      say({ type: 'done', seconds, cpuSeconds: cpu() - cpu0, bytes: data.length, sha256: hash(data) })
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
