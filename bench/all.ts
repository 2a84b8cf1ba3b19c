/**
 * `npm run bench`: every performance comparison in one invocation, each figure a median with
 * its reps and spread, each ratio against its anchor measured in the same run, each checked
 * against the project's target. Writes bench/results/latest.json, latest.md and
 * throughput.svg (ours, QEMU and the raw ceiling against channel count).
 *
 *   npm run bench [-- --quick] [--size 1G] [--reps 5] [--only loopback,tls] [--skip live] [--no-qemu]
 *
 * Prerequisites are checked, not assumed: without QEMU 10 the QEMU anchors are skipped, without
 * the raw ceiling (the team's reference folder beside the clone) its column is empty, and the
 * report says so.
 */
import { execFileSync, spawn } from 'node:child_process'
import { existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import type { Spread } from './lib/run.js'

const root = join(dirname(fileURLToPath(import.meta.url)), '..')
const { values } = parseArgs({
  options: {
    quick: { type: 'boolean', default: false },
    size: { type: 'string' },
    reps: { type: 'string' },
    only: { type: 'string' },
    skip: { type: 'string' },
    'no-qemu': { type: 'boolean', default: false },
    out: { type: 'string', default: join(root, 'bench', 'results') },
  },
})
const quick = values.quick!
const size = values.size ?? (quick ? '256M' : '1G')
const reps = values.reps ?? (quick ? '2' : '5')
const log = (s: string): void => void process.stderr.write(s + '\n')

// Prerequisites.
const skipped: string[] = []
const hasQemu = !values['no-qemu'] && (() => {
  try {
    return /version (\d+)/.test(execFileSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }))
  } catch {
    return false
  }
})()
if (!hasQemu) skipped.push(values['no-qemu'] ? 'QEMU anchors: --no-qemu' : 'QEMU anchors: qemu-system-x86_64 not found (scripts/install-qemu.sh installs QEMU 10)')
if (!existsSync(join(root, '..', 'shared', 'bench', 'ceiling', 'Cargo.toml'))) skipped.push('raw ceiling: its source (the team reference folder, ../shared/bench/ceiling) is not beside this clone')
const isRoot = process.getuid?.() === 0
const qemuFlag = hasQemu ? [] : ['--no-qemu']

interface Step {
  name: string
  script: string
  args: string[]
}
const steps: Step[] = [
  { name: 'loopback', script: 'loopback.ts', args: ['--channels', '1,2,4,8', ...qemuFlag] },
  { name: 'integrity', script: 'integrity.ts', args: ['--channels', '2,4'] },
  { name: 'compression', script: 'compression.ts', args: ['--channels', '2,4', '--methods', 'zlib,zstd', '--kinds', 'random,text', ...qemuFlag] },
  { name: 'tls', script: 'tls.ts', args: ['--channels', '1,2,4', ...qemuFlag] },
  ...(isRoot ? [{ name: 'snapshot', script: 'snapshot.ts', args: ['--channels', '1,2,4', ...qemuFlag] }] : []),
  { name: 'fresh', script: 'fresh.ts', args: ['--channels', '1,2,4', ...qemuFlag] },
  { name: 'live', script: 'live.ts', args: ['--rates', '0.1,0.25,0.5'] },
]
if (!isRoot) skipped.push('snapshot: restores start from a dropped page cache, which needs root')
const only = values.only?.split(',')
const skip = new Set(values.skip?.split(',') ?? [])
const chosen = steps.filter((s) => (!only || only.includes(s.name)) && !skip.has(s.name))

function run(step: Step): Promise<Record<string, unknown> | undefined> {
  const sizeArgs = step.name === 'live' ? ['--size', quick ? '128M' : '256M'] : ['--size', size]
  const repArgs = step.name === 'live' ? [] : ['--reps', reps]
  const args = ['--import=tsx', join(root, 'bench', step.script), ...sizeArgs, ...repArgs, ...step.args, '--json']
  log(`\n== ${step.name}: bench/${step.script.replace(/\.ts$/, '')} ${[...sizeArgs, ...repArgs, ...step.args].join(' ')}`)
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] })
    let out = ''
    child.stdout.on('data', (d: Buffer) => (out += d.toString()))
    child.on('close', (code) => {
      const last = out.trim().split('\n').filter((l) => l.startsWith('{')).pop()
      if (code !== 0 || !last) {
        skipped.push(`${step.name}: exited with ${code}`)
        return resolve(last ? (JSON.parse(last) as Record<string, unknown>) : undefined)
      }
      resolve(JSON.parse(last) as Record<string, unknown>)
    })
  })
}

/** One comparison: ours against an anchor, as a ratio with a target. */
interface Check {
  path: string
  what: string
  channels?: number
  ours: Spread | number
  anchorName: string
  anchor: Spread | number | undefined
  ratio: number | undefined
  target: number
  /** `min`: the ratio must be at least the target; `max`: at most. */
  sense: 'min' | 'max'
  unit: string
}
const checks: Check[] = []
const med = (x: Spread | number | undefined): number | undefined => (x === undefined ? undefined : typeof x === 'number' ? x : x.n > 0 ? x.median : undefined)
const add = (c: Omit<Check, 'ratio'>): void => {
  const a = med(c.anchor)
  const o = med(c.ours)
  checks.push({ ...c, ratio: a && o !== undefined ? o / a : undefined })
}

const started = new Date()
const results: Record<string, unknown> = {}
for (const step of chosen) {
  const r = await run(step)
  if (!r) continue
  results[step.name] = r
  const rows = (r.rows ?? r.runs) as Array<Record<string, unknown>>
  switch (step.name) {
    case 'loopback':
      for (const row of rows) {
        const s = row.spread as { ours: Spread; qemu: Spread; ceiling: Spread }
        const ch = row.channels as number
        add({ path: 'plain', what: 'ours / raw ceiling', channels: ch, ours: s.ours, anchorName: 'ceiling', anchor: s.ceiling, target: 0.92, sense: 'min', unit: 'GB/s' })
        add({ path: 'plain', what: 'ours / QEMU', channels: ch, ours: s.ours, anchorName: 'QEMU', anchor: s.qemu, target: 1, sense: 'min', unit: 'GB/s' })
      }
      break
    case 'integrity':
      for (const row of rows) {
        const [plain, xxh3] = row.variants as Array<{ spread: Spread; senderCpuPerGiB: number; receiverCpuPerGiB: number }>
        const ch = row.channels as number
        add({ path: 'integrity', what: 'xxh3 / plain throughput', channels: ch, ours: xxh3!.spread, anchorName: 'plain', anchor: plain!.spread, target: 0.9, sense: 'min', unit: 'GB/s' })
        add({ path: 'integrity', what: 'xxh3 / plain CPU per GiB (src+dst)', channels: ch, ours: xxh3!.senderCpuPerGiB + xxh3!.receiverCpuPerGiB, anchorName: 'plain', anchor: plain!.senderCpuPerGiB + plain!.receiverCpuPerGiB, target: 1.15, sense: 'max', unit: 'CPU s/GiB' })
      }
      break
    case 'compression':
      for (const row of rows) {
        const s = row.spread as { ours: Spread; qemu: Spread }
        const ch = row.channels as number
        const m = row.method as string
        const k = row.kind as string
        add({ path: m, what: `${k}: ours / QEMU throughput`, channels: ch, ours: s.ours, anchorName: 'QEMU', anchor: s.qemu, target: 1.25, sense: 'min', unit: 'GB/s' })
        add({ path: m, what: `${k}: ours / QEMU wire bytes`, channels: ch, ours: row.oursWireBytes as number, anchorName: 'QEMU', anchor: row.qemuWireBytes as number | undefined, target: m === 'zlib' ? 1.1 : 1, sense: 'max', unit: 'bytes' })
      }
      break
    case 'tls':
      for (const row of rows) {
        const plain = row['ours'] as { spread: Spread } | undefined
        const tls = row['ours+tls'] as { spread: Spread } | undefined
        const qtls = row['qemu+tls'] as { spread: Spread } | undefined
        const ch = row.channels as number
        if (tls) add({ path: 'tls', what: 'ours+TLS / ours plain', channels: ch, ours: tls.spread, anchorName: 'plain', anchor: plain?.spread, target: 0.7, sense: 'min', unit: 'GB/s' })
        if (tls) add({ path: 'tls', what: 'ours+TLS / QEMU+TLS', channels: ch, ours: tls.spread, anchorName: 'QEMU+TLS', anchor: qtls?.spread, target: 1, sense: 'min', unit: 'GB/s' })
      }
      break
    case 'snapshot': {
      const find = (what: string, ch: number): { save: Spread; restore: Spread } | undefined => rows.find((x) => x.what === what && x.channels === ch) as { save: Spread; restore: Spread } | undefined
      for (const row of rows.filter((x) => x.what === 'multifd')) {
        const ch = row.channels as number
        const s = row as unknown as { save: Spread; restore: Spread }
        add({ path: 'snapshot', what: 'save incl. fdatasync / QEMU save + sync', channels: ch, ours: s.save, anchorName: 'QEMU + sync', anchor: find('QEMU mapped-ram + sync', ch)?.save, target: 1.25, sense: 'min', unit: 'GB/s' })
        add({ path: 'snapshot', what: 'restore / QEMU restore (cold cache)', channels: ch, ours: s.restore, anchorName: 'QEMU', anchor: find('QEMU mapped-ram', ch)?.restore, target: 1.25, sense: 'min', unit: 'GB/s' })
      }
      break
    }
    case 'fresh':
      for (const row of rows) {
        const s = row.spread as { ours: Spread; qemu: Spread }
        add({ path: 'fresh', what: 'into a new file / QEMU fresh destination', channels: row.channels as number, ours: s.ours, anchorName: 'QEMU fresh', anchor: s.qemu, target: 1, sense: 'min', unit: 'GB/s' })
      }
      break
    case 'live':
      for (const run of rows) {
        add({ path: 'live', what: `downtime / limit at ${String(run.fraction)}x bandwidth dirty rate`, ours: run.downtimeMs as number, anchorName: 'limit', anchor: (r as { downtimeLimitMs: number }).downtimeLimitMs, target: 1, sense: 'max', unit: 'ms' })
      }
      break
  }
}

const met = (c: Check): boolean | undefined => (c.ratio === undefined ? undefined : c.sense === 'min' ? c.ratio >= c.target : c.ratio <= c.target)
const fmt = (x: Spread | number | undefined, unit: string): string => {
  if (x === undefined) return '-'
  const d = unit === 'bytes' ? 1 : 2
  const scale = (v: number): string => (unit === 'bytes' ? `${(v / 2 ** 20).toFixed(d)} MiB` : v.toFixed(d))
  if (typeof x === 'number') return scale(x)
  if (x.n === 0) return '-'
  return `${scale(x.median)} (${scale(x.min)}-${scale(x.max)}, n=${x.n})`
}

mkdirSync(values.out!, { recursive: true })
const report = {
  started: started.toISOString(),
  seconds: (Date.now() - started.getTime()) / 1000,
  size,
  reps: Number(reps),
  quick,
  machine: { cpus: (await import('node:os')).cpus().length, node: process.version },
  skipped,
  checks: checks.map((c) => ({ ...c, met: met(c) })),
  results,
}
writeFileSync(join(values.out!, 'latest.json'), JSON.stringify(report, null, 2) + '\n')

const md: string[] = [
  `# Benchmarks (${started.toISOString()}, ${size} per run, ${reps} rep(s)${quick ? ', quick' : ''})`,
  '',
  'Each figure is a median with (min-max, n reps); each ratio is against an anchor measured in the same run.',
  '',
  '| path | comparison | ch | ours | anchor | anchor value | ratio | target | met |',
  '|---|---|---|---|---|---|---|---|---|',
  ...checks.map((c) => `| ${c.path} | ${c.what} | ${c.channels ?? ''} | ${fmt(c.ours, c.unit)} | ${c.anchorName} | ${fmt(c.anchor, c.unit)} | ${c.ratio === undefined ? '-' : `${c.ratio.toFixed(2)}x`} | ${c.sense === 'min' ? '>=' : '<='} ${c.target} | ${met(c) === undefined ? 'n/a' : met(c) ? 'yes' : 'NO'} |`),
  '',
  ...(skipped.length ? ['Skipped:', ...skipped.map((s) => `- ${s}`), ''] : []),
  '![throughput against channel count](throughput.svg)',
  '',
]
writeFileSync(join(values.out!, 'latest.md'), md.join('\n'))

// The chart: plain throughput of ours, QEMU and the ceiling against channel count, with the
// spread of the reps as whiskers.
const loop = results.loopback as { rows: Array<{ channels: number; spread: Record<'ours' | 'qemu' | 'ceiling', Spread> }> } | undefined
if (loop) writeFileSync(join(values.out!, 'throughput.svg'), chart(loop.rows))

function chart(rows: Array<{ channels: number; spread: Record<'ours' | 'qemu' | 'ceiling', Spread> }>): string {
  const W = 760
  const H = 400
  const pad = { l: 60, r: 180, t: 44, b: 50 }
  const series = [
    { key: 'ours', label: 'multifd (ours)', color: '#d6336c' },
    { key: 'qemu', label: 'QEMU 10 multifd', color: '#1c7ed6' },
    { key: 'ceiling', label: 'raw ceiling', color: '#495057' },
  ] as const
  const ymax = Math.max(1, ...rows.flatMap((r) => series.map((s) => (r.spread[s.key].n ? r.spread[s.key].max : 0)))) * 1.1
  const x = (i: number): number => pad.l + (i + 0.5) * ((W - pad.l - pad.r) / rows.length)
  const y = (v: number): number => H - pad.b - (v / ymax) * (H - pad.t - pad.b)
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${pad.l}" y="24" font-size="14">Loopback throughput, ${size} per run: median of ${reps} rep(s), whiskers min to max</text>`,
  ]
  for (let g = 0; g <= ymax; g += ymax > 6 ? 2 : 1) parts.push(`<line x1="${pad.l}" x2="${W - pad.r}" y1="${y(g)}" y2="${y(g)}" stroke="#e9ecef"/>`, `<text x="${pad.l - 8}" y="${y(g) + 4}" text-anchor="end">${g}</text>`)
  parts.push(`<text x="16" y="${H / 2}" transform="rotate(-90 16 ${H / 2})" text-anchor="middle">GB/s</text>`)
  rows.forEach((r, i) => parts.push(`<text x="${x(i)}" y="${H - pad.b + 18}" text-anchor="middle">${r.channels}</text>`))
  parts.push(`<text x="${(pad.l + W - pad.r) / 2}" y="${H - 12}" text-anchor="middle">channels</text>`)
  series.forEach((s, k) => {
    const pts = rows.map((r, i) => ({ i, sp: r.spread[s.key] })).filter((p) => p.sp.n > 0)
    if (pts.length) parts.push(`<polyline fill="none" stroke="${s.color}" stroke-width="2" points="${pts.map((p) => `${x(p.i)},${y(p.sp.median)}`).join(' ')}"/>`)
    for (const p of pts) parts.push(`<line x1="${x(p.i)}" x2="${x(p.i)}" y1="${y(p.sp.min)}" y2="${y(p.sp.max)}" stroke="${s.color}"/>`, `<circle cx="${x(p.i)}" cy="${y(p.sp.median)}" r="4" fill="${s.color}"/>`)
    parts.push(`<rect x="${W - pad.r + 12}" y="${pad.t + k * 22}" width="12" height="12" fill="${s.color}"/>`, `<text x="${W - pad.r + 30}" y="${pad.t + k * 22 + 11}">${s.label}${pts.length ? '' : ' (skipped)'}</text>`)
  })
  parts.push('</svg>')
  return parts.join('\n') + '\n'
}

process.stdout.write(md.join('\n'))
log(`\nwrote ${join(values.out!, 'latest.json')}, latest.md and throughput.svg in ${((Date.now() - started.getTime()) / 1000).toFixed(0)} s`)
