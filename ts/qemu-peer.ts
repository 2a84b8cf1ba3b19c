/**
 * Stock QEMU 10 as the peer. `QemuReceiver` is a migration destination for a QEMU source
 * (`migrate tcp:HOST:PORT`, multifd on) that writes a mapped-ram file QEMU restores with
 * `migrate-incoming file:` (and/or raw block images); `QemuSender` plays such a file into a
 * QEMU destination started with `-incoming` and multifd. Each runs on its own native thread.
 */
import { z } from 'zod'
import { binding, type NativeEvent } from './native.js'
import { MultifdError, native, nativeError } from './errors.js'
import { Address, CompressionMethod, parseOptions } from './options.js'
import type { QemuPeerProgress, QemuRecvSummary, QemuSendSummary } from './native/binding.cjs'

export type { QemuPeerBlock, QemuPeerChannel, QemuPeerProgress, QemuRecvSummary, QemuSendSummary } from './native/binding.cjs'

/** Resolves with `result()` when the native run reports `done`, rejects with its error. */
function settle<T>(job: { finish(): void; result(): T | null }, start: (onEvent: (e: NativeEvent) => void) => void): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    native(() =>
      start((ev) => {
        if (ev.kind !== 'done' && ev.kind !== 'rejected') return
        job.finish()
        if (ev.kind === 'rejected') return reject(nativeError(ev.error))
        const r = job.result()
        if (r === null) return reject(new MultifdError('ERR_MULTIFD_STATE', 'the run ended without a result'))
        resolve(r)
      }),
    )
  })
}

const ReceiveOptions = z
  .strictObject({
    /** `tcp:HOST:PORT` (port 0 picks a free one: see `address`) or `unix:PATH`. */
    address: Address,
    /** The mapped-ram file to write; it appears only once complete (written beside it first). */
    to: z.string().min(1).optional(),
    /** A directory for one raw image per RAM block (names as `multifd restore --out`). */
    outDir: z.string().min(1).optional(),
    /** The source's multifd-channels; by default the channels connected at its first flush. */
    channels: z.int().min(1).max(255).optional(),
    /** How long a connection may stay silent, or a sync wait last (ERR_MULTIFD_TIMEOUT). */
    peerTimeoutMs: z.int().min(100).max(3_600_000).default(60_000),
  })
  .refine((o) => o.to !== undefined || o.outDir !== undefined, { error: 'give `to` (a QEMU file) or `outDir` (raw images), or both' })
export type QemuReceiveOptions = z.input<typeof ReceiveOptions>

export class QemuReceiver {
  readonly #native: InstanceType<typeof binding.NativeQemuReceiver>
  /** The address QEMU should `migrate` to (`tcp:HOST:PORT`; the real port when 0 was asked). */
  readonly address: string
  /** Settles when the migration is written (or failed: nothing is left at `to`). */
  readonly done: Promise<QemuRecvSummary>

  private constructor(o: z.output<typeof ReceiveOptions>) {
    this.#native = native(() => binding.NativeQemuReceiver.bind(o.address))
    this.address = this.#native.address
    const n = this.#native
    this.done = settle(n, (cb) => n.start(o.to, o.outDir, o.channels, o.peerTimeoutMs, cb))
  }

  /** Listens and waits for one QEMU source. */
  static listen(options: QemuReceiveOptions): QemuReceiver {
    return new QemuReceiver(parseOptions(ReceiveOptions, options, 'QEMU receive options'))
  }

  progress(): QemuPeerProgress {
    return this.#native.progress()
  }

  /** Stops the receive: `done` rejects with ERR_MULTIFD_CANCELLED. */
  cancel(): void {
    this.#native.cancel()
  }
}

const SendOptions = z.strictObject({
  /** A QEMU mapped-ram migration file (QEMU's own save, or one `QemuReceiver` wrote). */
  file: z.string().min(1),
  /** Where the QEMU destination listens (`-incoming tcp:...` or `migrate-incoming`). */
  address: Address,
  /** The destination's multifd-channels (QEMU's default is 2). */
  channels: z.int().min(1).max(255).default(2),
  /** The destination's multifd-compression. */
  compression: CompressionMethod.default('none'),
  level: z.int().min(1).max(20).optional(),
  connectTimeoutMs: z.int().min(1).max(3_600_000).default(10_000),
  peerTimeoutMs: z.int().min(100).max(3_600_000).default(60_000),
})
export type QemuSendOptions = z.input<typeof SendOptions>

export class QemuSender {
  readonly #native = new binding.NativeQemuSender()
  /** Settles when every byte is sent (the destination then completes on its own). */
  readonly done: Promise<QemuSendSummary>

  private constructor(o: z.output<typeof SendOptions>) {
    const n = this.#native
    this.done = settle(n, (cb) => n.start(o.file, o.address, o.channels, o.compression, o.level, o.connectTimeoutMs, o.peerTimeoutMs, cb))
  }

  static start(options: QemuSendOptions): QemuSender {
    return new QemuSender(parseOptions(SendOptions, options, 'QEMU send options'))
  }

  progress(): QemuPeerProgress {
    return this.#native.progress()
  }

  cancel(): void {
    this.#native.cancel()
  }
}
