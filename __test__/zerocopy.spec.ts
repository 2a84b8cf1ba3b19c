import test from 'ava'
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { Destination, MultifdError, Source } from '../ts/index.js'
import { MiB, blockPair, sameBytes, scribble } from './helpers.js'

test('zero-copy send: every send completes, loopback copies are counted, data intact over five syncs', async (t) => {
  t.timeout(60_000)
  const { src, dst } = blockPair([['pc.ram', 48 * MiB], ['odd', 3 * 4096]])
  const dest = Destination.listen({ address: 'tcp:127.0.0.1:0', blocks: dst })
  const source = await Source.connect({ address: dest.address, blocks: src, channels: 4, zeroCopySend: true })
  await source.sendAll()
  await source.sync()
  t.true(sameBytes(src, dst))
  for (let round = 2; round <= 5; round++) {
    for (const b of src) scribble(b, 50)
    await source.sendDirty()
    await source.sync()
    t.true(sameBytes(src, dst), `round ${round}`)
    // sync() flushes: nothing is outstanding once it resolves.
    const s = source.stats()
    t.is(s.zeroCopyCompletions, s.zeroCopySends)
  }
  const s = source.stats()
  t.true(s.zeroCopySends >= (48 * MiB) / (512 * 1024), `one zero-copy send per packet at least (${s.zeroCopySends})`)
  // On loopback the kernel always copies: every completion says so.
  t.is(s.zeroCopyCopied, s.zeroCopyCompletions)
  t.is(s.zeroCopyEnobufs, 0)
  t.is(s.zeroCopyFallbacks, 0)
  const summary = await source.complete()
  await dest.done
  t.is(summary.status, 'completed')
  t.true(summary.perChannel.every((c) => c.zeroCopySends > 0), 'every channel sent with zero-copy')
})

test('zero-copy send is refused with Unix sockets and with compression', async (t) => {
  const { src } = blockPair([['m', MiB]])
  const e1 = await t.throwsAsync(Source.connect({ address: 'unix:/tmp/nowhere.sock', blocks: src, zeroCopySend: true }), { instanceOf: MultifdError })
  t.is(e1?.code, 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.regex(e1?.message ?? '', /zero-copy send needs a tcp: address[\s\S]*→ at zeroCopySend/)
  const e2 = await t.throwsAsync(Source.connect({ address: 'tcp:127.0.0.1:1', blocks: src, zeroCopySend: true, compression: 'zstd' }), { instanceOf: MultifdError })
  t.regex(e2?.message ?? '', /cannot be combined with compression/)
})

test('ENOBUFS under a small locked-memory limit without CAP_IPC_LOCK: falls back to copying, never fails', async (t) => {
  t.timeout(60_000)
  const child = fileURLToPath(new URL('./fixtures/zerocopy-child.ts', import.meta.url))
  // A 64 KiB RLIMIT_MEMLOCK and no CAP_IPC_LOCK: pinning a 512 KiB packet must fail.
  const { stdout } = await promisify(execFile)(
    'setpriv',
    ['--bounding-set=-ipc_lock', '--inh-caps=-ipc_lock', '--', 'prlimit', '--memlock=65536:65536', '--', process.execPath, '--import=tsx', child],
    { timeout: 50_000 },
  )
  const r = JSON.parse(stdout.trim().split('\n').pop()!) as { status: string; equal: boolean; warnings: string[]; capEff: string; sends: number; enobufs: number; fallbacks: number; completions: number }
  t.is((BigInt(`0x${r.capEff}`) >> 14n) & 1n, 0n, 'CAP_IPC_LOCK (bit 14) is really gone in the child')
  t.true(r.enobufs > 0, 'the kernel refused to pin pages')
  t.is(r.fallbacks, 2, 'both channels fell back to copying')
  t.deepEqual(r.warnings, ['ERR_MULTIFD_ZERO_COPY_UNAVAILABLE', 'ERR_MULTIFD_ZERO_COPY_UNAVAILABLE'])
  t.is(r.status, 'completed')
  t.true(r.equal, 'destination equals source')
  t.is(r.completions, r.sends)
})
