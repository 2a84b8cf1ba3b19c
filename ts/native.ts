// The generated napi-rs loader. It is CommonJS; Node exposes its exports as named ESM imports.
export * as binding from './native/binding.cjs'
export type { NativeControlMessage, NativeError, NativeEvent, TlsCredentials, TlsSessionInfo } from './native/binding.cjs'
