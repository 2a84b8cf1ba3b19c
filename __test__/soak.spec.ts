/** The soak's short form (scripts/soak.ts): 30 migrations with random options and faults. */
import test from 'ava'
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'

test('soak, short form: every completed migration identical, every failure reported, RSS and fds flat', async (t) => {
  t.timeout(180_000)
  const script = fileURLToPath(new URL('../scripts/soak.ts', import.meta.url))
  const { stdout } = await promisify(execFile)(process.execPath, ['--expose-gc', '--import=tsx', script, '--count', '30', '--seed', '20261126', '--json'], { timeout: 170_000 }).catch((e: { stdout?: string }) => ({ stdout: e.stdout ?? '' }))
  const r = JSON.parse(stdout.trim().split('\n').pop()!) as { count: number; completed: number; wrong: string[]; injected: number; flat: boolean; fds: { start: number; end: number }; rss: { growth: number } }
  t.deepEqual(r.wrong, [])
  t.is(r.count, 30)
  t.true(r.injected > 0, 'the seed injects faults')
  t.true(r.completed >= 20)
  t.true(r.flat, `fds ${r.fds.start} -> ${r.fds.end}, RSS growth ${r.rss.growth}`)
})
