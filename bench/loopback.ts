/**
 * Loopback throughput: multifd (this package) against QEMU 10 multifd, the raw multifd-shaped
 * ceiling, and a single-stream node:net copy, all in one invocation on the same source bytes.
 * Both sides run in their own processes; destination memory is preallocated everywhere.
 *
 *   bench/loopback [--size 1G] [--channels 1,2,4,8] [--reps 3] [--json] [--no-qemu] [--no-ceiling]
 */
import { existsSync, rmSync } from 'node:fs'
import { execFileSync } from 'node:child_process'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { median, parseSize, spread } from './lib/run.js'
import { nodeNet, ours, qemu, settle, sourceFile, timeoutFor, type Result } from './lib/transfer.js'

const here = dirname(fileURLToPath(import.meta.url))
const root = join(here, '..')
const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1G' },
    channels: { type: 'string', default: '1,2,4,8' },
    reps: { type: 'string', default: '3' },
    json: { type: 'boolean', default: false },
    'no-qemu': { type: 'boolean', default: false },
    'no-ceiling': { type: 'boolean', default: false },
  },
})
const size = parseSize(values.size!)
const channelsList = values.channels!.split(',').map(Number)
const reps = Number(values.reps)
const GiB = 2 ** 30
const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')

const srcFile = sourceFile(size, log)

const timeout = timeoutFor(size)

// The raw ceiling lives in the shared reference folder; it is optional for a user's clone.
const ceilingSrc = join(root, '..', 'shared', 'bench', 'ceiling')
let ceilingBin: string | undefined
if (!values['no-ceiling'] && existsSync(join(ceilingSrc, 'Cargo.toml'))) {
  const targetDir = join(root, 'target', 'ceiling')
  execFileSync('cargo', ['build', '--quiet', '--release', '--manifest-path', join(ceilingSrc, 'Cargo.toml'), '--target-dir', targetDir], { stdio: 'inherit', env: { ...process.env, RUSTFLAGS: '-C target-cpu=native' } })
  ceilingBin = join(targetDir, 'release', 'ceil')
}

async function ceiling(ch: number): Promise<Result | undefined> {
  if (!ceilingBin) return undefined
  const port = String(47000 + Math.floor(Math.random() * 2000))
  const kv = (s: string): Record<string, string> => Object.fromEntries(s.trim().split(/\s+/).map((p) => p.split('=') as [string, string]))
  const { spawn } = await import('node:child_process')
  const recv = spawn(ceilingBin, ['recv', `port=${port}`, `n=${ch}`, 'mem=prealloc', `size_mib=${Math.floor(size / 2 ** 20)}`], { stdio: ['ignore', 'pipe', 'inherit'] })
  let recvOut = ''
  const ready = new Promise<void>((resolve) => recv.stdout.on('data', (d: Buffer) => {
    recvOut += d.toString()
    if (recvOut.includes('READY')) resolve()
  }))
  const recvDone = new Promise<void>((r) => recv.on('exit', () => r()))
  await ready
  const sendOut = execFileSync(ceilingBin, ['send', `port=${port}`, `n=${ch}`, `size_mib=${Math.floor(size / 2 ** 20)}`], { stdio: ['ignore', 'pipe', 'ignore'], timeout }).toString()
  await recvDone
  const s = kv(sendOut.split('\n').filter((l) => l.startsWith('SEND')).pop() ?? '')
  const r = kv(recvOut.split('\n').filter((l) => l.startsWith('RECV')).pop() ?? '')
  const cpu = (m: Record<string, string>): number => Number(m.utime ?? 0) + Number(m.stime ?? 0)
  return { gbps: size / Number(s.secs) / 1e9, srcCpu: cpu(s), dstCpu: cpu(r), ok: s.csum !== undefined && s.csum === r.csum }
}

type Row = { channels: number; ours: Result[]; qemu: Result[]; ceiling: Result[] }
const rows: Row[] = []
const net: Result[] = []
log(`loopback TCP, ${(size / GiB).toFixed(2)} GiB of random data, destination memory preallocated, ${reps} rep(s)`)
for (let rep = 0; rep < reps; rep++) {
  net.push(await nodeNet(size, srcFile))
  for (const ch of channelsList) {
    let row = rows.find((r) => r.channels === ch)
    if (!row) rows.push((row = { channels: ch, ours: [], qemu: [], ceiling: [] }))
    // Rotate who goes first each rep, and let the machine settle between runs: a process that
    // just exited may still be giving gigabytes of memory back, which slows whoever runs next.
    const runs: Array<() => Promise<void>> = [
      async () => void row.ours.push(await ours(size, srcFile, { channels: ch })),
      async () => {
        if (values['no-qemu']) return
        const q = await qemu(size, srcFile, { channels: ch }).catch((e: Error) => (log(`qemu: ${e.message.split('\n')[0]}`), undefined))
        if (q) row.qemu.push(q)
      },
      async () => {
        const c = await ceiling(ch).catch((e: Error) => (log(`ceiling: ${e.message}`), undefined))
        if (c) row.ceiling.push(c)
      },
    ]
    for (let i = 0; i < runs.length; i++) {
      await settle()
      await runs[(i + rep) % runs.length]!()
    }
    log(`rep ${rep + 1} ch ${ch}: ours ${row.ours.at(-1)!.gbps.toFixed(2)} GB/s` + (row.qemu.length > rep ? `, qemu ${row.qemu.at(-1)!.gbps.toFixed(2)}` : '') + (row.ceiling.length > rep ? `, ceiling ${row.ceiling.at(-1)!.gbps.toFixed(2)}` : ''))
  }
}
rmSync(srcFile, { force: true })

const m = (rs: Result[], k: keyof Result): number => median(rs.map((r) => r[k] as number))
const perGiB = (cpu: number): number => cpu / (size / GiB)
const netGbps = m(net, 'gbps')
const summary = rows.map((r) => ({
  channels: r.channels,
  oursGBps: m(r.ours, 'gbps'),
  qemuGBps: m(r.qemu, 'gbps'),
  ceilingGBps: m(r.ceiling, 'gbps'),
  oursOverQemu: m(r.ours, 'gbps') / m(r.qemu, 'gbps'),
  oursOverCeiling: m(r.ours, 'gbps') / m(r.ceiling, 'gbps'),
  oursOverNodeNet: m(r.ours, 'gbps') / netGbps,
  oursCpuPerGiB: { source: perGiB(m(r.ours, 'srcCpu')), destination: perGiB(m(r.ours, 'dstCpu')) },
  qemuCpuPerGiB: { source: perGiB(m(r.qemu, 'srcCpu')), destination: perGiB(m(r.qemu, 'dstCpu')) },
  verified: r.ours.every((x) => x.ok) && r.qemu.every((x) => x.ok) && r.ceiling.every((x) => x.ok),
  spread: { ours: spread(r.ours.map((x) => x.gbps)), qemu: spread(r.qemu.map((x) => x.gbps)), ceiling: spread(r.ceiling.map((x) => x.gbps)) },
}))
const allVerified = summary.every((s) => s.verified) && net.every((n) => n.ok)

if (values.json) {
  console.log(JSON.stringify({ sizeBytes: size, reps, nodeNetGBps: netGbps, nodeNet: spread(net.map((x) => x.gbps)), ceilingAvailable: ceilingBin !== undefined, rows: summary, verified: allVerified }))
} else {
  const f = (x: number, d = 2): string => (Number.isFinite(x) ? x.toFixed(d) : '-')
  log('')
  log('channels | multifd GB/s | QEMU GB/s | ceiling GB/s | vs QEMU | vs ceiling | vs node:net | CPU s/GiB src/dst (ours) | (QEMU)')
  for (const s of summary) {
    log(`${String(s.channels).padStart(8)} | ${f(s.oursGBps).padStart(12)} | ${f(s.qemuGBps).padStart(9)} | ${f(s.ceilingGBps).padStart(12)} | ${(f(s.oursOverQemu) + 'x').padStart(7)} | ${(f(s.oursOverCeiling) + 'x').padStart(10)} | ${(f(s.oursOverNodeNet) + 'x').padStart(11)} | ${f(s.oursCpuPerGiB.source)} / ${f(s.oursCpuPerGiB.destination)}`.padEnd(110) + ` | ${f(s.qemuCpuPerGiB.source)} / ${f(s.qemuCpuPerGiB.destination)}`)
  }
  log(`node:net single stream: ${f(netGbps)} GB/s (baseline for "vs node:net")`)
  log(`every transfer verified byte for byte (sha256 / checksum): ${allVerified ? 'yes' : 'NO'}`)
}
if (!allVerified) process.exitCode = 1
