/**
 * SIGINT (Ctrl-C), SIGTERM and SIGHUP: the first one cancels the running operation cleanly
 * (its summary is printed, partial outputs removed) and the command exits 128 + the signal's
 * number: 130, 143, 129. A second signal exits at once (partial outputs are still removed).
 */
const SIGNALS = { SIGINT: 130, SIGHUP: 129, SIGTERM: 143 } as const
type Handled = keyof typeof SIGNALS

let received: Handled | undefined
let cancel: (() => void | Promise<void>) | undefined

/** What cancels the running operation; without one, a signal exits at once. */
export function onInterrupt(fn: () => void | Promise<void>): void {
  cancel = fn
}

export function wasInterrupted(): boolean {
  return received !== undefined
}

/** The exit status for the signal received, if one was. */
export function interruptStatus(): number | undefined {
  return received === undefined ? undefined : SIGNALS[received]
}

export function installInterruptHandler(): void {
  for (const signal of Object.keys(SIGNALS) as Handled[]) {
    process.on(signal, () => {
      if (received !== undefined) process.exit(SIGNALS[received])
      received = signal
      if (!cancel) process.exit(SIGNALS[signal])
      process.stderr.write(`\ninterrupted (${signal}): cancelling (a second signal exits at once)\n`)
      void cancel()
    })
  }
}
