/**
 * Proof against the real thing: multifd channel streams that QEMU 10 put on the wire
 * (recorded by bench/qemu/capture.py through a proxy) decode with our decoder into exactly the
 * guest RAM QEMU migrated. Committed fixtures always run; with qemu-system-x86_64 installed
 * (CI installs it) fresh captures are made and checked too.
 */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { rebuildFromCaptures } from '../ts/index.js'

interface Manifest {
  compression: string
  channels: number
  sizeBytes: number
  ramSha256: string
  ramBlock: string
  normalPages?: number
  ramBlocks: Array<{ name: string; usedBytes: number }>
}

const fixtures = fileURLToPath(new URL('./fixtures/qemu-captures/', import.meta.url))
const root = fileURLToPath(new URL('..', import.meta.url))
const sha = (b: Uint8Array): string => createHash('sha256').update(b).digest('hex')

function check(t: import('ava').ExecutionContext, dir: string): void {
  const m = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as Manifest
  const files = readdirSync(dir).filter((f) => /^channel-\d+\.bin$/.test(f)).sort()
  t.is(files.length, m.channels)
  const r = rebuildFromCaptures(files.map((f) => readFileSync(join(dir, f))))
  t.deepEqual(r.channels.map((c) => c.channelId).sort(), [...Array(m.channels).keys()])
  t.true(r.channels.every((c) => c.compression === m.compression || c.normalPages === 0), 'the method QEMU used is recognised')
  t.true(r.channels.every((c) => c.syncs >= 1), 'QEMU sends SYNC packets on every channel')
  const mem = r.blocks.find((b) => b.name === m.ramBlock)
  t.truthy(mem, `block ${m.ramBlock} is in the streams`)
  t.is(mem!.data.length, m.sizeBytes)
  t.is(sha(mem!.data), m.ramSha256, 'guest RAM rebuilt byte for byte')
  // Every block QEMU sent came through with (at most) its used length.
  for (const b of m.ramBlocks) {
    const got = r.blocks.find((x) => x.name === b.name)
    t.truthy(got, `block ${b.name}`)
    t.true(got!.data.length <= b.usedBytes, `${b.name}: ${got!.data.length} <= ${b.usedBytes}`)
  }
}

for (const method of ['none', 'zlib', 'zstd']) {
  test(`QEMU 10 capture (${method}, zero pages on multifd threads) rebuilds the guest RAM exactly`, (t) => {
    check(t, join(fixtures, method))
  })
}

const haveQemu = (() => {
  try {
    return /version 1\d\./.test(execFileSync('qemu-system-x86_64', ['--version']).toString())
  } catch {
    return false
  }
})()

for (const method of ['none', 'zlib', 'zstd']) {
  const live = haveQemu ? test : test.skip
  live(`live QEMU 10 migration (${method}, 3 channels) captured now decodes to its RAM`, (t) => {
    t.timeout(120_000)
    const out = mkdtempSync(join(tmpdir(), 'multifd-capture-'))
    try {
      execFileSync('python3', [join(root, 'bench/qemu/capture.py'), '--compression', method, '--channels', '3', '--size-mib', '4', '--keep-main', 'no', '--outdir', out], { stdio: 'pipe', timeout: 110_000 })
      check(t, out)
    } finally {
      rmSync(out, { recursive: true, force: true })
    }
  })
}
