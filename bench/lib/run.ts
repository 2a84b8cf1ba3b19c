import { spawn } from 'node:child_process'
import { createInterface } from 'node:readline'

export type Line = Record<string, unknown>

/** Runs a command, returns its stdout JSON lines; rejects on a non-zero exit or timeout. */
export function runJson(cmd: string, args: string[], timeoutMs: number, onLine?: (l: Line) => void): Promise<Line[]> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] })
    const lines: Line[] = []
    let stderr = ''
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
    createInterface({ input: child.stdout }).on('line', (l) => {
      if (!l.startsWith('{')) return
      const m = JSON.parse(l) as Line
      lines.push(m)
      onLine?.(m)
    })
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs)
    child.on('exit', (code, signal) => {
      clearTimeout(timer)
      if (code === 0) resolve(lines)
      else reject(new Error(`${cmd} ${args.join(' ')} exited with ${code ?? signal}: ${stderr.slice(-2000)}`))
    })
  })
}

/** Like runJson, but resolves with the child's first line of `type` while it keeps running. */
export function startJson(cmd: string, args: string[], timeoutMs: number, type: string): { first: Promise<Line>; all: Promise<Line[]> } {
  let found: (l: Line) => void
  const first = new Promise<Line>((r) => (found = r))
  const all = runJson(cmd, args, timeoutMs, (l) => {
    if (l.type === type) found(l)
  })
  return { first: Promise.race([first, all.then(() => Promise.reject(new Error(`${cmd} ended before ${type}`)))]), all }
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  return s.length === 0 ? NaN : s[Math.floor(s.length / 2)]!
}

/** A figure with its reps: the median and the spread, so noise is visible next to it. */
export interface Spread {
  median: number
  min: number
  max: number
  n: number
}

export function spread(xs: number[]): Spread {
  return { median: median(xs), min: xs.length ? Math.min(...xs) : NaN, max: xs.length ? Math.max(...xs) : NaN, n: xs.length }
}

export function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?$/i.exec(s.trim())
  if (!m) throw new Error(`bad size ${s}`)
  const mult = { '': 1, K: 1 << 10, M: 1 << 20, G: 1 << 30, T: 2 ** 40 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']
  return Math.round(Number(m[1]) * mult)
}
