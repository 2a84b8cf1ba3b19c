/**
 * The demo's application: a worker thread that keeps writing random bytes into random pages
 * of a shared block (a copy into its view, then markDirty), paced to a set rate.
 * workerData: { token, pagesPerSecond }. Message 'pause' stops it and is answered with
 * { type: 'paused', writes } once no write is in progress.
 */
import { randomFillSync, randomInt } from 'node:crypto'
import { parentPort, workerData } from 'node:worker_threads'
import { RamBlock } from '../block.js'

const { token, pagesPerSecond } = workerData as { token: number; pagesPerSecond: number }
const block = RamBlock.fromShared(token)
const port = parentPort!
const pages = block.size / block.pageSize
const started = performance.now()
const data = Buffer.alloc(64)
// Views made once (1 GiB each: one typed array cannot cover more than 4 GiB); a write is a
// copy plus one markDirty call, and never straddles two views (it stays inside its page).
const CHUNK = 2 ** 30
const views = Array.from({ length: Math.ceil(block.size / CHUNK) }, (_, i) => block.view(i * CHUNK, Math.min(CHUNK, block.size - i * CHUNK)))
let writes = 0
/** Writes the schedule has accounted for, done or skipped. */
let scheduled = 0
let timer: NodeJS.Timeout | undefined

function tick(): void {
  const due = Math.floor(((performance.now() - started) / 1000) * pagesPerSecond)
  // A starved thread does not replay missed writes in a burst (an application would not).
  scheduled = Math.max(scheduled, due - Math.ceil(pagesPerSecond / 200))
  for (; scheduled < due; scheduled++, writes++) {
    const at = randomInt(pages) * block.pageSize + randomInt(block.pageSize - data.length)
    views[Math.floor(at / CHUNK)]!.set(randomFillSync(data), at % CHUNK)
    block.markDirty(at, data.length)
  }
  timer = setTimeout(tick, 5)
}

port.on('message', (m: string) => {
  if (m === 'pause') {
    clearTimeout(timer)
    port.postMessage({ type: 'paused', writes })
    port.close()
  }
})
tick()
port.postMessage({ type: 'ready' })
