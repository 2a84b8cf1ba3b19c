export { ERROR_CODES, MultifdError, type MultifdErrorCode } from './errors.js'
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
  type HeaderContext,
  type InitExpectation,
  type InitPacket,
  type PacketFields,
  type PacketHeader,
} from './codec.js'
export type { BlockDescriptor, CompressionMethod } from './options.js'
