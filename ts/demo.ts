/**
 * `npm run demo`. Until the transport lands (issue 3), this shows the codec on a real packet:
 * it builds QEMU's init packet and a data header, decodes them back, and shows a rejection.
 */
import { MultifdError, decodeInitPacket, decodePacketHeader, encodeInitPacket, encodePacketHeader } from './index.js'

const uuid = Buffer.from('5a3f0c6e9b2d4c1e8f7a6b5c4d3e2f10', 'hex')
const init = encodeInitPacket({ uuid, channelId: 1 })
console.log(`init packet (64 bytes): ${init.subarray(0, 25).toString('hex')}…`)
console.log('decoded:', decodeInitPacket(init, { uuid, channels: 2 }))

const header = encodePacketHeader({ packetNum: 7n, block: 'pc.ram', normalOffsets: [0x1000n, 0x3000n], zeroOffsets: [0x2000n] })
const decoded = decodePacketHeader(header, { blocks: [{ name: 'pc.ram', length: 1 << 30 }] })
console.log(`packet header (${header.length} bytes) ->`, decoded)

try {
  decodePacketHeader(encodePacketHeader({ block: 'pc.ram', normalOffsets: [1n << 31n] }), { blocks: [{ name: 'pc.ram', length: 1 << 30 }] })
} catch (e) {
  if (!(e instanceof MultifdError)) throw e
  console.log(`a hostile offset is refused: ${e.code}: ${e.message}`)
}
