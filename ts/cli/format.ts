/** Human-readable sizes (IEC: KiB, MiB, GiB), rates (decimal GB/s, as network rates are) and durations. */

const IEC = ['B', 'KiB', 'MiB', 'GiB', 'TiB'] as const

export function bytes(n: number): string {
  let i = 0
  let v = n
  while (v >= 1024 && i < IEC.length - 1) {
    v /= 1024
    i++
  }
  return i === 0 ? `${n} B` : `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${IEC[i]}`
}

export function rate(bytesPerSecond: number): string {
  if (bytesPerSecond >= 1e9) return `${(bytesPerSecond / 1e9).toFixed(2)} GB/s`
  if (bytesPerSecond >= 1e6) return `${(bytesPerSecond / 1e6).toFixed(1)} MB/s`
  return `${(bytesPerSecond / 1e3).toFixed(1)} kB/s`
}

export function duration(seconds: number): string {
  if (!Number.isFinite(seconds)) return '?'
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`
  if (seconds < 60) return `${seconds.toFixed(1)} s`
  const m = Math.floor(seconds / 60)
  return `${m}m ${Math.round(seconds - m * 60)}s`
}

/** Parses `512M`, `1G`, `4096`, `1.5GiB` into bytes. */
export function parseSize(s: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?$/i.exec(s.trim())
  if (!m) return undefined
  const mult = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T']
  return Math.round(Number(m[1]) * mult)
}
