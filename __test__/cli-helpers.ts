/** Running the `multifd` command in tests: real processes, their output and exit status. */
import type { ExecutionContext } from 'ava'
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { until } from './helpers.js'

export const CLI = fileURLToPath(new URL('../scripts/multifd', import.meta.url))
export const FIXTURES = fileURLToPath(new URL('./fixtures/qemu-captures/', import.meta.url))

export interface Run {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

export function cli(args: string[], opts: { onStderr?: (s: string) => void; timeoutMs?: number } = {}): { done: Promise<Run>; kill: (s: NodeJS.Signals) => void } {
  const child = spawn(CLI, args, { stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString()
    opts.onStderr?.(stderr)
  })
  const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000)
  const done = new Promise<Run>((resolve) => child.on('close', (code, signal) => {
    clearTimeout(timer)
    resolve({ code, signal, stdout, stderr })
  }))
  return { done, kill: (s) => child.kill(s) }
}

export { sha256File as sha } from './helpers.js'
export const lastJson = (s: string): Record<string, unknown> => JSON.parse(s.trim().split('\n').pop()!) as Record<string, unknown>

export function workdir(t: ExecutionContext): string {
  const d = mkdtempSync(join(tmpdir(), 'multifd-cli-'))
  t.teardown(() => rmSync(d, { recursive: true, force: true }))
  return d
}

/** Starts `multifd recv` on a free port; resolves with its address once it listens. */
export async function receiver(args: string[]): Promise<{ address: string; done: Promise<Run>; kill: (s: NodeJS.Signals) => void }> {
  let found: (a: string) => void
  const listening = new Promise<string>((r) => (found = r))
  const r = cli(['recv', 'tcp:127.0.0.1:0', ...args], { onStderr: (s) => { const m = /listening on (\S+)/.exec(s); if (m) found(m[1]!) } })
  const address = await until(Promise.race([listening, r.done.then((x) => Promise.reject(new Error(`recv exited: ${x.stderr}`)))]), 20_000, 'recv listening')
  return { address, ...r }
}
