//! QEMU's multifd channel bytes: the init packet, the RAM packet header and its flags.
//!
//! All integers are big-endian. Layouts follow QEMU >= 9.0 (`zero_pages` at byte 32), which a
//! seed-era (<= 8.2) sender also satisfies because it wrote 0 there.

mod flags;
mod geometry;
mod init;
mod packet;

pub use flags::{Compression, Flags, KnownMethod};
pub use geometry::Geometry;
pub use init::{ChannelClaims, InitPacket, REPLACEMENT_ACK, Replacement};
pub use packet::{BlockInfo, BlockLookup, CommonHeader, PacketHeader, PacketValidator, ValidatedPacket};

/// `MULTIFD_MAGIC`: first four bytes of every init packet and packet header.
pub const MAGIC: u32 = 0x1122_3344;
/// First four bytes of our control connection: "MFDC". Distinct from [`MAGIC`], so one
/// listener tells a control connection from a multifd channel by its first bytes.
pub const CONTROL_MAGIC: u32 = 0x4d46_4443;
/// `MULTIFD_VERSION`: has been 1 in every QEMU release.
pub const VERSION: u32 = 1;
/// `MULTIFD_PACKET_SIZE`: payload bytes per full packet; pages per packet = this / page size.
pub const PACKET_SIZE: u32 = 512 * 1024;
/// Size of the init packet (`MultiFDInit_t`).
pub const INIT_PACKET_LEN: usize = 64;
/// Size of the common header that starts every packet (`MultiFDPacketHdr_t`).
pub const COMMON_HEADER_LEN: usize = 12;
/// Bytes of a RAM packet header before the offset array.
pub const HEADER_FIXED_LEN: usize = 320;
/// Bytes reserved for the block name, NUL included.
pub const BLOCK_NAME_LEN: usize = 256;
/// The longest block name that fits with its NUL.
pub const MAX_BLOCK_NAME: usize = BLOCK_NAME_LEN - 1;
/// Most channels a session may have (QEMU's `multifd-channels` is 1..255; ids are 0..254).
pub const MAX_CHANNELS: u32 = 255;
/// Upper bound on a compressed payload: two packets' worth, as QEMU's receive buffer.
pub const MAX_COMPRESSED_PAYLOAD: u32 = 2 * PACKET_SIZE;
