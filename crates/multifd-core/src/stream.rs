//! Decoding captured multifd channel byte streams (QEMU's or ours) back into blocks, for
//! tests against real QEMU, `multifd inspect --rebuild`, and recovery.
//!
//! Each stream is one channel: a 64-byte init packet, then packets. Pages of different
//! channels are ordered only by SYNC packets, so every channel is cut into segments at its
//! SYNCs and segment k of every channel is applied before segment k+1 of any.

use std::cell::RefCell;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::compress::{self, Decompressor};
use crate::error::{Error, ErrorCode, Result, fail};
use crate::output_dir::{OutputDir, file_name_for};
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

/// One channel stream, decoded a segment (up to and including a SYNC) at a time; memory is
/// one packet's decompressed pages, whatever the stream holds.
struct ChannelDecoder<'a> {
    stream: &'a [u8],
    at: usize,
    geometry: Geometry,
    summary: ChannelSummary,
    method: Option<(Compression, Option<Box<dyn Decompressor>>)>,
    header: PacketHeader,
    pages: Vec<u8>,
}

impl<'a> ChannelDecoder<'a> {
    fn new(stream: &'a [u8], geometry: Geometry) -> Result<Self> {
        let init = InitPacket::decode(stream)?;
        let summary = ChannelSummary {
            channel_id: init.channel_id,
            uuid: init.uuid,
            compression: Compression::None,
            packets: 0,
            syncs: 0,
            normal_pages: 0,
            zero_pages: 0,
            payload_bytes: 0,
        };
        Ok(ChannelDecoder { stream, at: INIT_PACKET_LEN, geometry, summary, method: None, header: PacketHeader::default(), pages: Vec::new() })
    }

    fn done(&self) -> bool {
        self.at >= self.stream.len()
    }

    /// Decodes packets up to and including the next SYNC, or to the end of the stream, and
    /// calls `page(block, offset, data)` for every page in order (`None` for a zero page).
    fn segment(&mut self, names: &Names, mut page: impl FnMut(usize, u64, Option<&[u8]>) -> Result<()>) -> Result<()> {
        let geometry = self.geometry;
        let size = geometry.page_size() as usize;
        while self.at < self.stream.len() {
            let (at, id, n) = (self.at, self.summary.channel_id, self.summary.packets);
            let where_ = |e: Error| e.context(format!("channel {id} packet {n} at byte {at}"));
            let rest = &self.stream[at..];
            let header = &mut self.header;
            header.decode_into(rest, geometry).map_err(where_)?;
            if self.method.is_none() && header.has_pages() {
                let c = header.flags.method().map_err(where_)?;
                self.method = Some((c, compress::decompressor(c).map_err(where_)?));
                self.summary.compression = c;
            }
            let compression = self.method.as_ref().map_or(Compression::None, |m| m.0);
            let v = PacketValidator { geometry, compression, blocks: names }.validate(header).map_err(where_)?;
            let body = &rest[geometry.header_len()..];
            let payload_len = v.payload_len as usize;
            if body.len() < payload_len {
                return Err(where_(Error::new(ErrorCode::Truncated, format!("payload of {payload_len} bytes, only {} left", body.len()))));
            }
            let payload = &body[..payload_len];
            if let Some(block) = v.block {
                let normal = header.normal_pages as usize;
                let data: &[u8] = match self.method.as_mut().and_then(|m| m.1.as_mut()) {
                    Some(d) if normal > 0 => {
                        self.pages.resize(normal * size, 0);
                        d.decompress(payload, &mut crate::memory::WriteTarget::buffer(&mut self.pages)).map_err(where_)?;
                        &self.pages
                    }
                    _ => payload,
                };
                for (i, &o) in header.normal_offsets().iter().enumerate() {
                    page(block, o, Some(&data[i * size..(i + 1) * size])).map_err(where_)?;
                }
                for &o in header.zero_offsets() {
                    page(block, o, None).map_err(where_)?;
                }
            }
            self.summary.packets += 1;
            self.summary.normal_pages += u64::from(header.normal_pages);
            self.summary.zero_pages += u64::from(header.zero_pages);
            self.summary.payload_bytes += payload_len as u64;
            self.at += geometry.header_len() + payload_len;
            if header.flags.is_sync() {
                self.summary.syncs += 1;
                break;
            }
        }
        Ok(())
    }
}

/// Decodes `streams` as a destination applies them: segment k of every channel (in the order
/// given) before segment k+1 of any. `page` sees every page; returns the channels' summaries.
fn replay(streams: &[&[u8]], geometry: Geometry, names: &Names, max_blocks: usize, mut page: impl FnMut(usize, u64, Option<&[u8]>) -> Result<()>) -> Result<Vec<ChannelSummary>> {
    let mut channels = streams.iter().map(|s| ChannelDecoder::new(s, geometry)).collect::<Result<Vec<_>>>()?;
    if let Some(c) = channels.windows(2).find(|w| w[0].summary.uuid != w[1].summary.uuid) {
        fail!(UuidMismatch, "channel streams come from different sessions (channel {} has another UUID)", c[1].summary.channel_id);
    }
    while channels.iter().any(|c| !c.done()) {
        for c in channels.iter_mut().filter(|c| !c.done()) {
            c.segment(names, |block, offset, data| {
                if block >= max_blocks {
                    fail!(OffsetRange, "the captures carry more than {max_blocks} blocks");
                }
                page(block, offset, data)
            })?;
        }
    }
    Ok(channels.into_iter().map(|c| c.summary).collect())
}

/// Most blocks a capture may carry.
pub const MAX_BLOCKS: usize = 4096;

/// Rebuilds the blocks carried by `streams` (one per channel, any order) in memory. Blocks
/// longer than `max_block_len` bytes are refused (`ERR_MULTIFD_OFFSET_RANGE`), so a hostile
/// capture cannot make this allocate without bound; [`rebuild_to_dir`] writes sparse files
/// instead and bounds the total.
pub fn rebuild(streams: &[&[u8]], geometry: Geometry, max_block_len: u64) -> Result<Rebuilt> {
    let names = Names { names: RefCell::new(Vec::new()), max_len: max_block_len };
    let size = geometry.page_size() as usize;
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let channels = replay(streams, geometry, &names, MAX_BLOCKS, |block, offset, data| {
        if blocks.len() <= block {
            blocks.resize(block + 1, Vec::new());
        }
        let b = &mut blocks[block];
        let (start, end) = (offset as usize, offset as usize + size);
        if b.len() < end {
            b.resize(end, 0);
        }
        match data {
            Some(d) => b[start..end].copy_from_slice(d),
            None => b[start..end].fill(0),
        }
        Ok(())
    })?;
    let names = names.names.into_inner();
    blocks.resize(names.len(), Vec::new());
    Ok(Rebuilt { blocks: names.into_iter().map(|n| String::from_utf8_lossy(&n).into_owned()).zip(blocks).collect(), channels })
}

/// A block [`rebuild_to_dir`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuiltFile {
    pub name: String,
    pub path: PathBuf,
    /// Bytes: up to the end of the highest page seen.
    pub len: u64,
}

/// Rebuilds the blocks carried by `streams` into sparse files in `dir`, one per block, named
/// by [`file_name_for`] and created without following links or replacing anything
/// (`ERR_MULTIFD_OUTPUT_EXISTS`). A first pass decodes everything and sizes the blocks, so a
/// capture whose blocks add up to more than `max_total` bytes is refused
/// (`ERR_MULTIFD_OFFSET_RANGE`) before any file is created; the second writes the pages with
/// positioned writes (zero pages stay holes unless they cover data) into partial files that are
/// moved into place at the end. On any error nothing is left in `dir`.
pub fn rebuild_to_dir(streams: &[&[u8]], geometry: Geometry, dir: &Path, max_total: u64) -> Result<(Vec<RebuiltFile>, Vec<ChannelSummary>)> {
    let names = Names { names: RefCell::new(Vec::new()), max_len: max_total };
    let size = geometry.page_size() as u64;
    let mut lens: Vec<u64> = Vec::new();
    let mut total = 0u64;
    replay(streams, geometry, &names, MAX_BLOCKS, |block, offset, _| {
        if lens.len() <= block {
            lens.resize(block + 1, 0);
        }
        let end = offset + size;
        if end > lens[block] {
            total += end - lens[block];
            lens[block] = end;
            if total > max_total {
                fail!(OffsetRange, "the captured blocks add up to more than the {max_total} bytes allowed (page at offset {offset})");
            }
        }
        Ok(())
    })?;
    let names: Vec<String> = names.names.into_inner().into_iter().map(|n| String::from_utf8_lossy(&n).into_owned()).collect();
    let files: Vec<String> = names.iter().map(|n| file_name_for(n)).collect();
    if let Some((i, f)) = files.iter().enumerate().find(|(i, f)| files[..*i].contains(f)) {
        fail!(DuplicateBlock, "blocks {:?} and {:?} would both be written to {f}", names[files.iter().position(|x| x == f).unwrap()], names[i]);
    }
    let mut out = OutputDir::open(dir)?;
    for f in &files {
        out.check_free(f)?;
    }
    let mut handles = Vec::with_capacity(files.len());
    for (f, &len) in files.iter().zip(&lens) {
        let file = out.create(f)?;
        file.set_len(len).map_err(|e| write_err(dir, f, e))?;
        handles.push(file);
    }
    // Pages written with data, per block: a later zero page over one must write zeros.
    let mut data: Vec<Vec<u64>> = lens.iter().map(|l| vec![0u64; (l / size).div_ceil(64) as usize]).collect();
    let names2 = Names { names: RefCell::new(Vec::new()), max_len: max_total };
    let zeros = vec![0u8; size as usize];
    let channels = replay(streams, geometry, &names2, MAX_BLOCKS, |block, offset, page| {
        let (p, bits) = ((offset / size) as usize, &mut data[block]);
        let (word, bit) = (p / 64, 1u64 << (p % 64));
        let bytes = match page {
            Some(d) => {
                bits[word] |= bit;
                d
            }
            None if bits[word] & bit != 0 => {
                bits[word] &= !bit;
                &zeros
            }
            None => return Ok(()),
        };
        handles[block].write_all_at(bytes, offset).map_err(|e| write_err(dir, &files[block], e))
    })?;
    drop(handles);
    let paths = out.commit()?;
    Ok((names.into_iter().zip(paths).zip(lens).map(|((name, path), len)| RebuiltFile { name, path, len }).collect(), channels))
}

fn write_err(dir: &Path, file: &str, e: std::io::Error) -> Error {
    let code = if e.raw_os_error() == Some(libc::ENOSPC) { ErrorCode::NoSpace } else { ErrorCode::Io };
    Error::new(code, format!("write {}: {e}", dir.join(file).display()))
}
