/**
 * Live migration: achieved downtime against the downtime limit at three dirty rates, in one
 * run. The source block is dirtied by a worker thread at a set rate (random pages, one byte
 * each, marked with `markDirty`) while `migrate({ live: true })` runs its rounds; the
 * destination runs in its own process with preallocated memory. Rates are given as fractions
 * of `--max-bandwidth`: below it the loop converges, above it the no-convergence policy
 * (`switchover` here) acts after `--max-rounds`. Every run is checked byte for byte.
 *
 *   bench/live [--size 256M] [--channels 2] [--max-bandwidth 256M] [--limit 300]
 *              [--rates 0.1,0.5,1.5] [--max-rounds 8] [--json]
 *
 * `--max-bandwidth` is bytes per second (suffixes K, M, G are powers of 1024).
 */
import { createHash } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { Worker, isMainThread, parentPort, workerData } from 'node:worker_threads'
import { Destination, RamBlock, migrate, type LiveSummary } from '../ts/index.js'
import { parseSize, startJson } from './lib/run.js'

const self = fileURLToPath(import.meta.url)
const say = (m: object): void => void process.stdout.write(JSON.stringify(m) + '\n')

/** sha256 of a block, read in 1 GiB views (one view cannot exceed V8's typed-array limit). */
function hashBlock(b: RamBlock): string {
  const h = createHash('sha256')
  for (let off = 0; off < b.size; off += 2 ** 30) h.update(b.view(off, Math.min(2 ** 30, b.size - off)))
  return h.digest('hex')
}

if (!isMainThread) {
  // The writer: dirties random pages at `pagesPerSecond`, pacing itself every millisecond.
  const { token, pagesPerSecond } = workerData as { token: number; pagesPerSecond: number }
  const block = RamBlock.fromShared(token)
  // 1 GiB views: one typed array cannot cover more than 4 GiB.
  const views = Array.from({ length: Math.ceil(block.size / 2 ** 30) }, (_, i) => block.view(i * 2 ** 30, Math.min(2 ** 30, block.size - i * 2 ** 30)))
  const pages = block.size / block.pageSize
  const started = performance.now()
  let writes = 0
  let timer: NodeJS.Timeout | undefined
  const tick = (): void => {
    const due = Math.floor(((performance.now() - started) / 1000) * pagesPerSecond)
    for (; writes < due; writes++) {
      const off = Math.floor(Math.random() * pages) * block.pageSize + Math.floor(Math.random() * block.pageSize)
      const view = views[Math.floor(off / 2 ** 30)]!
      const at = off % 2 ** 30
      view[at] = (view[at]! + 1) & 0xff
      block.markDirty(off, 1)
    }
    timer = setTimeout(tick, 1)
  }
  parentPort!.on('message', (m: string) => {
    if (m === 'pause') {
      clearTimeout(timer)
      parentPort!.postMessage({ type: 'paused', writes, seconds: (performance.now() - started) / 1000 })
    } else {
      clearTimeout(timer)
      parentPort!.close()
    }
  })
  tick()
  parentPort!.postMessage({ type: 'ready' })
} else if (process.argv[2] === 'dest') {
  // The destination, in its own process: preallocated memory, prints its sha256 when done.
  const block = RamBlock.allocate({ name: 'bench', size: Number(process.argv[3]), prefault: true })
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: [block] })
  say({ type: 'listening', address: dest.address })
  const s = await dest.done
  say({ type: 'done', bytes: s.bytes, rounds: dest.round, sha256: hashBlock(block) })
} else {
  await main()
}

interface Row {
  fraction: number
  /** Dirty rate asked for and achieved by the writer, bytes of pages per second. */
  targetRate: number
  achievedRate: number
  summary: LiveSummary
  ok: boolean
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      size: { type: 'string', default: '256M' },
      channels: { type: 'string', default: '2' },
      'max-bandwidth': { type: 'string', default: '256M' },
      limit: { type: 'string', default: '300' },
      rates: { type: 'string', default: '0.1,0.5,1.5' },
      'max-rounds': { type: 'string', default: '8' },
      json: { type: 'boolean', default: false },
    },
  })
  const size = parseSize(values.size!)
  const channels = Number(values.channels)
  const maxBandwidth = parseSize(values['max-bandwidth']!)
  const limit = Number(values.limit)
  const maxRounds = Number(values['max-rounds'])
  const fractions = values.rates!.split(',').map(Number)
  const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')
  const MB = 1e6

  const block = RamBlock.allocate({ name: 'bench', size, prefault: true })
  // Varied, mostly non-zero pages (a random fill of this size would take longer than a run).
  for (let base = 0; base < size; base += 2 ** 30) {
    const view = block.view(base, Math.min(2 ** 30, size - base))
    for (let off = 0; off < view.length; off += block.pageSize) view.fill(((base + off) / block.pageSize) % 251 + 1, off, off + block.pageSize)
  }
  const token = block.share()
  const tsx = import.meta.resolve('tsx/esm/api')
  const writerPath = import.meta.url

  log(`live migration on loopback TCP: ${(size / 2 ** 20).toFixed(0)} MiB, ${channels} channel(s), max-bandwidth ${(maxBandwidth / MB).toFixed(0)} MB/s, downtime limit ${limit} ms, max ${maxRounds} rounds, onNoConvergence 'switchover'`)
  const rows: Row[] = []
  for (const fraction of fractions) {
    const targetRate = fraction * maxBandwidth
    const dest = startJson(process.execPath, ['--import=tsx', self, 'dest', String(size)], 300_000, 'listening')
    const { address } = (await dest.first) as { address: string }
    // Workers do not inherit tsx's loader from --import in Node 20: register it, then load.
    const worker = new Worker(`import(${JSON.stringify(tsx)}).then((api) => { api.register(); return import(${JSON.stringify(writerPath)}) })`, {
      eval: true,
      workerData: { token, pagesPerSecond: targetRate / block.pageSize },
    })
    const next = (type: string): Promise<Record<string, unknown>> =>
      new Promise((resolve, reject) => {
        const on = (m: Record<string, unknown>): void => {
          if (m.type === type) {
            worker.off('message', on)
            resolve(m)
          }
        }
        worker.on('message', on).once('error', reject)
      })
    await next('ready')
    let paused: Record<string, unknown> | undefined
    const summary = await migrate({
      address,
      blocks: [block],
      channels,
      live: true,
      maxBandwidth,
      downtimeLimitMs: limit,
      maxRounds,
      onNoConvergence: 'switchover',
      onSwitchover: async () => {
        const answer = next('paused')
        worker.postMessage('pause')
        paused = await answer
      },
    })
    worker.postMessage('stop')
    const d = (await dest.all).find((l) => l.type === 'done')!
    const achievedRate = ((paused!.writes as number) / (paused!.seconds as number)) * block.pageSize
    const ok = d.sha256 === hashBlock(block)
    rows.push({ fraction, targetRate, achievedRate, summary, ok })
    const it = summary.rounds.filter((r) => !r.final)
    log(
      `dirty ${(achievedRate / MB).toFixed(1)} MB/s (${fraction}x): ${it.length} round(s) ` +
        it.map((r) => `[${r.pages}p ${r.durationMs.toFixed(0)}ms ${(r.bandwidth / MB).toFixed(0)}MB/s exp ${r.expectedDowntimeMs.toFixed(0)}ms]`).join(' ') +
        ` -> ${summary.switchoverReason}, downtime ${summary.downtimeMs.toFixed(1)} ms${ok ? '' : '  MISMATCH'}`,
    )
  }
  block.unshare()

  if (values.json) {
    say({
      size,
      channels,
      maxBandwidth,
      downtimeLimitMs: limit,
      maxRounds,
      runs: rows.map((r) => ({
        fraction: r.fraction,
        targetDirtyBytesPerSecond: r.targetRate,
        dirtyBytesPerSecond: r.achievedRate,
        rounds: r.summary.rounds,
        converged: r.summary.converged,
        expectedDowntimeMs: r.summary.expectedDowntimeMs,
        downtimeMs: r.summary.downtimeMs,
        seconds: r.summary.seconds,
        ok: r.ok,
      })),
    })
  } else {
    const pad = (s: string, n: number): string => s.padStart(n)
    log('')
    log(`${'dirty rate'.padEnd(22)}${pad('rounds', 7)}${pad('converged', 11)}${pad('expected ms', 13)}${pad('downtime ms', 13)}${pad('limit ms', 10)}${pad('vs limit', 10)}${pad('total s', 9)}  check`)
    for (const r of rows) {
      const s = r.summary
      log(
        `${`${(r.achievedRate / MB).toFixed(1)} MB/s (${r.fraction}x bw)`.padEnd(22)}${pad(String(s.rounds.filter((x) => !x.final).length), 7)}${pad(s.converged ? 'yes' : 'no', 11)}` +
          `${pad(s.expectedDowntimeMs.toFixed(1), 13)}${pad(s.downtimeMs.toFixed(1), 13)}${pad(String(limit), 10)}${pad(`${(s.downtimeMs / limit).toFixed(2)}x`, 10)}${pad(s.seconds.toFixed(1), 9)}  ${r.ok ? 'ok' : 'MISMATCH'}`,
      )
    }
  }
  if (rows.some((r) => !r.ok)) process.exitCode = 1
}
