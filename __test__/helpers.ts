import { createHash, randomFillSync, randomInt } from 'node:crypto'
import { mkdtempSync, readFileSync, readdirSync } from 'node:fs'
import net from 'node:net'
import tls from 'node:tls'
import { execFileSync, spawn, type ChildProcess } from 'node:child_process'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { MultifdError, RamBlock, type MultifdErrorCode } from '../ts/index.js'

export const MiB = 1 << 20

/** sha256 of a whole file. */
export const sha256File = (path: string): string => createHash('sha256').update(readFileSync(path)).digest('hex')

export function sha256(block: RamBlock): string {
  return createHash('sha256').update(block.view()).digest('hex')
}

/** Random data, with every fifth page left zero. */
export function fillRandom(block: RamBlock): void {
  const view = block.view()
  randomFillSync(view)
  for (let off = 0; off < view.length; off += 5 * block.pageSize) view.fill(0, off, off + block.pageSize)
}

/** mulberry32: a small seeded generator, so a failing run can be repeated from its seed. */
export function seeded(seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** Pairs of (source, destination) blocks with the same names and sizes. */
export function blockPair(specs: Array<[string, number]>, options: { prefault?: boolean } = {}): { src: RamBlock[]; dst: RamBlock[] } {
  const src = specs.map(([name, size]) => RamBlock.allocate({ name, size, prefault: options.prefault ?? false }))
  src.forEach(fillRandom)
  const dst = specs.map(([name, size]) => RamBlock.allocate({ name, size }))
  return { src, dst }
}

export function sameBytes(a: RamBlock[], b: RamBlock[]): boolean {
  return a.length === b.length && a.every((x, i) => sha256(x) === sha256(b[i]!))
}

/** Writes random bytes into `count` random pages of `block` (marking them dirty). */
export function scribble(block: RamBlock, count: number): void {
  const pages = block.size / block.pageSize
  for (let i = 0; i < count; i++) {
    const page = randomInt(pages)
    block.write(page * block.pageSize + randomInt(block.pageSize - 16), randomFillSync(Buffer.alloc(16)))
  }
}

export function threadCount(): number {
  return readdirSync('/proc/self/task').length
}

export function fdCount(): number {
  return readdirSync('/proc/self/fd').length
}

/** The code of a MultifdError a promise rejects with. */
export async function rejectionCode(p: Promise<unknown>): Promise<MultifdErrorCode> {
  try {
    await p
  } catch (e) {
    if (e instanceof MultifdError) return e.code
    throw e
  }
  throw new Error('expected a rejection')
}

/** Settles as `p` does, or rejects naming `what` if that takes longer than `ms`. */
export function until<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout
  return Promise.race([
    p,
    new Promise<T>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} did not happen within ${ms} ms`)), ms)
    }),
  ]).finally(() => clearTimeout(timer))
}

/**
 * Resolves once `check()` is true; rejects after `ms`. Checks at once, then after 1, 2, 4 ...
 * ms, at most every 50 ms: quick for what is about to happen, light on a loaded machine for
 * what takes a while. Stops checking when it settles either way.
 */
export function whenTrue(check: () => boolean, ms: number, what: string): Promise<void> {
  const deadline = performance.now() + ms
  return new Promise<void>((resolve, reject) => {
    let pause = 1
    const poll = (): void => {
      if (check()) return resolve()
      const left = deadline - performance.now()
      if (left <= 0) return reject(new Error(`${what} did not happen within ${ms} ms`))
      setTimeout(poll, Math.min(pause, left))
      pause = Math.min(pause * 2, 50)
    }
    poll()
  })
}

const PEER = fileURLToPath(new URL('./fixtures/peer.ts', import.meta.url))

/** A peer process (fixtures/peer.ts) whose stdout lines are JSON messages. */
export interface Peer {
  child: ChildProcess
  /** Resolves with the first message of `type`. */
  next(type: string): Promise<Record<string, unknown>>
  exited: Promise<number | null>
}

/** Spawns `script` (default: fixtures/peer.ts) with `args`. */
export function spawnPeer(args: string[], script: string = PEER): Peer {
  const child = spawn(process.execPath, ['--import=tsx', script, ...args], { stdio: ['ignore', 'pipe', 'inherit'] })
  const seen: Array<Record<string, unknown>> = []
  const waiters: Array<{ type: string; resolve: (m: Record<string, unknown>) => void }> = []
  createInterface({ input: child.stdout! }).on('line', (line) => {
    const m = JSON.parse(line) as Record<string, unknown>
    seen.push(m)
    for (const w of [...waiters]) if (w.type === m.type) {
      waiters.splice(waiters.indexOf(w), 1)
      w.resolve(m)
    }
  })
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  return {
    child,
    exited,
    next: (type) => {
      const found = seen.find((m) => m.type === type)
      if (found) return Promise.resolve(found)
      return until(new Promise((resolve) => waiters.push({ type, resolve })), 20_000, `peer message ${type}`)
    },
  }
}

/** Credentials for a raw client that speaks TLS (node:tls, i.e. OpenSSL) instead of plaintext. */
export interface RawTls {
  cert: string
  key: string
  ca: string
  servername: string
}

/** A raw TCP connection to `address`, over TLS when `secure` is given. */
async function rawConnect(address: string, secure?: RawTls): Promise<net.Socket> {
  const [, host, port] = /^tcp:(.+):(\d+)$/.exec(address)!
  const socket = secure
    ? tls.connect({ host, port: Number(port), cert: readFileSync(secure.cert), key: readFileSync(secure.key), ca: readFileSync(secure.ca), servername: secure.servername })
    : net.connect(Number(port), host)
  await new Promise<void>((resolve, reject) => socket.once(secure ? 'secureConnect' : 'connect', resolve).once('error', reject))
  return socket
}

/** Sends raw bytes as a multifd channel would (init packet, packets) and keeps the socket. */
export async function rawChannel(address: string, bytes: Uint8Array[], secure?: RawTls): Promise<net.Socket> {
  const socket = await rawConnect(address, secure)
  socket.on('error', () => undefined) // the destination may reset it after refusing the bytes
  for (const b of bytes) socket.write(b)
  return socket
}

/** Resident memory of this process, in bytes. */
export function rss(): number {
  return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync('/proc/self/status', 'utf8'))![1]) * 1024
}

/** A raw control-protocol client, for driving a destination by hand. */
export async function rawControl(address: string, secure?: RawTls): Promise<RawControl> {
  const socket = await rawConnect(address, secure)
  socket.on('error', () => undefined)
  socket.write(Buffer.from('MFDC'))
  return controlFrames(socket)
}

let pki: string | undefined
/** TLS options from the test PKI, as Source and Destination take them. */
export interface TestTls {
  cert: string
  key: string
  ca: string
}
/**
 * A fresh throwaway PKI from scripts/test-certs.sh (openssl), made once per test process:
 * ca, other-ca, dest (localhost, 127.0.0.1), source, expired, intruder, rogue (other CA).
 * `dest()` and `source()` build the options each side takes.
 */
export function testPki(): {
  dir: string
  file: (name: string) => string
  pem: (name: string) => string
  dest: (allow?: string[]) => TestTls & { allow?: string[] }
  source: (who?: string, ca?: string, name?: string) => TestTls & { name?: string }
} {
  if (!pki) {
    pki = mkdtempSync(join(tmpdir(), 'multifd-pki-'))
    execFileSync('bash', [fileURLToPath(new URL('../scripts/test-certs.sh', import.meta.url)), pki], { stdio: ['ignore', 'ignore', 'inherit'] })
  }
  const dir = pki
  const file = (n: string): string => join(dir, n)
  return {
    dir,
    file,
    pem: (n) => readFileSync(file(n), 'utf8'),
    dest: (allow) => ({ cert: file('dest.pem'), key: file('dest.key'), ca: file('ca.pem'), ...(allow ? { allow } : {}) }),
    source: (who = 'source', ca = 'ca.pem', name) => ({ cert: file(`${who}.pem`), key: file(`${who}.key`), ca: file(ca), ...(name ? { name } : {}) }),
  }
}

/** Control frames of a raw peer: `send` one, `next()` takes the oldest received. */
export interface RawControl {
  socket: net.Socket
  send: (m: object) => void
  next: () => Promise<Record<string, unknown> | undefined>
}

/** Frames a control connection whose magic was already read (or written): length-prefixed JSON. */
function controlFrames(socket: net.Socket, initial: Buffer = Buffer.alloc(0)): RawControl {
  const send = (m: object): void => {
    const body = Buffer.from(JSON.stringify(m))
    const len = Buffer.alloc(4)
    len.writeUInt32BE(body.length)
    socket.write(Buffer.concat([len, body]))
  }
  const frames: Array<Record<string, unknown>> = []
  const waiting: Array<(f: Record<string, unknown> | undefined) => void> = []
  let closed = false
  let buf = initial
  const drain = (): void => {
    while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
      const len = buf.readUInt32BE(0)
      const f = JSON.parse(buf.subarray(4, 4 + len).toString()) as Record<string, unknown>
      buf = buf.subarray(4 + len)
      const w = waiting.shift()
      if (w) w(f)
      else frames.push(f)
    }
  }
  socket.on('data', (chunk: Buffer) => {
    buf = Buffer.concat([buf, chunk])
    drain()
  })
  socket.on('close', () => {
    closed = true
    for (const w of waiting.splice(0)) w(undefined)
  })
  drain()
  const next = (): Promise<Record<string, unknown> | undefined> =>
    frames.length > 0 ? Promise.resolve(frames.shift()) : closed ? Promise.resolve(undefined) : until(new Promise((r) => waiting.push(r)), 10_000, 'a control frame')
  return { socket, send, next }
}

/**
 * A fake destination speaking the control protocol by hand, on loopback: it answers the
 * hello with a welcome and accepts multifd channels (reading them unless `stopReading`).
 * `control` resolves with the control connection once its hello arrived (and was welcomed).
 */
export async function rawDestination(options: { stopReading?: boolean } = {}): Promise<{ address: string; control: Promise<RawControl & { hello: Record<string, unknown> }>; channels: net.Socket[]; close: () => void }> {
  const channels: net.Socket[] = []
  let resolveControl: (c: RawControl & { hello: Record<string, unknown> }) => void = () => undefined
  const control = until(new Promise<RawControl & { hello: Record<string, unknown> }>((r) => (resolveControl = r)), 10_000, 'the source control connection')
  const sockets: net.Socket[] = []
  const server = net.createServer((socket) => {
    sockets.push(socket)
    socket.on('error', () => undefined)
    socket.once('readable', function first() {
      const magic = socket.read(4) as Buffer | null
      if (!magic) return socket.once('readable', first)
      if (magic.toString('latin1') === 'MFDC') {
        const c = controlFrames(socket)
        void c.next().then((hello) => {
          if (hello?.type !== 'hello') return
          c.send({ type: 'welcome', protocol: hello.protocol })
          resolveControl({ ...c, hello })
        })
      } else {
        channels.push(socket)
        if (options.stopReading) socket.pause()
        else socket.resume()
      }
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as net.AddressInfo).port
  return {
    address: `tcp:127.0.0.1:${port}`,
    control,
    channels,
    close: () => {
      for (const c of sockets) c.destroy()
      server.close()
    },
  }
}
