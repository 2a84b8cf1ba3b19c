//! Wire codec bindings: parse and build init packets and RAM packet headers.

use multifd_core::wire::{BlockInfo, ChannelClaims, Compression, Flags, Geometry, InitPacket, PacketHeader, PacketValidator};
use multifd_core::{Error, ErrorCode};
use napi::bindgen_prelude::{BigInt, Buffer, Uint8Array};
use napi_derive::napi;

use crate::errors::{IntoCoded, Result};

#[napi(object)]
pub struct InitPacketInfo {
    /// The session UUID, 16 bytes.
    pub uuid: Buffer,
    pub channel_id: u32,
}

#[napi(object)]
pub struct InitExpectation {
    pub uuid: Uint8Array,
    pub channels: u32,
}

fn uuid_from(bytes: &[u8]) -> Result<[u8; 16]> {
    bytes
        .try_into()
        .map_err(|_| Error::new(ErrorCode::InvalidArgument, format!("a session UUID is 16 bytes, got {}", bytes.len())))
        .into_coded()
}

/// Decodes a 64-byte init packet; with `expect`, also checks the UUID and the channel id range.
#[napi]
pub fn decode_init_packet(bytes: &[u8], expect: Option<InitExpectation>) -> Result<InitPacketInfo> {
    let init = InitPacket::decode(bytes).into_coded()?;
    if let Some(expect) = expect {
        let claims = ChannelClaims::new(expect.channels).into_coded()?;
        init.check(&uuid_from(&expect.uuid)?, claims.channels()).into_coded()?;
    }
    Ok(InitPacketInfo { uuid: init.uuid.to_vec().into(), channel_id: init.channel_id.into() })
}

#[napi]
pub fn encode_init_packet(uuid: &[u8], channel_id: u32) -> Result<Buffer> {
    let channel_id = u8::try_from(channel_id)
        .map_err(|_| Error::new(ErrorCode::InvalidArgument, format!("channel id must be 0..255, got {channel_id}")))
        .into_coded()?;
    Ok(InitPacket { uuid: uuid_from(uuid)?, channel_id }.encode().to_vec().into())
}

#[napi(object)]
pub struct BlockDescriptor {
    pub name: String,
    /// Used length in bytes.
    pub length: f64,
}

#[napi(object)]
pub struct HeaderContext {
    pub page_size: u32,
    /// `none`, `zlib` or `zstd`.
    pub compression: String,
    /// The registered blocks; when absent only the context-free checks run.
    pub blocks: Option<Vec<BlockDescriptor>>,
}

#[napi(object)]
pub struct PacketHeaderInfo {
    pub flags: u32,
    pub sync: bool,
    /// The method the flags name: `none`, `zlib` or `zstd`.
    pub compression: String,
    pub pages_alloc: u32,
    pub normal_pages: u32,
    pub zero_pages: u32,
    pub next_packet_size: u32,
    pub packet_num: BigInt,
    /// The block name (lossy UTF-8); empty when the packet lists no pages.
    pub block: String,
    pub normal_offsets: Vec<BigInt>,
    pub zero_offsets: Vec<BigInt>,
    /// Bytes of header consumed (320 + 8 x pages per packet).
    pub header_bytes: u32,
}

#[napi(object)]
pub struct PacketHeaderFields {
    pub flags: u32,
    pub pages_alloc: u32,
    pub normal_pages: u32,
    pub zero_pages: u32,
    pub next_packet_size: u32,
    pub packet_num: BigInt,
    /// The reserved word carrying our integrity digest (0 when unused, as QEMU writes it).
    pub digest: Option<BigInt>,
    pub block: String,
    /// Normal offsets first, then zero offsets, as on the wire.
    pub offsets: Vec<BigInt>,
}

fn u64_of(v: &BigInt, what: &str) -> Result<u64> {
    let (signed, value, lossless) = v.get_u64();
    if signed || !lossless {
        return Err(Error::new(ErrorCode::InvalidArgument, format!("{what} must be an unsigned 64-bit integer"))).into_coded();
    }
    Ok(value)
}

fn block_length(b: &BlockDescriptor) -> multifd_core::Result<u64> {
    if !(b.length >= 0.0 && b.length.fract() == 0.0 && b.length <= 9_007_199_254_740_991.0) {
        return Err(Error::new(ErrorCode::InvalidArgument, format!("block {:?} length {} is not a safe non-negative integer", b.name, b.length)));
    }
    Ok(b.length as u64)
}

/// Decodes and validates one RAM packet header in QEMU's order (see the spec).
#[napi]
pub fn decode_packet_header(bytes: &[u8], context: HeaderContext) -> Result<PacketHeaderInfo> {
    let geometry = Geometry::new(context.page_size).into_coded()?;
    let compression = Compression::from_name(&context.compression).into_coded()?;
    let mut h = PacketHeader::default();
    match &context.blocks {
        Some(list) => {
            let blocks = list
                .iter()
                .map(|b| Ok(BlockInfo { name: b.name.as_bytes().to_vec(), length: block_length(b)? }))
                .collect::<multifd_core::Result<Vec<_>>>()
                .into_coded()?;
            PacketValidator { geometry, compression, blocks: blocks.as_slice() }.decode(bytes, &mut h).into_coded()?;
        }
        None => h.decode_into(bytes, geometry).into_coded()?,
    }
    let method = h.flags.method().map(|m| m.name()).unwrap_or("unsupported");
    Ok(PacketHeaderInfo {
        flags: h.flags.0,
        sync: h.flags.is_sync(),
        compression: method.to_string(),
        pages_alloc: h.pages_alloc,
        normal_pages: h.normal_pages,
        zero_pages: h.zero_pages,
        next_packet_size: h.next_packet_size,
        packet_num: BigInt::from(h.packet_num),
        block: String::from_utf8_lossy(&h.block).into_owned(),
        normal_offsets: h.normal_offsets().iter().map(|&o| BigInt::from(o)).collect(),
        zero_offsets: h.zero_offsets().iter().map(|&o| BigInt::from(o)).collect(),
        header_bytes: geometry.header_len() as u32,
    })
}

/// Builds a RAM packet header with the fields given verbatim (for tools and tests, which may
/// need invalid packets); the result is 320 + 8 x (524288 / pageSize) bytes.
#[napi]
pub fn encode_packet_header(fields: PacketHeaderFields, page_size: u32) -> Result<Buffer> {
    let geometry = Geometry::new(page_size).into_coded()?;
    let offsets = fields.offsets.iter().map(|o| u64_of(o, "offset")).collect::<Result<Vec<_>>>()?;
    let header = PacketHeader {
        flags: Flags(fields.flags),
        pages_alloc: fields.pages_alloc,
        normal_pages: fields.normal_pages,
        zero_pages: fields.zero_pages,
        next_packet_size: fields.next_packet_size,
        packet_num: u64_of(&fields.packet_num, "packetNum")?,
        digest: fields.digest.as_ref().map(|d| u64_of(d, "digest")).transpose()?.unwrap_or(0),
        block: fields.block.into_bytes(),
        offsets,
    };
    Ok(header.encode(geometry).into_coded()?.into())
}

/// Every stable error code, for the TypeScript facade's type and for tests.
#[napi]
pub fn error_codes() -> Vec<&'static str> {
    ErrorCode::ALL.iter().map(|c| c.as_str()).collect()
}

#[napi(object)]
pub struct CapturedChannel {
    pub channel_id: u32,
    pub uuid: Buffer,
    pub compression: String,
    pub packets: f64,
    pub syncs: f64,
    pub normal_pages: f64,
    pub zero_pages: f64,
    pub payload_bytes: f64,
}

#[napi(object)]
pub struct RebuiltBlock {
    pub name: String,
    pub data: Buffer,
}

#[napi(object)]
pub struct RebuiltCapture {
    pub blocks: Vec<RebuiltBlock>,
    pub channels: Vec<CapturedChannel>,
}

/// Rebuilds the blocks carried by captured channel streams (one Buffer per channel).
#[napi]
pub fn rebuild_from_streams(streams: Vec<Buffer>, page_size: u32, max_block_bytes: f64) -> Result<RebuiltCapture> {
    let geometry = Geometry::new(page_size).into_coded()?;
    let refs: Vec<&[u8]> = streams.iter().map(|b| b.as_ref()).collect();
    let max = crate::numbers::to_u64(max_block_bytes, "maxBlockBytes")?;
    let r = multifd_core::stream::rebuild(&refs, geometry, max).into_coded()?;
    Ok(RebuiltCapture {
        blocks: r.blocks.into_iter().map(|(name, data)| RebuiltBlock { name, data: data.into() }).collect(),
        channels: r.channels.into_iter().map(Into::into).collect(),
    })
}

impl From<multifd_core::stream::ChannelSummary> for CapturedChannel {
    fn from(c: multifd_core::stream::ChannelSummary) -> Self {
        CapturedChannel {
            channel_id: c.channel_id.into(),
            uuid: c.uuid.to_vec().into(),
            compression: c.compression.name().into(),
            packets: c.packets as f64,
            syncs: c.syncs as f64,
            normal_pages: c.normal_pages as f64,
            zero_pages: c.zero_pages as f64,
            payload_bytes: c.payload_bytes as f64,
        }
    }
}
