/**
 * Sender CPU seconds per GiB with and without MSG_ZEROCOPY at 1, 2, 4 channels on loopback, in
 * one run. On loopback the kernel copies every zero-copy send anyway (it reports COPIED), so
 * this shows the bookkeeping's cost, not the saving a real NIC gives.
 *
 *   bench/zerocopy [--size 1G] [--channels 1,2,4] [--reps 3] [--json]
 */
import { compareVariants } from './lib/ab.js'

await compareVariants('MSG_ZEROCOPY', [
  { label: 'copy', options: {} },
  { label: 'zero-copy', options: { zeroCopySend: true } },
], { channels: '1,2,4' })
