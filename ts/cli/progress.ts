/**
 * Progress on stderr: on a terminal, a few lines redrawn in place (bytes, rate, ETA, round,
 * per-channel activity); otherwise one plain line every few seconds. Silent with --json.
 */
import { clearScreenDown, cursorTo, moveCursor } from 'node:readline'
import { bytes, duration, rate } from './format.js'

export interface ProgressSample {
  done: number
  total?: number
  /** Bytes per channel, for the activity line. */
  channels?: number[]
  round?: number
  label?: string
}

export class Progress {
  readonly #out = process.stderr
  readonly #tty: boolean
  readonly #enabled: boolean
  readonly #started = performance.now()
  #lines = 0
  #lastPlain = 0
  #timer: NodeJS.Timeout | undefined

  constructor(enabled: boolean, private readonly sample: () => ProgressSample) {
    this.#enabled = enabled
    this.#tty = this.#out.isTTY === true
  }

  start(): this {
    if (this.#enabled) this.#timer = setInterval(() => this.draw(), this.#tty ? 100 : 1000)
    return this
  }

  draw(): void {
    const s = this.sample()
    const elapsed = (performance.now() - this.#started) / 1000
    const r = elapsed > 0 ? s.done / elapsed : 0
    const eta = s.total && r > 0 ? duration((s.total - s.done) / r) : '?'
    const pct = s.total ? ` (${((100 * s.done) / s.total).toFixed(1)}%)` : ''
    const head = `${s.label ?? 'moving'}${s.round !== undefined ? ` round ${s.round}` : ''}: ${bytes(s.done)}${s.total ? ` of ${bytes(s.total)}` : ''}${pct}  ${rate(r)}  ETA ${eta}`
    if (!this.#tty) {
      if (performance.now() - this.#lastPlain >= 5000) {
        this.#lastPlain = performance.now()
        this.#out.write(head + '\n')
      }
      return
    }
    const lines = [head]
    if (s.channels && s.channels.length > 0) {
      const max = Math.max(1, ...s.channels)
      lines.push(...s.channels.slice(0, 16).map((c, i) => `  ch ${String(i).padStart(2)} ${'█'.repeat(Math.round((20 * c) / max)).padEnd(20)} ${bytes(c)}`))
      if (s.channels.length > 16) lines.push(`  ... ${s.channels.length - 16} more channels`)
    }
    this.#clear()
    this.#out.write(lines.join('\n') + '\n')
    this.#lines = lines.length
  }

  #clear(): void {
    if (this.#lines > 0) {
      moveCursor(this.#out, 0, -this.#lines)
      cursorTo(this.#out, 0)
      clearScreenDown(this.#out)
    }
    this.#lines = 0
  }

  stop(): void {
    if (this.#timer) clearInterval(this.#timer)
    this.#timer = undefined
    if (this.#enabled && this.#tty) this.#clear()
  }
}
