/** Ctrl-C: the first one cancels the running operation cleanly (exit 130); a second one exits now. */
let interrupted = false
let cancel: (() => void | Promise<void>) | undefined

export function onInterrupt(fn: () => void | Promise<void>): void {
  cancel = fn
}

export function wasInterrupted(): boolean {
  return interrupted
}

export function installInterruptHandler(): void {
  process.on('SIGINT', () => {
    if (interrupted) process.exit(130)
    interrupted = true
    process.stderr.write('\ninterrupted: cancelling (Ctrl-C again to exit at once)\n')
    void cancel?.()
  })
}
