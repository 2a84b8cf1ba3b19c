//! The control protocol's messages as TypeScript sees them: a discriminated union (`type`) that
//! mirrors `multifd_core::control_messages::ControlMessage` field for field. The core decodes,
//! checks and encodes; this module only converts.

use multifd_core::control_messages::{BlockDigest, BlockEntry, ControlMessage, HeldRange, Hello, PROTOCOL_VERSION};
use napi_derive::napi;

use crate::errors::Result;
use crate::numbers::to_u64;

/// The control protocol version this build speaks.
#[napi]
pub const CONTROL_PROTOCOL_VERSION: u32 = PROTOCOL_VERSION;

/// Bytes of a resume piece (1 MiB): what `held` ranges and their digests cover.
#[napi]
pub const RESUME_PIECE_BYTES: u32 = multifd_core::resume::PIECE as u32;

/// Ranges one `held` message carries at most.
#[napi]
pub const HELD_RANGES_PER_FRAME: u32 = multifd_core::limits::HELD_RANGES_PER_FRAME as u32;

/// A block of a hello's table.
#[napi(object)]
pub struct NativeBlockEntry {
    pub name: String,
    pub length: f64,
}

/// A block's xxh3-64 (16 lowercase hex digits) in `complete`.
#[napi(object)]
pub struct NativeBlockDigest {
    pub name: String,
    pub xxh3: String,
}

/// A range a resuming destination holds (`held`): piece `index` (1 MiB) of the hello's block
/// number `block`, and its xxh3-64.
#[napi(object)]
pub struct NativeHeldRange {
    pub block: u32,
    pub index: f64,
    pub xxh3: String,
}

/// One control message (docs/PROTOCOL.md, "Messages").
#[napi(discriminant = "type", discriminant_case = "camelCase")]
pub enum NativeControlMessage {
    Hello {
        protocol: i64,
        session: String,
        channels: u32,
        page_size: u32,
        compression: String,
        blocks: Vec<NativeBlockEntry>,
        integrity: Option<String>,
    },
    Welcome { protocol: i64 },
    Round { round: f64 },
    Synced { epoch: f64, packet_num: f64 },
    Complete { epoch: f64, digests: Option<Vec<NativeBlockDigest>> },
    Completed,
    Cancel,
    Ping,
    Error { code: String, message: String },
    ChannelDropped { channel: u32 },
    Resume,
    Held { ranges: Vec<NativeHeldRange>, done: bool },
    Resumed { bytes: f64 },
    Reconnect { session: String, acked: f64 },
    Reconnected { epoch: f64, completed: bool },
}

impl From<ControlMessage> for NativeControlMessage {
    fn from(m: ControlMessage) -> Self {
        match m {
            ControlMessage::Hello(h) => NativeControlMessage::Hello {
                protocol: h.protocol,
                session: h.session,
                channels: h.channels,
                page_size: h.page_size,
                compression: h.compression,
                blocks: h.blocks.into_iter().map(|b| NativeBlockEntry { name: b.name, length: b.length as f64 }).collect(),
                integrity: h.integrity,
            },
            ControlMessage::Welcome { protocol } => NativeControlMessage::Welcome { protocol },
            ControlMessage::Round { round } => NativeControlMessage::Round { round: round as f64 },
            ControlMessage::Synced { epoch, packet_num } => NativeControlMessage::Synced { epoch: epoch as f64, packet_num: packet_num as f64 },
            ControlMessage::Complete { epoch, digests } => NativeControlMessage::Complete {
                epoch: epoch as f64,
                digests: digests.map(|ds| ds.into_iter().map(|d| NativeBlockDigest { name: d.name, xxh3: d.xxh3 }).collect()),
            },
            ControlMessage::Completed => NativeControlMessage::Completed,
            ControlMessage::Cancel => NativeControlMessage::Cancel,
            ControlMessage::Ping => NativeControlMessage::Ping,
            ControlMessage::Error { code, message } => NativeControlMessage::Error { code, message },
            ControlMessage::ChannelDropped { channel } => NativeControlMessage::ChannelDropped { channel },
            ControlMessage::Resume => NativeControlMessage::Resume,
            ControlMessage::Held { ranges, done } => {
                NativeControlMessage::Held { ranges: ranges.into_iter().map(|r| NativeHeldRange { block: r.block, index: r.index as f64, xxh3: r.xxh3 }).collect(), done }
            }
            ControlMessage::Resumed { bytes } => NativeControlMessage::Resumed { bytes: bytes as f64 },
            ControlMessage::Reconnect { session, acked } => NativeControlMessage::Reconnect { session, acked: acked as f64 },
            ControlMessage::Reconnected { epoch, completed } => NativeControlMessage::Reconnected { epoch: epoch as f64, completed },
        }
    }
}

impl NativeControlMessage {
    /// The core's message; numbers must be safe non-negative integers.
    pub fn into_core(self) -> Result<ControlMessage> {
        Ok(match self {
            NativeControlMessage::Hello { protocol, session, channels, page_size, compression, blocks, integrity } => ControlMessage::Hello(Hello {
                protocol,
                session,
                channels,
                page_size,
                compression,
                blocks: blocks.into_iter().map(|b| Ok(BlockEntry { name: b.name, length: to_u64(b.length, "a block length")? })).collect::<Result<_>>()?,
                integrity,
            }),
            NativeControlMessage::Welcome { protocol } => ControlMessage::Welcome { protocol },
            NativeControlMessage::Round { round } => ControlMessage::Round { round: to_u64(round, "round")? },
            NativeControlMessage::Synced { epoch, packet_num } => ControlMessage::Synced { epoch: to_u64(epoch, "epoch")?, packet_num: to_u64(packet_num, "packetNum")? },
            NativeControlMessage::Complete { epoch, digests } => ControlMessage::Complete {
                epoch: to_u64(epoch, "epoch")?,
                digests: digests.map(|ds| ds.into_iter().map(|d| BlockDigest { name: d.name, xxh3: d.xxh3 }).collect()),
            },
            NativeControlMessage::Completed => ControlMessage::Completed,
            NativeControlMessage::Cancel => ControlMessage::Cancel,
            NativeControlMessage::Ping => ControlMessage::Ping,
            NativeControlMessage::Error { code, message } => ControlMessage::Error { code, message },
            NativeControlMessage::ChannelDropped { channel } => ControlMessage::ChannelDropped { channel },
            NativeControlMessage::Resume => ControlMessage::Resume,
            NativeControlMessage::Held { ranges, done } => ControlMessage::Held {
                ranges: ranges.into_iter().map(|r| Ok(HeldRange { block: r.block, index: to_u64(r.index, "a held range's index")?, xxh3: r.xxh3 })).collect::<Result<_>>()?,
                done,
            },
            NativeControlMessage::Resumed { bytes } => ControlMessage::Resumed { bytes: to_u64(bytes, "resumed bytes")? },
            NativeControlMessage::Reconnect { session, acked } => ControlMessage::Reconnect { session, acked: to_u64(acked, "acked")? },
            NativeControlMessage::Reconnected { epoch, completed } => ControlMessage::Reconnected { epoch: to_u64(epoch, "epoch")?, completed },
        })
    }
}

/// The frame a message from TypeScript travels as.
pub fn encode(m: NativeControlMessage) -> Result<Vec<u8>> {
    Ok(m.into_core()?.encode())
}
