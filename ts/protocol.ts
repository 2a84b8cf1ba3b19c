/**
 * The control protocol: JSON messages in length-prefixed frames on the control connection
 * (docs/PROTOCOL.md). The messages, their wire form and every check on them are the core's
 * (`multifd_core::control_messages`): the binding hands decoded, checked messages up and
 * encodes what is sent. This module only names the generated types.
 */
import { binding, type NativeControlMessage } from './native.js'
import { MultifdError, codeOf } from './errors.js'

export const PROTOCOL_VERSION: number = binding.CONTROL_PROTOCOL_VERSION

export type ControlMessage = NativeControlMessage
export type Hello = Extract<ControlMessage, { type: 'hello' }>

/** The error a peer's `error` message stands for, keeping its code when it is one of ours. */
export function remoteError(m: { code: string; message: string }, peer: string): MultifdError {
  const e = new MultifdError(codeOf(m.code), `${peer} failed: ${m.message}`)
  e.remote = true
  return e
}
