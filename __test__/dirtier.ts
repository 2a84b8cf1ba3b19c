/** A worker thread writing random pages of blocks at a set rate, for live migrations under load. */
import { Worker } from 'node:worker_threads'
import type { RamBlock } from '../ts/index.js'
import { until } from './helpers.js'

const DIRTIER = new URL('./fixtures/dirtier.ts', import.meta.url).href
const TSX_API = import.meta.resolve('tsx/esm/api')

/** A worker thread (fixtures/dirtier.ts) writing random pages of `blocks` at a set rate. */
export interface Dirtier {
  /** Stops the writes; resolves once the worker confirmed (no write after that). */
  pause(): Promise<number>
  stop(): Promise<void>
}

export async function startDirtier(blocks: RamBlock[], pagesPerSecond: number): Promise<Dirtier> {
  // Workers do not get tsx's loader from --import in Node 20: register it first, then load.
  const worker = new Worker(`import(${JSON.stringify(TSX_API)}).then((api) => { api.register(); return import(${JSON.stringify(DIRTIER)}) })`, {
    eval: true,
    workerData: { tokens: blocks.map((b) => b.share()), pagesPerSecond },
  })
  const next = (type: string): Promise<Record<string, unknown>> =>
    until(
      new Promise((resolve, reject) => {
        const onMessage = (m: Record<string, unknown>): void => {
          if (m.type !== type) return
          worker.off('message', onMessage)
          resolve(m)
        }
        worker.on('message', onMessage)
        worker.once('error', reject)
      }),
      10_000,
      `dirtier ${type}`,
    )
  await next('ready')
  const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()))
  return {
    pause: async () => {
      const answer = next('paused')
      worker.postMessage('pause')
      return (await answer).writes as number
    },
    stop: async () => {
      worker.postMessage('stop')
      await until(exited, 10_000, 'dirtier exit')
      blocks.forEach((b) => b.unshare())
    },
  }
}
