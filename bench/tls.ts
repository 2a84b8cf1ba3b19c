/**
 * What mutual TLS costs: this package with and without TLS, and QEMU 10 multifd with and
 * without TLS (tls-creds-x509, verify-peer=on), at each channel count, in one run on the same
 * source bytes. Both sides of every transfer run in their own processes; every transfer is
 * verified by sha256. Certificates are fresh throwaway EC P-256 ones (scripts/test-certs.sh).
 *
 *   bench/tls [--size 1G] [--channels 1,2,4] [--reps 3] [--json] [--no-qemu]
 */
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'
import { median, parseSize, spread, type Spread } from './lib/run.js'
import { ours, qemu, settle, sourceFile, type Result } from './lib/transfer.js'

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '1G' },
    channels: { type: 'string', default: '1,2,4' },
    reps: { type: 'string', default: '3' },
    json: { type: 'boolean', default: false },
    'no-qemu': { type: 'boolean', default: false },
  },
})
const size = parseSize(values.size!)
const channelsList = values.channels!.split(',').map(Number)
const GiB = 2 ** 30
const log = (s: string): void => void (values.json ? process.stderr : process.stdout).write(s + '\n')

const pki = mkdtempSync(join(tmpdir(), 'multifd-bench-pki-'))
execFileSync('bash', [join(dirname(fileURLToPath(import.meta.url)), '..', 'scripts', 'test-certs.sh'), pki], { stdio: 'inherit' })
const file = sourceFile(size, log)

type Variant = { label: string; run: (ch: number) => Promise<Result | undefined> }
const variants: Variant[] = [
  { label: 'ours', run: (ch) => ours(size, file, { channels: ch }) },
  {
    label: 'ours+tls',
    run: (ch) =>
      ours(
        size,
        file,
        { channels: ch, tls: { cert: join(pki, 'source.pem'), key: join(pki, 'source.key'), ca: join(pki, 'ca.pem'), name: 'localhost' } },
        { tls: { cert: join(pki, 'dest.pem'), key: join(pki, 'dest.key'), ca: join(pki, 'ca.pem'), allow: ['CN=source,O=multifd tests'] } },
      ),
  },
  ...(values['no-qemu']
    ? []
    : [
        { label: 'qemu', run: (ch: number) => qemu(size, file, { channels: ch }) },
        { label: 'qemu+tls', run: (ch: number) => qemu(size, file, { channels: ch, tlsDir: pki }) },
      ]),
]

const results = new Map<string, Result[]>()
for (let rep = 0; rep < Number(values.reps); rep++) {
  for (const ch of channelsList) {
    const order = rep % 2 === 0 ? variants : [...variants].reverse()
    for (const v of order) {
      await settle()
      const r = await v.run(ch)
      if (!r) {
        log(`rep ${rep + 1} ch ${ch} ${v.label}: no result`)
        continue
      }
      results.set(`${ch}/${v.label}`, [...(results.get(`${ch}/${v.label}`) ?? []), r])
      log(`rep ${rep + 1} ch ${ch} ${v.label.padEnd(9)}: ${r.gbps.toFixed(2)} GB/s, CPU s/GiB ${(r.srcCpu / (size / GiB)).toFixed(3)} / ${(r.dstCpu / (size / GiB)).toFixed(3)}${r.ok ? '' : '  NOT VERIFIED'}`)
    }
  }
}
rmSync(file, { force: true })
rmSync(pki, { recursive: true, force: true })

const stat = (ch: number, label: string): { gbps: number; spread: Spread; src: number; dst: number; ok: boolean } | undefined => {
  const rs = results.get(`${ch}/${label}`)
  if (!rs?.length) return undefined
  return { gbps: median(rs.map((r) => r.gbps)), spread: spread(rs.map((r) => r.gbps)), src: median(rs.map((r) => r.srcCpu)) / (size / GiB), dst: median(rs.map((r) => r.dstCpu)) / (size / GiB), ok: rs.every((r) => r.ok) }
}
const rows = channelsList.map((ch) => ({ channels: ch, ...Object.fromEntries(variants.map((v) => [v.label, stat(ch, v.label)])) }))
if (values.json) {
  console.log(JSON.stringify({ title: 'tls', sizeBytes: size, reps: Number(values.reps), rows }))
} else {
  const f = (x: number | undefined): string => (x === undefined ? '-' : x.toFixed(2))
  log(`\nTLS cost: ${(size / GiB).toFixed(2)} GiB, loopback TCP, medians of ${values.reps} (GB/s; CPU s/GiB source/destination)`)
  log('channels |  ours | ours+tls | tls/plain | CPU ours+tls    |  qemu | qemu+tls | qemu tls/plain | ours+tls / qemu+tls')
  for (const r of rows as Array<Record<string, { gbps: number; src: number; dst: number } | undefined> & { channels: number }>) {
    const [a, b, q, qt] = [r['ours'], r['ours+tls'], r['qemu'], r['qemu+tls']]
    log(`${String(r.channels).padStart(8)} | ${f(a?.gbps).padStart(5)} | ${f(b?.gbps).padStart(8)} | ${(a && b ? `${f(b.gbps / a.gbps)}x` : '-').padStart(9)} | ${(b ? `${b.src.toFixed(3)} / ${b.dst.toFixed(3)}` : '-').padEnd(15)} | ${f(q?.gbps).padStart(5)} | ${f(qt?.gbps).padStart(8)} | ${(q && qt ? `${f(qt.gbps / q.gbps)}x` : '-').padStart(14)} | ${b && qt ? `${f(b.gbps / qt.gbps)}x` : '-'}`)
  }
  log(`every transfer verified byte for byte: ${[...results.values()].flat().every((r) => r.ok) ? 'yes' : 'NO'}`)
}
