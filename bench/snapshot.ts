/**
 * Snapshot and restore throughput: this package's mapped-ram snapshots against QEMU 10
 * mapped-ram save/restore with the same size and channels, and `cp` of a same-size file, on
 * the same filesystem, in one run. Ours ends with fdatasync (durable); QEMU does not sync
 * (the "QEMU mapped-ram + sync" row adds an fsync issued as QEMU reports completion), and
 * neither does plain `cp` (a `cp` + `sync` row is printed too).
 *
 *   bench/snapshot [--size 2G] [--channels 1,2,4] [--dir /var/tmp] [--reps 1] [--json] [--no-qemu]
 */
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { median, parseSize, runJson, spread } from './lib/run.js'
import { settle, sourceFile, timeoutFor } from './lib/transfer.js'

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '2G' },
    channels: { type: 'string', default: '1,2,4' },
    dir: { type: 'string', default: '/var/tmp' },
    reps: { type: 'string', default: '1' },
    json: { type: 'boolean', default: false },
    'no-qemu': { type: 'boolean', default: false },
  },
})
const size = parseSize(values.size!)
const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')
const src = sourceFile(size, log, 'half-zero')
const dir = mkdtempSync(join(values.dir!, 'multifd-bench-'))
const peer = join(import.meta.dirname, 'lib', 'peer.ts')
const timeout = timeoutFor(size) * 2
const gbps = (seconds: number): number => size / seconds / 1e9
const dropCaches = (): void => void execFileSync('sh', ['-c', 'sync; echo 3 > /proc/sys/vm/drop_caches'])

type Row = { what: string; channels: number | '-'; save: number[]; restore: number[]; ok: boolean }
const rows: Row[] = []
const row = (what: string, channels: number | '-'): Row => {
  let r = rows.find((x) => x.what === what && x.channels === channels)
  if (!r) rows.push((r = { what, channels, save: [], restore: [], ok: true }))
  return r
}

try {
  for (let rep = 0; rep < Number(values.reps); rep++) {
    // cp of a same-size file on the same filesystem (page cache), and cp + sync (durable).
    await settle()
    let t = performance.now()
    execFileSync('cp', [src, join(dir, 'copy')])
    row('cp', '-').save.push(gbps((performance.now() - t) / 1000))
    execFileSync('sync')
    rmSync(join(dir, 'copy'))
    await settle()
    t = performance.now()
    execFileSync('sh', ['-c', `cp ${src} ${join(dir, 'copy')} && sync ${join(dir, 'copy')}`])
    row('cp + sync', '-').save.push(gbps((performance.now() - t) / 1000))
    rmSync(join(dir, 'copy'))

    for (const ch of values.channels!.split(',').map(Number)) {
      const snap = join(dir, 'ours.snap')
      await settle()
      const [s] = await runJson(process.execPath, ['--import=tsx', peer, 'snap-save', src, snap, String(size), String(ch)], timeout)
      dropCaches()
      await settle()
      const [r] = await runJson(process.execPath, ['--import=tsx', peer, 'snap-restore', snap, String(size), String(ch)], timeout)
      const ours = row('multifd', ch)
      ours.save.push(gbps(s!.seconds as number))
      ours.restore.push(gbps(r!.seconds as number))
      ours.ok &&= s!.sha256 === r!.sha256
      rmSync(snap, { force: true })

      if (!values['no-qemu']) {
        const qfile = join(dir, 'qemu.img')
        const q = (mode: string, ...extra: string[]): Promise<Array<Record<string, unknown>>> =>
          runJson('python3', [join(import.meta.dirname, 'qemu', 'qemu_mig.py'), '--mode', mode, ...extra, '--mapped-ram', '--file', qfile, '--src-ram', src, '--size-mib', String(Math.floor(size / 2 ** 20)), '--channels', String(ch), '--prealloc', 'both', '--reps', '1'], timeout * 4)
        await settle()
        // QEMU's save ends without a sync; ours ends with fdatasync. The durable comparison
        // adds the fsync qemu_mig.py issues the moment QEMU reports completion (a `sync` run
        // after QEMU has quit finds the file already written back, in time nobody timed).
        const [qs] = await q('save', '--sync')
        row('QEMU mapped-ram + sync', ch).save.push(gbps((qs!.seconds as number) + (qs!.syncSeconds as number)))
        dropCaches()
        await settle()
        const [qr] = await q('restore')
        const qemu = row('QEMU mapped-ram', ch)
        qemu.save.push((qs!.bytesPerSecond as number) / 1e9)
        qemu.restore.push((qr!.bytesPerSecond as number) / 1e9)
        qemu.ok &&= qr!.sha256Match === true
        rmSync(qfile, { force: true })
      }
      log(`rep ${rep + 1} ch ${ch}: ours save ${ours.save.at(-1)!.toFixed(2)} restore ${ours.restore.at(-1)!.toFixed(2)} GB/s`)
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true })
  rmSync(src, { force: true })
}

const out = rows.map((r) => ({ what: r.what, channels: r.channels, saveGBps: median(r.save), restoreGBps: r.restore.length ? median(r.restore) : undefined, save: spread(r.save), restore: spread(r.restore), verified: r.ok }))
if (values.json) console.log(JSON.stringify({ sizeBytes: size, dir: values.dir, rows: out }))
else {
  log(`\n${(size / 2 ** 30).toFixed(2)} GiB, 50% zero pages, files in ${values.dir}; restores start from a dropped page cache`)
  log('what             | ch | save/copy GB/s | restore GB/s')
  for (const o of out) log(`${o.what.padEnd(16)} | ${String(o.channels).padStart(2)} | ${o.saveGBps.toFixed(2).padStart(14)} | ${o.restoreGBps === undefined ? '-' : o.restoreGBps.toFixed(2).padStart(12)}`)
  log(`every restore verified byte for byte: ${out.every((o) => o.verified) ? 'yes' : 'NO'}`)
}
