//! zlib as QEMU's multifd-zlib: a zlib-wrapped deflate stream per channel, never reset or
//! finished, `Z_SYNC_FLUSH` after the last page of each packet.
//!
//! # Backend and levels
//! flate2 over zlib-rs, the only backend that builds here without fetching anything
//! (miniz_oxide, libz-sys and libz-ng-sys are not in the local registry cache). zlib-rs follows zlib-ng, whose level 1
//! is `deflate_quick` (static Huffman codes only): 1.85x zlib's level-1 bytes on text pages
//! and 5.4% larger than its input on random pages. So a user's level (QEMU's
//! `multifd-zlib-level`, meaning zlib's level) maps to the lowest zlib-rs level whose output is
//! within 1.1x of zlib's at that level ([`ZLIB_RS_LEVEL`]). Measured with
//! `examples/compress_levels.rs` (zlib-rs) and Python's `zlib` 1.2.13 (the C zlib QEMU links),
//! bench text pages, one stream flushed every 128 pages, MiB per GiB / CPU s per GiB:
//!
//! | level | zlib          | zlib-rs same level | mapped to | zlib-rs mapped |
//! |-------|---------------|--------------------|-----------|----------------|
//! | 1     | 6.46 / 1.40   | 11.97 / 0.86       | 2         | 6.45 / 1.17    |
//! | 2, 3  | 6.46 / 1.37   | 6.45, 7.07         | 2         | 6.45 / 1.17    |
//! | 4, 5  | 5.77 / 3.04   | 6.45, 8.14         | 7         | 4.64 / 2.39    |
//! | 6, 7  | 4.67, 4.64 / 3.1 | 7.74, 4.64      | 7         | 4.64 / 2.39    |
//! | 8, 9  | 4.22 / 3.3    | 4.22 / 2.5         | 8, 9      | 4.22 / 2.5     |
//!
//! Random pages cost zlib 21 CPU s/GiB at level 1 and zlib-rs 17.5 at level 2 to find nothing
//! to compress. After a packet whose deflate output is no smaller than its pages, the next
//! [`STORED_PACKETS`] packets go out as stored blocks (a copy, 5 bytes per 64 KiB), then
//! deflate is tried again: random data costs about a ninth of the search, at the same
//! bytes. (`deflateParams` to level 0 would be the zlib way, but zlib-rs's `set_level` fails
//! whenever the level changes the deflate function: it flushes with no output buffer.)
//! `bench/compression --size 512M --reps 3` then: 513 vs QEMU's 514 MiB on random, 5 vs 5 MiB
//! on text. The stream stays one valid deflate
//! stream that any inflate, QEMU's included, decodes.

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use super::{Compressor, Decompressor, Payload, check_exact};
use crate::error::{Error, ErrorCode, Result, fail};
use crate::memory::{ReadSource, WriteTarget};
use crate::wire::MAX_COMPRESSED_PAYLOAD;

/// The zlib-rs level for each zlib level 1..=9 (index 0 unused; see the module documentation).
const ZLIB_RS_LEVEL: [u32; 10] = [0, 2, 2, 2, 7, 7, 7, 7, 8, 9];

/// Packets sent stored after one that did not compress.
pub(super) const STORED_PACKETS: u32 = 8;

pub fn compressor(level: u32) -> Result<Box<dyn Compressor>> {
    let level = ZLIB_RS_LEVEL[level as usize];
    Ok(Box::new(ZlibCompressor { z: Compress::new(flate2::Compression::new(level), true), level, stored_for: 0, copy: Vec::new() }))
}

pub fn decompressor() -> Result<Box<dyn Decompressor>> {
    Ok(Box::new(ZlibDecompressor(Decompress::new(true), Vec::new())))
}

struct ZlibCompressor {
    z: Compress,
    /// The zlib-rs level the stream compresses at.
    level: u32,
    /// Packets left to send stored before trying `level` again.
    stored_for: u32,
    /// Block pages copied out for deflate.
    copy: Vec<u8>,
}

fn zlib_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::Decompress, format!("zlib: {e}"))
}

impl Compressor for ZlibCompressor {
    fn compress(&mut self, pages: &ReadSource, out: &mut Vec<u8>) -> Result<Payload<'_>> {
        // deflate reads slices: block pages are copied out first (see `crate::memory`).
        let mut copy = std::mem::take(&mut self.copy);
        let r = match pages.as_slices() {
            Some(s) => self.compress_slices(s, out),
            None => {
                pages.copy_out(&mut copy);
                self.compress_slices(&[&copy], out)
            }
        };
        self.copy = copy;
        r.map(|()| Payload::Packed)
    }
}

impl ZlibCompressor {
    fn compress_slices(&mut self, pages: &[&[u8]], out: &mut Vec<u8>) -> Result<()> {
        if self.stored_for > 0 {
            self.stored_for -= 1;
            stored_blocks(pages, out);
            if self.stored_for == 0 {
                // The deflater never saw the stored bytes, so its window no longer matches the
                // inflater's: a fresh raw deflater (no zlib header) refers only to what it
                // compresses itself, which the inflater's window ends with.
                self.z = Compress::new(flate2::Compression::new(self.level), false);
            }
            return Ok(());
        }
        let in0 = self.z.total_in();
        self.deflate(pages, out)?;
        if out.len() as u64 >= self.z.total_in() - in0 {
            self.stored_for = STORED_PACKETS;
        }
        Ok(())
    }
}

/// Appends `pages` to `out` (cleared first) as deflate stored blocks of up to 64 KiB. The
/// stream is byte-aligned here (every packet ends with a sync flush), so a block is one header
/// byte (not final, type 00, padding), LEN and its complement, then the bytes.
fn stored_blocks(pages: &[&[u8]], out: &mut Vec<u8>) {
    fn close(out: &mut [u8], header: usize) {
        let len = (out.len() - header - 5) as u16;
        out[header + 1..header + 3].copy_from_slice(&len.to_le_bytes());
        out[header + 3..header + 5].copy_from_slice(&(!len).to_le_bytes());
    }
    out.clear();
    let mut header = None;
    for &(mut page) in pages {
        while !page.is_empty() {
            let open = match header {
                Some(h) if out.len() - h - 5 < usize::from(u16::MAX) => h,
                _ => {
                    if let Some(h) = header {
                        close(out, h);
                    }
                    header = Some(out.len());
                    out.extend_from_slice(&[0; 5]);
                    out.len() - 5
                }
            };
            let n = (usize::from(u16::MAX) - (out.len() - open - 5)).min(page.len());
            out.extend_from_slice(&page[..n]);
            page = &page[n..];
        }
    }
    if let Some(h) = header {
        close(out, h);
    }
}

impl ZlibCompressor {
    fn deflate(&mut self, pages: &[&[u8]], out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.reserve(MAX_COMPRESSED_PAYLOAD as usize);
        let mut pages = pages.iter().copied().peekable();
        while let Some(mut page) = pages.next() {
            let flush = if pages.peek().is_none() { FlushCompress::Sync } else { FlushCompress::None };
            loop {
                let before = self.z.total_in();
                if out.len() == out.capacity() {
                    fail!(PayloadSize, "zlib output for one packet exceeds {MAX_COMPRESSED_PAYLOAD} bytes");
                }
                self.z.compress_vec(page, out, flush).map_err(|e| Error::new(ErrorCode::Io, format!("zlib compress: {e}")))?;
                page = &page[(self.z.total_in() - before) as usize..];
                // Done with this page once it is consumed and (on a flush) the output had room left.
                if page.is_empty() && (matches!(flush, FlushCompress::None) || out.len() < out.capacity()) {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The inflater and the buffer it decodes into for block pages (flate2 only writes slices),
/// copied into them after the checks.
struct ZlibDecompressor(Decompress, Vec<u8>);

impl Decompressor for ZlibDecompressor {
    fn decompress(&mut self, input: &[u8], target: &mut WriteTarget) -> Result<()> {
        if let Some(out) = target.as_buffer() {
            return self.inflate(input, out);
        }
        let mut buf = std::mem::take(&mut self.1);
        buf.resize(target.len(), 0);
        let r = self.inflate(input, &mut buf);
        if r.is_ok() {
            target.copy_in(&buf);
        }
        self.1 = buf;
        r
    }
}

impl ZlibDecompressor {
    fn inflate(&mut self, input: &[u8], out: &mut [u8]) -> Result<()> {
        // One spare byte shows a payload that decodes to more than its pages.
        let mut spare = [0u8; 1];
        let (in0, out0) = (self.0.total_in(), self.0.total_out());
        let mut produced = 0usize;
        loop {
            let consumed = (self.0.total_in() - in0) as usize;
            let target: &mut [u8] = if produced < out.len() { &mut out[produced..] } else { &mut spare };
            let before = self.0.total_out();
            let status = self.0.decompress(&input[consumed..], target, FlushDecompress::Sync).map_err(zlib_error)?;
            produced = (self.0.total_out() - out0) as usize;
            if status == Status::StreamEnd {
                fail!(Decompress, "zlib stream ended inside a multifd session (QEMU never finishes the stream)");
            }
            let progress = self.0.total_out() > before || (self.0.total_in() - in0) as usize > consumed;
            if produced > out.len() || !progress || (self.0.total_in() - in0) as usize == input.len() && produced == out.len() {
                break;
            }
        }
        if produced == out.len() {
            // Output is full: anything more the stream would produce makes the payload too long.
            let consumed = (self.0.total_in() - in0) as usize;
            self.0.decompress(&input[consumed..], &mut spare, FlushDecompress::Sync).map_err(zlib_error)?;
            produced = (self.0.total_out() - out0) as usize;
        }
        check_exact("zlib", produced, out.len(), (self.0.total_in() - in0) as usize, input.len())
    }
}
