/**
 * The throughput cost of end-to-end integrity (an xxh3-64 digest of every packet's data pages,
 * checked by the destination, and of every block at completion), in one run.
 *
 *   bench/integrity [--size 1G] [--channels 2,4] [--reps 3] [--json]
 */
import { compareVariants } from './lib/ab.js'

await compareVariants('integrity', [
  { label: 'none', options: {} },
  { label: 'xxh3', options: { integrity: 'xxh3' } },
], { channels: '2,4' })
