export { ERROR_CODES, MultifdError, type MultifdErrorCode } from './errors.js'
export { RamBlock, type AllocateOptions, type MapFileOptions } from './block.js'
export { Source, type SourceOptions, type ByteRange } from './source.js'
export { Destination, type DestinationOptions, type AnnouncedBlock } from './destination.js'
export { type SourceTlsOptions, type DestinationTlsOptions, type PemSource } from './tls.js'
export { migrate, type MigrateOptions } from './migrate.js'
export { runLiveMigration, type LiveMigrateOptions, type LiveOptions, type LiveSummary, type RoundDecision, type RoundStats } from './live.js'
export { extractQemuBlock, inspectQemuFile, type ExtractOptions, type QemuBlockInfo, type QemuFileInfo } from './qemu.js'
export { QemuReceiver, QemuSender, type QemuReceiveOptions, type QemuSendOptions, type QemuRecvSummary, type QemuSendSummary, type QemuPeerBlock, type QemuPeerChannel, type QemuPeerProgress } from './qemu-peer.js'
export { inspectSnapshot, restore, snapshot, type FileProgress, type FileSummary, type RestoreOptions, type SnapshotBlockInfo, type SnapshotInfo, type SnapshotOptions } from './snapshot.js'
export { type ChannelState, type ChannelStats, type DestinationStats, type Recovery, type Stats, type Summary, type SessionEvents, type TlsSummary } from './types.js'
export { DEFAULT_PEER_TIMEOUT_MS, LIMITS } from './options.js'
export { type MigrationState, type Role, stateChannel, syncChannel, errorChannel, warningChannel, roundChannel, tlsChannel } from './state.js'
export { PROTOCOL_VERSION } from './protocol.js'
export { RESUME_PIECE_BYTES, type DurablePieces } from './resume.js'
export {
  FLAG_SYNC,
  FLAG_ZLIB,
  FLAG_ZSTD,
  INIT_PACKET_BYTES,
  MULTIFD_MAGIC,
  MULTIFD_VERSION,
  PACKET_SIZE,
  decodeInitPacket,
  decodePacketHeader,
  encodeInitPacket,
  encodePacketHeader,
  nativeErrorCodes,
  packetHeaderBytes,
  rebuildFromCaptures,
  type CapturedChannel,
  type RebuildOptions,
  type HeaderContext,
  type InitExpectation,
  type InitPacket,
  type PacketFields,
  type PacketHeader,
} from './codec.js'
export type { BlockDescriptor, CompressionMethod } from './options.js'
