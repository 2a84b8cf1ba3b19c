/**
 * Where command outputs go (docs/OUTPUTS.md): never onto an input (`refuseOverlap`), and at the
 * output path only a complete result (`Output` in ts/outputs.ts, which the library's
 * `snapshot()` and `extractQemuBlock()` use too).
 */
import { resolve } from 'node:path'
import { identity, statOf } from '../outputs.js'
import { UsageError } from './args.js'

/**
 * Refuses (usage error, exit 2) an output that is one of the inputs, or one file given as two
 * outputs: the same device and inode once links are resolved. Runs before anything is opened
 * for writing.
 */
export function refuseOverlap(inputs: string[], outputs: string[]): void {
  const named = new Map<string, string>()
  for (const path of outputs) {
    const other = named.get(resolve(path))
    if (other !== undefined) throw new UsageError(`output ${path} is given twice (also as ${other})`)
    named.set(resolve(path), path)
  }
  const seen = new Map<string, { path: string; input: boolean }>()
  for (const path of inputs) {
    const s = statOf(path)
    if (s) seen.set(identity(s), { path, input: true })
  }
  for (const path of outputs) {
    const s = statOf(path)
    if (!s) continue
    const hit = seen.get(identity(s))
    if (hit?.input) throw new UsageError(`output ${path} is the input ${hit.path}; writing it would destroy the input`)
    if (hit) throw new UsageError(`output ${path} is the same file as the output ${hit.path}`)
    if (s.isDirectory()) throw new UsageError(`output ${path} is a directory`)
    seen.set(identity(s), { path, input: false })
  }
}

