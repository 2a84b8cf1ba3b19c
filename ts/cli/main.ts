#!/usr/bin/env node
/**
 * The `multifd` command. Exit status: 0 done, 1 the operation failed, 2 usage error,
 * 130 / 143 / 129 interrupted by SIGINT / SIGTERM / SIGHUP (cancelled cleanly on both sides).
 */
import { MultifdError } from '../errors.js'
import { extractQemuBlock } from '../qemu.js'
import { UsageError, check, parse } from './args.js'
import { BENCH_HELP, bench } from './bench.js'
import { DEMO_HELP, demo } from './demo.js'
import { RESTORE_HELP, SNAPSHOT_HELP, restoreCommand, snapshotCommand } from './files.js'
import { bytes } from './format.js'
import { INSPECT_HELP, inspect } from './inspect.js'
import { installInterruptHandler, interruptStatus } from './interrupt.js'
import type { CommandResult } from './output.js'
import { refuseOverlap } from './outputs.js'
import { RECV_QEMU_HELP, SEND_QEMU_HELP, recvQemu, sendQemu } from './qemu-peer.js'
import { RECV_HELP, SEND_HELP, recv, send } from './transfer.js'
import { z } from 'zod'

const EXTRACT_HELP = `multifd extract QEMU_FILE --block NAME --out FILE [--in-place]

Writes one RAM block of a QEMU migration file saved with mapped-ram (\`migrate file:...\`,
with or without multifd) to a raw image file. \`multifd inspect QEMU_FILE\` lists the blocks.
FILE is written under a partial name beside it and renamed into place when complete; a
device or pipe, or any FILE with --in-place, is written where it is.`

const USAGE = `multifd: move memory between processes and hosts over parallel channels (QEMU multifd compatible)

Usage: multifd COMMAND [options]      multifd help COMMAND

Commands:
  recv ADDRESS --out FILE...        receive a migration into image files
  send ADDRESS FILE...              send image files as blocks
  recv --qemu ADDRESS --to FILE     receive a live migration from QEMU into a QEMU file
  send --qemu FILE ADDRESS          play a QEMU mapped-ram file into a QEMU destination
  snapshot FILE... --to SNAPSHOT    write a mapped-ram snapshot
  restore SNAPSHOT --out DIR        read a snapshot back into image files
  inspect FILE [--rebuild DIR]      decode a channel capture or a snapshot (ours or QEMU's)
  extract QEMU_FILE --block NAME --out FILE   a RAM block out of a QEMU file
  bench [--size 1G] [--channels 1,2,4]        loopback self-benchmark
  demo [--size 1G] [--channels 4]             a live migration on loopback, verified

Common: --json (machine-readable output only), -h/--help.
Exit status: 0 done, 1 failed, 2 usage error, 130/143/129 interrupted (SIGINT/SIGTERM/SIGHUP).`

const HELP: Record<string, string> = { recv: `${RECV_HELP}\n\n${RECV_QEMU_HELP}`, send: `${SEND_HELP}\n\n${SEND_QEMU_HELP}`, snapshot: SNAPSHOT_HELP, restore: RESTORE_HELP, inspect: INSPECT_HELP, extract: EXTRACT_HELP, bench: BENCH_HELP, demo: DEMO_HELP }

function extract(argv: string[]): number {
  const { values, positionals } = parse(argv, { block: { type: 'string' }, out: { type: 'string' }, 'in-place': { type: 'boolean' } })
  const o = check(z.object({ block: z.string({ error: 'extract needs --block NAME' }).min(1), out: z.string({ error: 'extract needs --out FILE' }).min(1), 'in-place': z.boolean().default(false) }), values)
  if (positionals.length !== 1) throw new UsageError('extract takes exactly one QEMU_FILE')
  refuseOverlap(positionals, [o.out])
  const n = extractQemuBlock(positionals[0]!, o.block, o.out, { inPlace: o['in-place'] })
  if (values.json === true) process.stdout.write(JSON.stringify({ status: 'completed', block: o.block, out: o.out, bytes: n }) + '\n')
  else process.stdout.write(`extracted ${JSON.stringify(o.block)}: ${bytes(n)} -> ${o.out}\n`)
  return 0
}

const status = (r: CommandResult): number => interruptStatus() ?? (r.status === 'completed' ? 0 : 1)
/** `--qemu` selects stock QEMU as the peer (ts/cli/qemu-peer.ts). */
const isQemu = (argv: string[]): boolean => argv.some((a) => a === '--qemu' || a.startsWith('--qemu='))

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  if (!command || command === '-h' || command === '--help') {
    process.stdout.write(USAGE + '\n')
    return command ? 0 : 2
  }
  if (command === 'help') {
    process.stdout.write((HELP[rest[0] ?? ''] ?? USAGE) + '\n')
    return 0
  }
  if (rest.includes('-h') || rest.includes('--help')) {
    process.stdout.write((HELP[command] ?? USAGE) + '\n')
    return HELP[command] ? 0 : 2
  }
  installInterruptHandler()
  switch (command) {
    case 'send':
      return status(await (isQemu(rest) ? sendQemu(rest) : send(rest)))
    case 'recv':
      return status(await (isQemu(rest) ? recvQemu(rest) : recv(rest)))
    case 'snapshot':
      return status(await snapshotCommand(rest))
    case 'restore':
      return status(await restoreCommand(rest))
    case 'inspect':
      return inspect(rest)
    case 'extract':
      return extract(rest)
    case 'bench':
      return status(await bench(rest))
    case 'demo':
      return status(await demo(rest))
    default:
      throw new UsageError(`unknown command ${JSON.stringify(command)}`)
  }
}

// `multifd inspect --json | head`: a closed stdout ends the command quietly.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0)
  throw e
})

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code
  },
  (e: unknown) => {
    const hint = `Run 'multifd help ${process.argv[2] ?? ''}' for usage.`
    if (e instanceof UsageError) {
      process.stderr.write(`multifd: ${e.message}\n${hint}\n`)
      process.exitCode = 2
    } else if (e instanceof MultifdError && e.code === 'ERR_MULTIFD_INVALID_ARGUMENT' && !e.remote) {
      // Options the library refuses (docs/LIMITS.md) are usage errors too; one the peer
      // reported is a failure of the migration.
      process.stderr.write(`multifd: ${e.code}: ${e.message}\n${hint}\n`)
      process.exitCode = 2
    } else if (e instanceof MultifdError) {
      process.stderr.write(`multifd: ${e.code}: ${e.message}\n`)
      process.exitCode = 1
    } else {
      process.stderr.write(`multifd: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`)
      process.exitCode = 1
    }
  },
)
