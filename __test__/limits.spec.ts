/**
 * Every limit and option rule, at its boundaries, through the three ways in: the library's
 * options (facade), the `multifd` command (exit 2 and the message for a usage error), and the
 * native binding's constructors. The limits come from the core (`binding.limits()`), so this
 * walks whatever the core defines; each layer must give the same verdict with the same code.
 */
import test from 'ava'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import net from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Destination, MultifdError, RamBlock, Source } from '../ts/index.js'
import { binding, type NativeEvent } from '../ts/native.js'
import { fromNative } from '../ts/errors.js'
import { cli as runCli, type Run } from './cli-helpers.js'
import { LIMITS } from '../ts/options.js'
import { testPki, until } from './helpers.js'

const INVALID = 'ERR_MULTIFD_INVALID_ARGUMENT'
/** Nothing listens here: a source whose options pass fails to connect, not to validate. */
const NOWHERE = 'tcp:127.0.0.1:1'

/** What a layer made of a value: accepted, or refused with this code. */
type Verdict = 'accepted' | string

const dir = mkdtempSync(join(tmpdir(), 'multifd-limits-'))
const image = join(dir, 'a.img')
writeFileSync(image, Buffer.alloc(64 * 1024, 1))
test.after.always(() => rmSync(dir, { recursive: true, force: true }))

/** A facade call's verdict: refused with INVALID_ARGUMENT, or accepted (anything else). */
async function facade(call: () => unknown): Promise<Verdict> {
  try {
    const r = await call()
    if (r instanceof Destination) r.close()
    return 'accepted'
  } catch (e) {
    return e instanceof MultifdError && e.code === INVALID ? INVALID : 'accepted'
  }
}

const block = (): RamBlock => RamBlock.allocate({ name: 'm', size: 64 * 1024 })
const source = (o: Record<string, unknown>): Promise<Verdict> => facade(() => Source.connect({ address: NOWHERE, blocks: [block()], connectTimeoutMs: 2000, ...o } as never))
const destination = (o: Record<string, unknown>): Promise<Verdict> => facade(() => Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [], ...o } as never))

/** Runs `multifd args`; a `recv` that starts listening is accepted and interrupted. */
function cli(args: string[]): Promise<Run> {
  const run = runCli(args, { onStderr: (s) => s.includes('listening on') && run.kill('SIGINT') })
  return run.done
}

/** The CLI's verdict: exit 2 with a message is INVALID_ARGUMENT; exit 1 or a listening recv is accepted. */
async function command(args: string[]): Promise<Verdict> {
  const r = await cli(args)
  if (r.code === 2) return /multifd: [\s\S]+Run 'multifd help/.test(r.stderr) ? INVALID : `exit 2 without a message: ${r.stderr}`
  return r.code === 1 || r.stderr.includes('listening on') ? 'accepted' : `exit ${r.code}: ${r.stderr}`
}

function nativeCode(e: unknown): string {
  const m = fromNative(e)
  return m instanceof MultifdError ? m.code : `not ours: ${(e as Error).message}`
}

/** A peer that accepts every connection and ignores it, so a native source gets to start its channels. */
async function sink(address: string): Promise<{ address: string; close: () => void }> {
  const held: net.Socket[] = []
  const server = net.createServer((s) => held.push(s.on('error', () => undefined)))
  const path = address.startsWith('unix:') ? address.slice(5) : undefined
  await new Promise<void>((r) => (path ? server.listen(path, r) : server.listen(0, '127.0.0.1', r)))
  const port = path ? 0 : (server.address() as net.AddressInfo).port
  return { address: path ? address : `tcp:127.0.0.1:${port}`, close: () => (held.forEach((s) => s.destroy()), server.close()) }
}

/** `NativeSource.connect` then `startChannels` with these options: accepted once every channel connected. */
async function nativeSource(o: Record<string, unknown>, address = 'tcp:127.0.0.1:0'): Promise<Verdict> {
  const peer = await sink(address)
  let wake: (e: NativeEvent) => void = () => undefined
  const seen: NativeEvent[] = []
  const next = (kinds: string[]): Promise<NativeEvent> => {
    const found = seen.find((e) => kinds.includes(e.kind))
    return found ? Promise.resolve(found) : new Promise((r) => (wake = (e) => kinds.includes(e.kind) && r(e)))
  }
  const n = binding.NativeSource.connect(peer.address, 5000, undefined, (e) => {
    seen.push(e)
    wake(e)
  })
  try {
    await until(next(['controlConnected', 'failed']), 10_000, 'the control connection')
    try {
      n.startChannels({ uuid: Buffer.alloc(16, 1), channels: 2, pageSize: 4096, compression: 'none', zeroPageDetection: true, zeroCopy: false, integrity: false, connectTimeoutMs: 5000, ...o } as never)
    } catch (e) {
      return nativeCode(e)
    }
    const e = await until(next(['channelsReady', 'failed']), 20_000, 'the channels')
    return e.kind === 'failed' ? e.error.code : 'accepted'
  } finally {
    n.close(true)
    peer.close()
  }
}

/** `NativeDestination.listen` (with this classify timeout), then `configure` with these options. */
function nativeDestination(o: Record<string, unknown>, handshakeMs: unknown = 10_000, address = 'tcp:127.0.0.1:0'): Verdict {
  let d: InstanceType<typeof binding.NativeDestination> | undefined
  try {
    d = binding.NativeDestination.listen(address, handshakeMs as number, undefined, () => undefined)
    d.configure({ uuid: Buffer.alloc(16, 1), channels: 2, pageSize: 4096, compression: 'none', channelTimeoutMs: 10_000, integrity: false, ...o } as never)
    return 'accepted'
  } catch (e) {
    const code = nativeCode(e)
    return code === INVALID ? INVALID : code.startsWith('ERR_MULTIFD_') ? 'accepted' : code
  } finally {
    d?.close()
  }
}

type Range = { min: number; max: number }
/** A value, whether it is allowed, and whether it is of the wrong type. */
type Value = [unknown, boolean, 'wrong type'?]
/** min-1, min, max, max+1 and a wrong type, with whether each is allowed. */
const boundaries = (r: Range): Value[] => [
  [r.min - 1, false],
  [r.min, true],
  [r.max, true],
  [r.max + 1, false],
  ['twelve', false, 'wrong type'],
]

interface Walk {
  limit: string
  values: Value[]
  /** Each way in, by name: the verdict for one value ('skip' where the value cannot be given). */
  layers: Record<string, (v: unknown) => Promise<Verdict> | Verdict>
}

const flag = (v: unknown): string => String(v)
const levels = LIMITS.compression.filter((m) => m.levels)
/** A `unix:` address whose path (in our directory) is `bytes` long. */
const unixPath = (bytes: number): string => `unix:${join(dir, 'x'.repeat(bytes - dir.length - 1))}`

const walks: Walk[] = [
  {
    limit: 'channels',
    values: boundaries(LIMITS.channels),
    layers: {
      'Source options': (v) => source({ channels: v }),
      'Destination options': (v) => destination({ channels: v }),
      'multifd send --channels': (v) => command(['send', NOWHERE, image, '--channels', flag(v)]),
      'multifd recv --channels': (v) => command(['recv', 'tcp:127.0.0.1:0', '--out', join(dir, 'o'), '--channels', flag(v)]),
      'NativeSource.startChannels': (v) => nativeSource({ channels: v }),
      'NativeDestination.configure': (v) => nativeDestination({ channels: v }),
    },
  },
  {
    limit: 'peerTimeoutMs',
    values: boundaries(LIMITS.peerTimeoutMs),
    layers: {
      'Source options': (v) => source({ peerTimeoutMs: v }),
      'Destination options': (v) => destination({ peerTimeoutMs: v }),
      'multifd send --peer-timeout-ms': (v) => command(['send', NOWHERE, image, '--peer-timeout-ms', flag(v)]),
      'multifd recv --peer-timeout-ms': (v) => command(['recv', 'tcp:127.0.0.1:0', '--out', join(dir, 'o'), '--peer-timeout-ms', flag(v)]),
      'NativeSource.startChannels': (v) => nativeSource({ peerTimeoutMs: v }),
      'NativeDestination.configure': (v) => nativeDestination({ peerTimeoutMs: v }),
    },
  },
  {
    limit: 'connectTimeoutMs',
    values: boundaries(LIMITS.timeoutMs),
    layers: {
      'Source options': (v) => source({ connectTimeoutMs: v }),
      'NativeSource.startChannels': (v) => nativeSource({ connectTimeoutMs: v }),
    },
  },
  {
    limit: 'handshakeTimeoutMs',
    values: boundaries(LIMITS.timeoutMs),
    layers: {
      'Source options': (v) => source({ handshakeTimeoutMs: v }),
      'Destination options': (v) => destination({ handshakeTimeoutMs: v }),
      'NativeDestination.listen': (v) => nativeDestination({}, v),
    },
  },
  {
    limit: 'channelTimeoutMs',
    values: boundaries(LIMITS.timeoutMs),
    layers: {
      'Destination options': (v) => destination({ channelTimeoutMs: v }),
      'multifd recv --channel-timeout-ms': (v) => command(['recv', 'tcp:127.0.0.1:0', '--out', join(dir, 'o'), '--channel-timeout-ms', flag(v)]),
      'NativeDestination.configure': (v) => nativeDestination({ channelTimeoutMs: v }),
    },
  },
  {
    limit: 'channelRetries',
    values: boundaries(LIMITS.channelRetries),
    layers: {
      'Source options': (v) => source({ channelRetries: v }),
      'multifd send --channel-retries': (v) => command(['send', NOWHERE, image, '--channel-retries', flag(v)]),
      'NativeSource.startChannels': (v) => nativeSource({ channelRetries: v }),
    },
  },
  {
    limit: 'minChannels (2 channels)',
    values: [[0, false], [1, true], [2, true], [3, false], ['twelve', false, 'wrong type']],
    layers: {
      'Source options': (v) => source({ channels: 2, minChannels: v }),
      'multifd send --min-channels': (v) => command(['send', NOWHERE, image, '--channels', '2', '--min-channels', flag(v)]),
      'NativeSource.startChannels': (v) => nativeSource({ channels: 2, minChannels: v }),
    },
  },
  {
    limit: 'resumeWindowMs',
    values: boundaries(LIMITS.resumeWindowMs),
    layers: {
      'Destination options': (v) => destination({ resumeWindowMs: v }),
      'multifd recv --resume-window-ms': (v) => command(['recv', 'tcp:127.0.0.1:0', '--out', join(dir, 'o'), '--resume-window-ms', flag(v)]),
      'NativeDestination.configure': (v) => nativeDestination({ resumeWindowMs: v }),
    },
  },
  {
    limit: 'maxBandwidth',
    values: boundaries(LIMITS.maxBandwidth),
    layers: {
      'Source options': (v) => source({ maxBandwidth: v }),
      'NativeSource.startChannels': (v) => nativeSource({ maxBandwidth: v }),
    },
  },
  ...levels.map(
    (m): Walk => ({
      limit: `compressionLevel with ${m.name}`,
      values: boundaries(m.levels!),
      layers: {
        'Source options': (v) => source({ compression: m.name, compressionLevel: v }),
        'multifd send --level': (v) => command(['send', NOWHERE, image, '--compression', m.name, '--level', flag(v)]),
        'NativeSource.startChannels': (v) => nativeSource({ compression: m.name, compressionLevel: v }),
      },
    }),
  ),
  {
    limit: 'compression method',
    values: [...LIMITS.compression.map((m): Value => [m.name, true]), ['lz4', false], [3, false, 'wrong type']],
    layers: {
      'Source options': (v) => source({ compression: v }),
      'multifd send --compression': (v) => command(['send', NOWHERE, image, '--compression', flag(v)]),
      'NativeSource.startChannels': (v) => nativeSource({ compression: v }),
    },
  },
  {
    limit: 'a level without compression',
    values: [[undefined, true], [1, false]],
    layers: {
      'Source options': (v) => source({ compression: 'none', compressionLevel: v }),
      'multifd send --level': (v) => command(['send', NOWHERE, image, ...(v === undefined ? [] : ['--level', flag(v)])]),
      'NativeSource.startChannels': (v) => nativeSource({ compression: 'none', ...(v === undefined ? {} : { compressionLevel: v }) }),
    },
  },
  {
    limit: 'zeroCopySend with compression',
    values: [['none', true], [levels[0]!.name, false]],
    layers: {
      'Source options': (v) => source({ zeroCopySend: true, compression: v }),
      'multifd send --zero-copy --compression': (v) => command(['send', NOWHERE, image, '--zero-copy', '--compression', flag(v)]),
      'NativeSource.startChannels': (v) => nativeSource({ zeroCopy: true, compression: v }),
    },
  },
  {
    limit: 'zeroCopySend over a unix: address',
    values: [['tcp', true], ['unix', false]],
    layers: {
      'Source options': (v) => source({ zeroCopySend: true, ...(v === 'unix' ? { address: `unix:${join(dir, 'nowhere.sock')}` } : {}) }),
      'multifd send --zero-copy': (v) => command(['send', v === 'unix' ? `unix:${join(dir, 'nowhere.sock')}` : NOWHERE, image, '--zero-copy']),
      'NativeSource.startChannels': (v) => nativeSource({ zeroCopy: true }, v === 'unix' ? `unix:${join(dir, `zc-${Date.now()}.sock`)}` : 'tcp:127.0.0.1:0'),
    },
  },
  {
    limit: 'zeroCopySend with TLS',
    values: [[false, true], [true, false]],
    layers: {
      'Source options': (v) => source({ zeroCopySend: true, ...(v ? { tls: testPki().source() } : {}) }),
      'multifd send --zero-copy --tls-*': (v) => {
        const pki = testPki()
        return command(['send', NOWHERE, image, '--zero-copy', ...(v ? ['--tls-cert', pki.file('source.pem'), '--tls-key', pki.file('source.key'), '--tls-ca', pki.file('ca.pem')] : [])])
      },
    },
  },
  {
    limit: 'pageSize',
    values: [[LIMITS.pageSize.min / 2, false], [LIMITS.pageSize.min, true], [LIMITS.pageSize.max, true], [LIMITS.pageSize.max * 2, false], [LIMITS.pageSize.min + 1, false], ['big', false, 'wrong type']],
    layers: {
      'RamBlock.allocate': (v) => facade(() => RamBlock.allocate({ name: 'm', size: LIMITS.pageSize.max, pageSize: v as number })),
      'multifd inspect --page-size': (v) => command(['inspect', image, '--page-size', flag(v)]),
      'Block.allocate': (v) => {
        try {
          binding.Block.allocate('m', LIMITS.pageSize.max, v as number, false)
          return 'accepted'
        } catch (e) {
          return nativeCode(e)
        }
      },
    },
  },
  {
    limit: 'block name (UTF-8 bytes)',
    // 128 two-byte characters: 256 bytes of UTF-8 in 128 UTF-16 units.
    values: [['', false], ['a', true], ['x'.repeat(LIMITS.blockNameBytes.max), true], ['x'.repeat(LIMITS.blockNameBytes.max + 1), false], ['é'.repeat((LIMITS.blockNameBytes.max + 1) / 2), false], [7, false, 'wrong type']],
    layers: {
      'RamBlock.allocate': (v) => facade(() => RamBlock.allocate({ name: v as string, size: 4096 })),
      'multifd send --block': (v) => (typeof v === 'string' ? command(['send', NOWHERE, '--block', `${v}=${image}`]) : 'skip'),
      'Block.allocate': (v) => {
        try {
          binding.Block.allocate(v as string, 4096, 4096, false)
          return 'accepted'
        } catch (e) {
          return nativeCode(e)
        }
      },
    },
  },
  {
    limit: 'unix: address path (bytes)',
    values: [[0, false], [LIMITS.unixPathBytes.max, true], [LIMITS.unixPathBytes.max + 1, false]],
    layers: {
      'Destination options': (v) => destination({ address: v === 0 ? 'unix:' : unixPath(v as number) }),
      'multifd recv ADDRESS': (v) => command(['recv', v === 0 ? 'unix:' : unixPath(v as number), '--out', join(dir, 'o')]),
      'NativeDestination.listen': (v) => nativeDestination({}, 10_000, v === 0 ? 'unix:' : unixPath(v as number)),
    },
  },
]

/** Runs `jobs` at most `n` at a time. */
async function pool<T>(jobs: Array<() => Promise<T>>, n: number): Promise<T[]> {
  const out: T[] = new Array<T>(jobs.length)
  let next = 0
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (next < jobs.length) {
        const i = next++
        out[i] = await jobs[i]!()
      }
    }),
  )
  return out
}

// One walk at a time, three calls at once: each CLI call is a node process, and the machine
// running the suite runs other spec files beside this one.
for (const w of walks) {
  test.serial(`${w.limit}: every layer gives the same verdict at the boundaries`, async (t) => {
    t.timeout(180_000)
    const jobs = w.values.flatMap(([value, ok, kind]) =>
      Object.entries(w.layers).map(([layer, call]) => async () => {
        const got = await call(value)
        // A wrong type never reaches our checks in the binding: napi refuses it first, with its
        // own error. Every other refusal must be INVALID_ARGUMENT on every layer.
        const napiType = kind === 'wrong type' && /^(Native|Block\.)/.test(layer) && got.startsWith('not ours')
        return { layer, value, want: ok ? 'accepted' : INVALID, got: napiType ? INVALID : got }
      }),
    )
    for (const r of await pool(jobs, 3)) if (r.got !== 'skip') t.is(r.got, r.want, `${w.limit} = ${JSON.stringify(r.value)} through ${r.layer}`)
  })
}

test('the CLI says what it refuses: exit 2, the message names the option and the allowed values', async (t) => {
  t.timeout(60_000)
  const [zc, level] = await Promise.all([
    cli(['send', NOWHERE, image, '--zero-copy', '--compression', levels[0]!.name]),
    cli(['send', NOWHERE, image, '--compression', levels[0]!.name, '--level', String(levels[0]!.levels!.max + 1)]),
  ])
  t.is(zc.code, 2)
  t.regex(zc.stderr, /zero-copy send cannot be combined with compression[\s\S]*at zeroCopySend/)
  t.is(level.code, 2)
  t.regex(level.stderr, new RegExp(`${levels[0]!.name} level must be ${levels[0]!.levels!.min}..${levels[0]!.levels!.max}[\\s\\S]*at compressionLevel`))
  // The help shows the core's ranges and methods.
  const help = await cli(['help', 'send'])
  t.is(help.code, 0)
  t.true(help.stdout.includes(`${LIMITS.channels.min}..${LIMITS.channels.max}`))
  t.true(help.stdout.includes(LIMITS.compression.map((m) => m.name).join(' | ')))
  for (const m of levels) t.true(help.stdout.includes(`${m.name} ${m.levels!.min}..${m.levels!.max}`), m.name)
})
