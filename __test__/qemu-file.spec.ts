/**
 * QEMU 10 writes a guest whose RAM (a memory-backend-file) holds known content to a file with
 * mapped-ram, with and without multifd; the block we extract equals the backing file byte for
 * byte. Runs where qemu-system-x86_64 >= 10 is installed (CI installs it).
 */
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { MultifdError, extractQemuBlock, inspectQemuFile } from '../ts/index.js'
import { sha256File as sha } from './helpers.js'

const root = fileURLToPath(new URL('..', import.meta.url))
const haveQemu = (() => {
  try {
    return /version 1\d\./.test(execFileSync('qemu-system-x86_64', ['--version']).toString())
  } catch {
    return false
  }
})()
const live = haveQemu ? test : test.skip

for (const channels of [0, 2]) {
  live(`QEMU 10 mapped-ram save ${channels ? `with multifd (${channels} channels)` : 'without multifd'}: extracted RAM equals the backing file`, (t) => {
    t.timeout(120_000)
    const dir = mkdtempSync(join(tmpdir(), 'multifd-qemufile-'))
    t.teardown(() => rmSync(dir, { recursive: true, force: true }))
    const ram = join(dir, 'ram.img')
    const save = join(dir, 'save.img')
    execFileSync('python3', [join(root, 'bench/qemu/ramgen.py'), '16', ram])
    execFileSync('python3', [join(root, 'bench/qemu/qemu_mig.py'), '--mode', 'save', '--mapped-ram', '--file', save, '--src-ram', ram, '--size-mib', '16', '--channels', String(channels)], { stdio: 'pipe', timeout: 110_000 })
    const info = inspectQemuFile(save)
    t.regex(info.machine, /^pc/)
    t.true(info.capabilities.includes('mapped-ram'))
    t.true(info.complete)
    const mem = info.blocks.find((b) => b.name === 'mem')
    t.is(mem?.length, 16 << 20)
    t.is(mem?.pagesOffset ? mem.pagesOffset % (1 << 20) : -1, 0, 'pages regions are 1 MiB aligned')
    // Zero pages are holes, not present pages: a quarter of ramgen's pages are zero.
    t.is(mem?.pagesPresent, ((16 << 20) / 4096) * 0.75)
    const out = join(dir, 'mem.raw')
    t.is(extractQemuBlock(save, 'mem', out), 16 << 20)
    t.is(sha(out), sha(ram))
    t.throws(() => extractQemuBlock(save, 'nope', out), { instanceOf: MultifdError, message: /has no RAM block "nope"/ })
    t.is(sha(out), sha(ram), 'a failed extract leaves the file at out as it was')
    t.is(t.throws(() => extractQemuBlock(save, 'mem', save), { instanceOf: MultifdError })?.code, 'ERR_MULTIFD_INVALID_ARGUMENT', 'the input is never an output')
    t.true(inspectQemuFile(save).complete)
    t.deepEqual(readdirSync(dir).sort(), ['mem.raw', 'ram.img', 'save.img'], 'no partial file is left')
  })
}

test('a file that is not a QEMU migration file is refused with a stable code', (t) => {
  const err = t.throws(() => inspectQemuFile(fileURLToPath(new URL('./fixtures/qemu-captures/README.md', import.meta.url))), { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_BAD_MAGIC')
})
