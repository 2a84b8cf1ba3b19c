//! Decoding captured multifd channel byte streams (QEMU's or ours) back into blocks, for
//! tests against real QEMU, `multifd inspect --rebuild`, and recovery.
//!
//! Each stream is one channel: a 64-byte init packet, then packets. Pages of different
//! channels are ordered only by SYNC packets, so every channel is cut into segments at its
//! SYNCs and segment k of every channel is applied before segment k+1 of any.

use std::cell::RefCell;

use crate::compress::{self, Decompressor};
use crate::error::{Error, ErrorCode, Result, fail};
use crate::wire::{BlockLookup, Compression, Geometry, INIT_PACKET_LEN, InitPacket, PacketHeader, PacketValidator};

/// What one channel stream held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSummary {
    pub channel_id: u8,
    pub uuid: [u8; 16],
    pub compression: Compression,
    pub packets: u64,
    pub syncs: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    /// Payload bytes after headers (compressed size when compressed).
    pub payload_bytes: u64,
}

/// Blocks rebuilt from channel streams, in order of first appearance. A block is as long as
/// its highest page seen; pages never sent are zero.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub blocks: Vec<(String, Vec<u8>)>,
    pub channels: Vec<ChannelSummary>,
}

/// Block names met while decoding; any name is accepted, up to `max_len` bytes long.
struct Names {
    names: RefCell<Vec<Vec<u8>>>,
    max_len: u64,
}

impl BlockLookup for Names {
    fn lookup(&self, name: &[u8]) -> Option<(usize, u64)> {
        let mut names = self.names.borrow_mut();
        let index = names.iter().position(|n| n == name).unwrap_or_else(|| {
            names.push(name.to_vec());
            names.len() - 1
        });
        Some((index, self.max_len))
    }
}

struct Write {
    block: usize,
    offset: u64,
    /// Start of the page in the channel's data buffer; `None` for a zero page.
    data: Option<usize>,
}

struct Channel {
    summary: ChannelSummary,
    segments: Vec<Vec<Write>>,
    data: Vec<u8>,
}

fn decode_channel(stream: &[u8], geometry: Geometry, names: &Names) -> Result<Channel> {
    let init = InitPacket::decode(stream)?;
    let page = geometry.page_size() as usize;
    let mut at = INIT_PACKET_LEN;
    let mut summary = ChannelSummary {
        channel_id: init.channel_id,
        uuid: init.uuid,
        compression: Compression::None,
        packets: 0,
        syncs: 0,
        normal_pages: 0,
        zero_pages: 0,
        payload_bytes: 0,
    };
    let mut method: Option<(Compression, Option<Box<dyn Decompressor>>)> = None;
    let mut header = PacketHeader::default();
    let mut segments = vec![Vec::new()];
    let mut data = Vec::new();
    while at < stream.len() {
        let rest = &stream[at..];
        let where_ = |e: Error| e.context(format!("channel {} packet {} at byte {at}", init.channel_id, summary.packets));
        header.decode_into(rest, geometry).map_err(where_)?;
        if method.is_none() && header.has_pages() {
            let c = header.flags.method().map_err(where_)?;
            method = Some((c, compress::decompressor(c).map_err(where_)?));
            summary.compression = c;
        }
        let compression = method.as_ref().map_or(Compression::None, |m| m.0);
        let v = PacketValidator { geometry, compression, blocks: names }.validate(&header).map_err(where_)?;
        let body = &rest[geometry.header_len()..];
        let payload_len = v.payload_len as usize;
        if body.len() < payload_len {
            return Err(where_(Error::new(ErrorCode::Truncated, format!("payload of {payload_len} bytes, only {} left", body.len()))));
        }
        let payload = &body[..payload_len];
        if let Some(block) = v.block {
            let normal = header.normal_pages as usize;
            let start = data.len();
            match method.as_mut().and_then(|m| m.1.as_mut()) {
                Some(d) if normal > 0 => {
                    data.resize(start + normal * page, 0);
                    d.decompress(payload, &mut data[start..]).map_err(where_)?;
                }
                _ => data.extend_from_slice(payload),
            }
            let seg = segments.last_mut().unwrap();
            for (i, &o) in header.normal_offsets().iter().enumerate() {
                seg.push(Write { block, offset: o, data: Some(start + i * page) });
            }
            for &o in header.zero_offsets() {
                seg.push(Write { block, offset: o, data: None });
            }
        }
        summary.packets += 1;
        summary.normal_pages += u64::from(header.normal_pages);
        summary.zero_pages += u64::from(header.zero_pages);
        summary.payload_bytes += payload_len as u64;
        if header.flags.is_sync() {
            summary.syncs += 1;
            segments.push(Vec::new());
        }
        at += geometry.header_len() + payload_len;
    }
    Ok(Channel { summary, segments, data })
}

/// Rebuilds the blocks carried by `streams` (one per channel, any order). Blocks longer than
/// `max_block_len` bytes are refused (`ERR_MULTIFD_OFFSET_RANGE`), so a hostile capture cannot
/// make this allocate without bound.
pub fn rebuild(streams: &[&[u8]], geometry: Geometry, max_block_len: u64) -> Result<Rebuilt> {
    let names = Names { names: RefCell::new(Vec::new()), max_len: max_block_len };
    let channels = streams.iter().map(|s| decode_channel(s, geometry, &names)).collect::<Result<Vec<_>>>()?;
    if let Some(c) = channels.windows(2).find(|w| w[0].summary.uuid != w[1].summary.uuid) {
        fail!(UuidMismatch, "channel streams come from different sessions (channel {} has another UUID)", c[1].summary.channel_id);
    }
    let names = names.names.into_inner();
    let page = geometry.page_size() as usize;
    let mut blocks: Vec<Vec<u8>> = vec![Vec::new(); names.len()];
    let rounds = channels.iter().map(|c| c.segments.len()).max().unwrap_or(0);
    for round in 0..rounds {
        for c in &channels {
            for w in c.segments.get(round).into_iter().flatten() {
                let b = &mut blocks[w.block];
                let (start, end) = (w.offset as usize, w.offset as usize + page);
                if b.len() < end {
                    b.resize(end, 0);
                }
                match w.data {
                    Some(d) => b[start..end].copy_from_slice(&c.data[d..d + page]),
                    None => b[start..end].fill(0),
                }
            }
        }
    }
    Ok(Rebuilt {
        blocks: names.into_iter().map(|n| String::from_utf8_lossy(&n).into_owned()).zip(blocks).collect(),
        channels: channels.into_iter().map(|c| c.summary).collect(),
    })
}
