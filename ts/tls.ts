/**
 * Mutual TLS options (QEMU's tls-creds and tls-authz): both sides present a certificate its
 * peer's CA signed; the source checks the destination's name, the destination may restrict
 * sources to an allow-list. Every channel, control included, completes its handshake before
 * its first protocol byte. Credentials are PEM: text, bytes, or a path to a file.
 */
import { readFileSync } from 'node:fs'
import { z } from 'zod'
import { MultifdError } from './errors.js'
import type { TlsCredentials, TlsSessionInfo } from './native.js'
import type { TlsSummary } from './types.js'

/** PEM text (starting `-----BEGIN`), PEM bytes, or the path of a PEM file. */
export const PemSource = z.union([z.string().min(1), z.instanceof(Uint8Array)])
export type PemSource = z.input<typeof PemSource>

const credentials = {
  /** This side's certificate chain, leaf first. */
  cert: PemSource,
  /** The private key for `cert` (PKCS#8, PKCS#1 or SEC1). */
  key: PemSource,
  /** The CA certificate(s) that may sign the peer's certificate. */
  ca: PemSource,
}

export const SourceTlsOptions = z.strictObject({
  ...credentials,
  /**
   * The name the destination's certificate must carry (a DNS name or IP address in its
   * subjectAltName). Defaults to the host of `address`; required for unix: addresses.
   */
  name: z.string().min(1).optional(),
})
export type SourceTlsOptions = z.input<typeof SourceTlsOptions>

export const DestinationTlsOptions = z.strictObject({
  ...credentials,
  /**
   * Sources allowed to connect, by certificate identity: the whole subject
   * (`CN=source,O=Example`, in either order), its common name, or one of its alternative
   * names (DNS, IP, e-mail, URI). Absent or empty: any certificate the CA signed.
   */
  allow: z.array(z.string().trim().min(1)).optional(),
})
export type DestinationTlsOptions = z.input<typeof DestinationTlsOptions>

function pem(v: PemSource, what: string): Buffer {
  if (typeof v !== 'string') return Buffer.from(v)
  if (v.trimStart().startsWith('-----BEGIN')) return Buffer.from(v)
  try {
    return readFileSync(v)
  } catch (e) {
    throw new MultifdError('ERR_MULTIFD_TLS_CONFIG', `tls.${what}: cannot read ${v}: ${(e as Error).message}`, { cause: e })
  }
}

/** Reads the PEM files (if paths were given) into what the native layer takes. */
export function tlsCredentials(o: z.output<typeof SourceTlsOptions> | z.output<typeof DestinationTlsOptions>): TlsCredentials {
  return {
    cert: pem(o.cert, 'cert'),
    key: pem(o.key, 'key'),
    ca: pem(o.ca, 'ca'),
    ...('name' in o && o.name !== undefined ? { name: o.name } : {}),
    ...('allow' in o && o.allow !== undefined ? { allow: o.allow } : {}),
  }
}

/** The native layer's view of a TLS session, as the public summary shape. */
export function tlsSummary(i: TlsSessionInfo | null | undefined): TlsSummary | undefined {
  if (!i) return undefined
  return { protocol: i.protocol, cipherSuite: i.cipherSuite, ...(i.peerSubject == null ? {} : { peer: { subject: i.peerSubject, altNames: i.peerAltNames } }) }
}
