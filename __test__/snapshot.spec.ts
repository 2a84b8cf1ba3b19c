import test from 'ava'
import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, openSync, closeSync, writeSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { MultifdError, RamBlock, inspectSnapshot, restore, snapshot } from '../ts/index.js'
import { MiB, blockPair, rejectionCode, sameBytes, scribble, sha256, sha256File } from './helpers.js'

const ODD: Array<[string, number]> = [
  ['pc.ram', 16 * MiB + 5 * 4096],
  ['vga.vram', 3 * 4096],
]

function tempDir(t: import('ava').ExecutionContext): string {
  const dir = mkdtempSync(join(tmpdir(), 'multifd-snap-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

for (const channels of [1, 2, 4]) {
  test(`snapshot and restore with ${channels} channel(s): byte for byte, sparse, complete`, async (t) => {
    t.timeout(60_000)
    const dir = tempDir(t)
    const { src } = blockPair(ODD)
    const file = join(dir, 'vm.snap')
    const s = await snapshot(src, file, { channels })
    t.is(s.status, 'completed')
    t.true(s.file.complete)
    t.is(s.file.generation, 1)
    t.is(s.pages.normal + s.pages.zero, ODD.reduce((a, [, size]) => a + size / 4096, 0))
    t.true(s.pages.zero > 0, 'every fifth page is zero and not written')
    t.deepEqual(inspectSnapshot(file), s.file)
    const st = statSync(file)
    t.true(st.blocks * 512 < st.size, 'zero pages are holes')
    const r = await restore(file, { channels })
    t.deepEqual(r.blocks.map((b) => b.name), ODD.map(([n]) => n))
    t.true(sameBytes(src, r.blocks))
  })
}

test('incremental snapshot writes only dirty pages; restore into mapped files', async (t) => {
  t.timeout(60_000)
  const dir = tempDir(t)
  const { src } = blockPair(ODD)
  const file = join(dir, 'vm.snap')
  await snapshot(src, file)
  scribble(src[0]!, 25)
  src[0]!.view(0, 4096).fill(0) // a data page becomes zero
  src[0]!.markDirty(0, 4096)
  const dirty = src[0]!.dirtyPages
  const s = await snapshot(src, file, { incremental: true, channels: 3 })
  t.is(s.pages.normal + s.pages.zero, dirty, 'only the dirty pages were looked at')
  t.is(s.file.generation, 2)
  const r = await restore(file, { blocks: (table) => table.map((b, i) => RamBlock.mapFile({ name: b.name, path: join(dir, `out-${i}.img`), size: b.length })) })
  t.true(sameBytes(src, r.blocks))
  t.is(sha256File(join(dir, 'out-0.img')), sha256(src[0]!))
})

test('restore refuses an incomplete snapshot and one whose blocks do not match', async (t) => {
  const dir = tempDir(t)
  const { src } = blockPair(ODD)
  const file = join(dir, 'vm.snap')
  await snapshot(src, file)
  const fd = openSync(file, 'r+')
  writeSync(fd, Buffer.alloc(4), 0, 4, 12) // the completion marker
  closeSync(fd)
  t.false(inspectSnapshot(file).complete)
  t.is(await rejectionCode(restore(file)), 'ERR_MULTIFD_INCOMPLETE')
  await snapshot(src, file)
  t.is(await rejectionCode(restore(file, { blocks: [RamBlock.allocate({ name: 'pc.ram', size: MiB })] })), 'ERR_MULTIFD_BLOCK_MISMATCH')
  writeFileSync(join(dir, 'junk'), 'not a snapshot at all, just text that is long enough')
  t.is(await rejectionCode(restore(join(dir, 'junk'))), 'ERR_MULTIFD_BAD_MAGIC')
  t.throws(() => inspectSnapshot(join(dir, 'missing')), { instanceOf: MultifdError, message: /missing/ })
})

/** A 4 MiB tmpfs inside `dir`, unmounted at teardown. */
function smallDisk(t: import('ava').ExecutionContext, dir: string): string {
  const mnt = join(dir, 'small')
  execFileSync('mkdir', [mnt])
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', mnt])
  t.teardown(() => execFileSync('umount', ['-l', mnt]))
  return mnt
}

test('disk full: the snapshot fails with ERR_MULTIFD_NO_SPACE, the good snapshot already at the path is untouched', async (t) => {
  t.timeout(60_000)
  const dir = tempDir(t)
  const mnt = smallDisk(t, dir)
  writeFileSync(join(mnt, 'neighbour'), 'keep me')
  const file = join(mnt, 'vm.snap')
  const { src: old } = blockPair([['pc.ram', MiB]])
  await snapshot(old, file)
  const oldFile = readFileSync(file)
  const { src } = blockPair([['pc.ram', 16 * MiB]])
  const before = sha256(src[0]!)
  const err = await t.throwsAsync(snapshot(src, file, { channels: 4 }), { instanceOf: MultifdError })
  t.is(err?.code, 'ERR_MULTIFD_NO_SPACE')
  t.regex(err?.message ?? '', /No space left on device/)
  t.true(readFileSync(file).equals(oldFile), 'the earlier snapshot is byte for byte what it was')
  const r = await restore(file)
  t.true(sameBytes(old, r.blocks), 'and restores to the blocks it was taken of')
  t.deepEqual(readdirSync(mnt).sort(), ['neighbour', 'vm.snap'], 'no partial file is left')
  t.is(readFileSync(join(mnt, 'neighbour'), 'utf8'), 'keep me')
  t.is(sha256(src[0]!), before, 'the block is untouched')
  // The process goes on: the same blocks snapshot fine elsewhere.
  const ok = await snapshot(src, join(dir, 'vm.snap'))
  t.true(ok.file.complete)
})

test('disk full with inPlace: the snapshot fails with ERR_MULTIFD_NO_SPACE, the file is left marked incomplete', async (t) => {
  t.timeout(60_000)
  const dir = tempDir(t)
  const mnt = smallDisk(t, dir)
  const file = join(mnt, 'vm.snap')
  const { src } = blockPair([['pc.ram', 16 * MiB]])
  t.is(await rejectionCode(snapshot(src, file, { channels: 4, inPlace: true })), 'ERR_MULTIFD_NO_SPACE')
  t.false(inspectSnapshot(file).complete, 'clearly incomplete')
  t.is(await rejectionCode(restore(file)), 'ERR_MULTIFD_INCOMPLETE')
})

test('a full snapshot appears at its path only complete: never beside a partial file, never two at once', async (t) => {
  t.timeout(60_000)
  const dir = tempDir(t)
  const file = join(dir, 'vm.snap')
  const { src } = blockPair(ODD)
  let seen: string[] = []
  const first = snapshot(src, file, {
    channels: 2,
    onProgress: () => {
      seen = readdirSync(dir)
    },
  })
  t.is(await rejectionCode(snapshot(src, file)), 'ERR_MULTIFD_STATE', 'a second snapshot to the same path while one runs is refused')
  const s = await first
  t.true(s.file.complete)
  t.true(seen.some((n) => n.startsWith('.vm.snap.multifd-partial-')), 'it was written under a partial name')
  t.false(seen.includes('vm.snap'), 'nothing was at the path while the snapshot was written')
  t.deepEqual(readdirSync(dir), ['vm.snap'])
  t.true(sameBytes(src, (await restore(file)).blocks))
  t.is(await rejectionCode(snapshot(src, dir)), 'ERR_MULTIFD_INVALID_ARGUMENT', 'a directory is no snapshot path')
})

test('a snapshot never overwrites the file a block is mapped from, nor a restore the snapshot it reads', async (t) => {
  t.timeout(60_000)
  const dir = tempDir(t)
  const img = join(dir, 'img.raw')
  writeFileSync(img, randomBytes(64 * 4096))
  const before = sha256File(img)
  const block = RamBlock.mapFile({ name: 'pc.ram', path: img })
  symlinkSync(img, join(dir, 'link'))
  for (const [path, options] of [[img, {}], [img, { inPlace: true }], [join(dir, 'link'), {}]] as const) {
    const err = await t.throwsAsync(snapshot([block], path, options), { instanceOf: MultifdError })
    t.is(err?.code, 'ERR_MULTIFD_INVALID_ARGUMENT')
    t.regex(err?.message ?? '', /block "pc.ram" is mapped from/)
  }
  t.is(sha256File(img), before, 'the image is untouched')
  const snap = join(dir, 'vm.snap')
  await snapshot([block], snap)
  const snapBefore = sha256File(snap)
  const onSnapshot = RamBlock.mapFile({ name: 'pc.ram', path: snap })
  t.is(await rejectionCode(restore(snap, { blocks: [onSnapshot] })), 'ERR_MULTIFD_INVALID_ARGUMENT')
  t.is(sha256File(snap), snapBefore, 'the snapshot is untouched')
  t.deepEqual(readdirSync(dir).sort(), ['img.raw', 'link', 'vm.snap'])
})

test('snapshot options are validated', async (t) => {
  const b = RamBlock.allocate({ name: 'x', size: 4096 })
  await t.throwsAsync(snapshot([b], '/tmp/x', { channels: 0 }), { instanceOf: MultifdError, message: /channels/ })
  await t.throwsAsync(snapshot([], '/tmp/x'), { instanceOf: MultifdError })
})
