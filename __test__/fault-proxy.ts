/**
 * A loopback TCP proxy for fault tests: it forwards every connection to `target` and can cut
 * one (with a RST on both sides, or a plain close), cut it once it has carried a given number
 * of bytes, refuse new connections, or stall everything (a hung peer whose sockets stay open).
 */
import net from 'node:net'

export interface ProxiedConnection {
  /** Accepted order: 0 is the first connection the source opened (its control connection). */
  readonly index: number
  /** Bytes forwarded so far, source to destination. */
  readonly upBytes: () => number
  /** Bytes forwarded so far, destination to source. */
  readonly downBytes: () => number
  readonly open: () => boolean
}

export interface FaultProxy {
  readonly address: string
  /** Connections accepted so far (refused ones included). */
  accepted: () => number
  connections: () => readonly ProxiedConnection[]
  /** Cuts connection `n` now: RST both ways (`reset`, the default) or a plain close. False when there is no such open connection. */
  cut: (n: number, how?: 'reset' | 'close') => boolean
  /** Cuts connection `n` with a RST once it has forwarded `bytes` source-to-destination bytes (at once if it already has). */
  cutAfter: (n: number, bytes: number) => void
  /** The same for destination-to-source bytes: what the destination sends past `bytes` is never delivered. */
  cutAfterDown: (n: number, bytes: number) => void
  /** From now on, connections for which `refuse(index)` is true are reset as soon as they arrive. */
  refuseWhen: (refuse: ((index: number) => boolean) | undefined) => void
  /** Stops forwarding in both directions, as a hung peer whose sockets stay open. */
  stall: () => void
  /** The same for connection `n` only: a hung path for one connection. */
  hold: (n: number) => void
  /** Resolves once every proxied socket and the listener have released their descriptors. */
  close: () => Promise<void>
}

/** One direction of a pair: bytes forwarded so far, and where a pending cut lands. */
interface Flow {
  bytes: number
  cutAt?: number | undefined
}

interface Pair extends ProxiedConnection {
  down: net.Socket
  up: net.Socket
  /** Source to destination, and back. */
  flows: { up: Flow; down: Flow }
  held?: boolean
}

function reset(s: net.Socket): void {
  // A RST, as a broken path or a killed peer's kernel sends it (not a FIN).
  if (!s.destroyed) s.resetAndDestroy()
}

export async function faultProxy(target: string): Promise<FaultProxy> {
  const m = /^tcp:(.+):(\d+)$/.exec(target)
  if (!m) throw new Error(`faultProxy needs a tcp: address, got ${target}`)
  const [, host, port] = m
  const pairs: Pair[] = []
  const sockets: net.Socket[] = []
  let refuse: ((index: number) => boolean) | undefined
  let accepted = 0
  let stalled = false

  const cutPair = (p: Pair, how: 'reset' | 'close'): void => {
    for (const s of [p.down, p.up]) (how === 'reset' ? reset(s) : s.destroy())
  }

  const server = net.createServer((down) => {
    const index = accepted++
    sockets.push(down)
    down.on('error', () => undefined)
    if (refuse?.(index)) {
      reset(down)
      return
    }
    const up = net.connect(Number(port), host)
    sockets.push(up)
    up.on('error', () => undefined)
    const pair: Pair = {
      index,
      down,
      up,
      flows: { up: { bytes: 0 }, down: { bytes: 0 } },
      upBytes: () => pair.flows.up.bytes,
      downBytes: () => pair.flows.down.bytes,
      open: () => !down.destroyed && !up.destroyed,
    }
    const forward = (from: net.Socket, to: net.Socket, flow: Flow): void => {
      from.on('data', (chunk: Buffer) => {
        if (pair.held) return
        flow.bytes += chunk.length
        if (flow.cutAt !== undefined && flow.bytes >= flow.cutAt) {
          // Forward only what fits under the threshold, then cut: the cut lands mid-stream.
          const keep = chunk.length - (flow.bytes - flow.cutAt)
          if (keep > 0) to.write(chunk.subarray(0, keep), () => cutPair(pair, 'reset'))
          else cutPair(pair, 'reset')
          flow.cutAt = undefined
          return
        }
        if (!to.write(chunk)) from.pause()
      })
      to.on('drain', () => stalled || from.resume())
    }
    forward(down, up, pair.flows.up)
    forward(up, down, pair.flows.down)
    // One side gone closes the other, except while stalled: a hung path passes nothing on.
    down.on('close', () => stalled || cutPair(pair, 'close'))
    up.on('close', () => stalled || cutPair(pair, 'close'))
    pairs.push(pair)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))

  /** Cuts connection `n` with a RST once its `direction` has forwarded `bytes` (at once if it has). */
  const cutFlow = (n: number, direction: 'up' | 'down', bytes: number): void => {
    const p = pairs.find((q) => q.index === n)
    if (!p) throw new Error(`no connection ${n} yet`)
    const flow = p.flows[direction]
    if (flow.bytes >= bytes) cutPair(p, 'reset')
    else flow.cutAt = bytes
  }

  return {
    address: `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    accepted: () => accepted,
    connections: () => pairs,
    cut: (n, how = 'reset') => {
      const p = pairs.find((q) => q.index === n)
      if (!p || !p.open()) return false
      cutPair(p, how)
      return true
    },
    cutAfter: (n, bytes) => cutFlow(n, 'up', bytes),
    cutAfterDown: (n, bytes) => cutFlow(n, 'down', bytes),
    refuseWhen: (r) => {
      refuse = r
    },
    hold: (n) => {
      const p = pairs.find((q) => q.index === n)
      if (!p) throw new Error(`no connection ${n} yet`)
      p.held = true
    },
    stall: () => {
      stalled = true
      for (const p of pairs) {
        p.down.pause()
        p.up.pause()
      }
    },
    close: async () => {
      const closed = (s: net.Socket): Promise<void> => (s.closed ? Promise.resolve() : new Promise((r) => s.once('close', () => r())))
      const all = sockets.map(closed)
      for (const s of sockets) s.destroy()
      await Promise.all([...all, new Promise<void>((r) => server.close(() => r()))])
    },
  }
}
