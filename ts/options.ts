import { z } from 'zod'
import { MultifdError } from './errors.js'

export const PageSize = z
  .int()
  .refine((n) => n >= 512 && n <= 524288 && (n & (n - 1)) === 0, {
    error: 'page size must be a power of two from 512 to 524288',
  })

/** `tcp:HOST:PORT` (port 0 to let the system choose, when listening) or `unix:PATH`. */
export const Address = z.string().regex(/^(tcp:(\[[^\]]+\]|[^:\s]+):\d{1,5}|unix:.{1,107})$/, {
  error: 'address must be tcp:HOST:PORT or unix:PATH',
})

export const CompressionMethod = z.enum(['none', 'zlib', 'zstd'])
export type CompressionMethod = z.infer<typeof CompressionMethod>

export const BlockName = z
  .string()
  .min(1)
  .refine((s) => Buffer.byteLength(s) <= 255 && !s.includes('\0'), {
    error: 'block names are 1 to 255 bytes of UTF-8 without NUL',
  })

export const BlockDescriptor = z.strictObject({
  name: BlockName,
  length: z.int().nonnegative(),
})
export type BlockDescriptor = z.infer<typeof BlockDescriptor>

export const Uuid = z.instanceof(Uint8Array).refine((u) => u.length === 16, {
  error: 'a session UUID is 16 bytes',
})

/** Parses `input` with `schema`; a failure is a MultifdError naming every problem. */
export function parseOptions<S extends z.ZodType>(schema: S, input: unknown, what: string): z.output<S> {
  const r = schema.safeParse(input)
  if (!r.success) {
    throw new MultifdError('ERR_MULTIFD_INVALID_ARGUMENT', `invalid ${what}:\n${z.prettifyError(r.error)}`, {
      cause: r.error,
    })
  }
  return r.data
}
