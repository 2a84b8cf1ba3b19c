//! zstd as QEMU's multifd-zstd: one frame per channel that never ends (except around packets
//! that do not compress, below), `ZSTD_e_flush` after the last page of each packet; the
//! decoder keeps its window between packets.
//!
//! Both directions use zstd-sys contexts directly: the compressor reads block pages through
//! raw pointers (zstd copies its input into its own window, so no staging copy on our side),
//! and the decoder writes straight into the destination pages (zstd copies its output out of
//! its own window, so none there either). The parameters are QEMU's: the level alone
//! (`ZSTD_initCStream(level)`), every other parameter zstd's default, the same frame.
//!
//! # Incompressible packets
//! zstd spends most of a random page's cost finding that it does not compress, then copies
//! it twice on each side (into its window, out as a raw block). So, as zlib does
//! (`zlib::STORED_PACKETS`), a packet that does not shrink is followed by [`RAW_PACKETS`]
//! packets sent as frames of their own made of raw blocks: the packet that did not shrink
//! ends the stream's frame (`ZSTD_e_end` after its flush: an empty last block, which the
//! decoder reads together with the packet's last page), each raw packet is then a complete
//! frame with its pages spliced in as they are ([`Payload::Spliced`], no copy on the sender),
//! and the next packet zstd compresses starts a new frame. Any zstd decoder takes
//! concatenated frames (QEMU's page-by-page `ZSTD_decompressStream` loop does, as long as a
//! frame never ends before a page is full); ours copies a raw frame's blocks straight into
//! the pages, once, without zstd. The bytes on the wire grow by 6 per raw packet (the frame
//! header) and 3 per switch; zstd's own raw blocks cost 3 per 128 KiB either way.

use std::ptr::NonNull;

use zstd::zstd_safe::zstd_sys as sys;

use super::{Compressor, Decompressor, Payload, Piece, check_exact};
use crate::error::{Error, ErrorCode, Result};
use crate::memory::{ReadSource, WriteTarget};
use crate::wire::MAX_COMPRESSED_PAYLOAD;

pub fn compressor(level: u32) -> Result<Box<dyn Compressor>> {
    // SAFETY: creates a fresh context (or returns null when out of memory).
    let ctx = NonNull::new(unsafe { sys::ZSTD_createCCtx() }).ok_or_else(|| Error::new(ErrorCode::Io, "zstd init: out of memory"))?;
    let c = ZstdCompressor { ctx, raw_for: 0, window: None, pieces: Vec::new() };
    // SAFETY: our context; sets its level (QEMU's `ZSTD_initCStream(level)` does the same).
    check(unsafe { sys::ZSTD_CCtx_setParameter(ctx.as_ptr(), sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level as i32) }, ErrorCode::InvalidArgument, "level")?;
    Ok(Box::new(c))
}

pub fn decompressor() -> Result<Box<dyn Decompressor>> {
    // SAFETY: creates a fresh context (or returns null when out of memory).
    let ctx = NonNull::new(unsafe { sys::ZSTD_createDCtx() }).ok_or_else(|| Error::new(ErrorCode::Decompress, "zstd init: out of memory"))?;
    Ok(Box::new(ZstdDecompressor { ctx, at_frame_start: true, blocks: Vec::new() }))
}

/// Packets sent as raw frames after one that did not compress.
pub(super) const RAW_PACKETS: u32 = 8;

/// A zstd frame's magic number, little-endian.
const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
/// The largest block: 128 KiB (`ZSTD_BLOCKSIZE_MAX`), or the window if smaller.
const MAX_BLOCK: usize = 128 << 10;
/// The largest block a frame with window descriptor `descriptor` may hold (the descriptor's
/// mantissa ignored: at most the window).
fn max_block(descriptor: u8) -> usize {
    MAX_BLOCK.min(1usize.checked_shl(10 + u32::from(descriptor >> 3)).unwrap_or(usize::MAX))
}
/// A block header: last-block flag, type (0 = raw), size, 3 bytes little-endian.
fn raw_block_header(len: usize, last: bool) -> [u8; 3] {
    let h = (len as u32) << 3 | u32::from(last);
    [h as u8, (h >> 8) as u8, (h >> 16) as u8]
}

/// `r`, or an error with `code` when zstd says it is one.
fn check(r: usize, code: ErrorCode, what: &str) -> Result<usize> {
    // SAFETY: a pure function of the code.
    if unsafe { sys::ZSTD_isError(r) } != 0 {
        return Err(Error::new(code, format!("zstd {what}: {}", zstd::zstd_safe::get_error_name(r))));
    }
    Ok(r)
}

/// A compression context of its own (zstd-sys), so the input can be the raw pointers of a
/// [`ReadSource`] rather than slices.
struct ZstdCompressor {
    ctx: NonNull<sys::ZSTD_CCtx>,
    /// Packets left to send as raw frames before zstd tries again.
    raw_for: u32,
    /// The window descriptor of zstd's frames (header byte 5), once one was seen; raw
    /// frames declare the same window, so the decoder keeps its buffers.
    window: Option<u8>,
    /// A raw packet's layout (see [`Payload::Spliced`]).
    pieces: Vec<Piece>,
}

// SAFETY: the context is owned by this value and used only through `&mut self`, by one thread
// at a time; zstd contexts are not tied to the thread that made them.
unsafe impl Send for ZstdCompressor {}

impl Drop for ZstdCompressor {
    fn drop(&mut self) {
        // SAFETY: the context this value created, freed once.
        unsafe { sys::ZSTD_freeCCtx(self.ctx.as_ptr()) };
    }
}

impl Compressor for ZstdCompressor {
    fn compress(&mut self, pages: &ReadSource, out: &mut Vec<u8>) -> Result<Payload<'_>> {
        if self.raw_for > 0
            && let Some(window) = self.window
        {
            self.raw_for -= 1;
            self.raw_frame(window, pages.len(), out);
            return Ok(Payload::Spliced(&self.pieces));
        }
        self.stream(pages, out)?;
        if self.window.is_none() {
            // The first packet begins with the frame header: magic, a descriptor with no
            // dictionary, checksum or content size (zstd's streaming frame), the window.
            self.window = (out.len() > 6 && out[..4] == MAGIC && out[4] == 0).then(|| out[5]);
        }
        if out.len() >= pages.len() && self.window.is_some() {
            self.end_frame(out)?;
            self.raw_for = RAW_PACKETS;
        }
        Ok(Payload::Packed)
    }
}

impl ZstdCompressor {
    /// Ends zstd's frame after the packet in `out` (its next packet starts a new one).
    fn end_frame(&mut self, out: &mut Vec<u8>) -> Result<()> {
        // An empty last block (3 bytes, no checksum), and room to spare.
        out.reserve(64);
        let mut outb = sys::ZSTD_outBuffer { dst: out.as_mut_ptr().cast(), size: out.capacity(), pos: out.len() };
        let mut inb = sys::ZSTD_inBuffer { src: [0u8; 0].as_ptr().cast(), size: 0, pos: 0 };
        // SAFETY: `outb` is `out`'s allocation, `size` its capacity, from `pos` on unwritten;
        // the input is empty. The context is ours.
        let left = check(unsafe { sys::ZSTD_compressStream2(self.ctx.as_ptr(), &mut outb, &mut inb, sys::ZSTD_EndDirective::ZSTD_e_end) }, ErrorCode::Io, "end")?;
        if left != 0 {
            return Err(Error::new(ErrorCode::Io, "zstd end: the frame's end did not fit"));
        }
        // SAFETY: zstd initialised the bytes up to `outb.pos <= capacity`.
        unsafe { out.set_len(outb.pos) };
        Ok(())
    }

    /// A raw packet: a frame of raw blocks whose bytes are the pages, spliced in.
    fn raw_frame(&mut self, window: u8, len: usize, out: &mut Vec<u8>) {
        out.clear();
        self.pieces.clear();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0, window]);
        let block = max_block(window);
        let mut at = 0;
        loop {
            let n = block.min(len - at);
            out.extend_from_slice(&raw_block_header(n, at + n == len));
            self.pieces.push(Piece::Out(if at == 0 { out.len() } else { 3 }));
            if n > 0 {
                self.pieces.push(Piece::Pages(n));
            }
            at += n;
            if at == len {
                return;
            }
        }
    }

    /// One packet through zstd's stream, into `out`.
    fn stream(&mut self, pages: &ReadSource, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.reserve(MAX_COMPRESSED_PAYLOAD as usize);
        let mut outb = sys::ZSTD_outBuffer { dst: out.as_mut_ptr().cast(), size: MAX_COMPRESSED_PAYLOAD as usize, pos: 0 };
        let mut regions = pages.regions().peekable();
        while let Some((ptr, len)) = regions.next() {
            // QEMU flushes with the last page; the last region ends with that page.
            let last = regions.peek().is_none();
            let mode = if last { sys::ZSTD_EndDirective::ZSTD_e_flush } else { sys::ZSTD_EndDirective::ZSTD_e_continue };
            let mut inb = sys::ZSTD_inBuffer { src: ptr.cast(), size: len, pos: 0 };
            loop {
                // SAFETY: `inb` is a region of `pages`, readable while it lives (zstd `memcpy`s
                // it into its own window in its default buffered-input mode, see
                // `crate::memory`); `outb` is `out`'s allocation, reserved above for `size`
                // bytes. The context is ours.
                let left = check(unsafe { sys::ZSTD_compressStream2(self.ctx.as_ptr(), &mut outb, &mut inb, mode) }, ErrorCode::Io, "compress")?;
                if inb.pos == inb.size && (!last || left == 0) {
                    break;
                }
                if outb.pos == outb.size {
                    return Err(Error::new(ErrorCode::PayloadSize, format!("zstd output for one packet exceeds {MAX_COMPRESSED_PAYLOAD} bytes")));
                }
            }
        }
        // SAFETY: zstd initialised the first `outb.pos <= size` bytes of the allocation.
        unsafe { out.set_len(outb.pos) };
        Ok(())
    }
}

/// A decompression context of its own (zstd-sys), so the output buffer can be built from the
/// raw pointers of a [`WriteTarget`] rather than a slice.
struct ZstdDecompressor {
    ctx: NonNull<sys::ZSTD_DCtx>,
    /// The stream is between frames (zstd's context holds nothing).
    at_frame_start: bool,
    /// A raw frame's blocks, (offset, length) in the payload.
    blocks: Vec<(usize, usize)>,
}

// SAFETY: the context is owned by this value and used only through `&mut self`, by one thread
// at a time; zstd contexts are not tied to the thread that made them.
unsafe impl Send for ZstdDecompressor {}

impl Drop for ZstdDecompressor {
    fn drop(&mut self) {
        // SAFETY: the context this value created, freed once.
        unsafe { sys::ZSTD_freeDCtx(self.ctx.as_ptr()) };
    }
}

impl ZstdDecompressor {
    /// One `ZSTD_decompressStream` call; true when it read input or wrote output.
    fn step(&mut self, input: &mut sys::ZSTD_inBuffer, output: &mut sys::ZSTD_outBuffer) -> Result<bool> {
        let (read, made) = (input.pos, output.pos);
        // SAFETY: `input` describes a live slice (the payload) and `output` either a private
        // buffer or a region of a `WriteTarget`, writable for `size` bytes while the target
        // lives (see `crate::memory`: zstd's default buffered-output mode only `memcpy`s into
        // it, never past `size`, and never reads it back). The context is ours.
        let r = unsafe { sys::ZSTD_decompressStream(self.ctx.as_ptr(), output, input) };
        check(r, ErrorCode::Decompress, "decompress")?;
        let progress = input.pos > read || output.pos > made;
        if progress {
            // Zero: a frame ended and everything it held is out.
            self.at_frame_start = r == 0;
        }
        Ok(progress)
    }
}

/// The raw blocks of `input` when it is exactly one frame of raw blocks holding `expected`
/// bytes (and nothing zstd would check: no dictionary, checksum or content size), as
/// (offset in `input`, length) pairs; `None` for anything else, which zstd then decodes.
fn raw_frame_blocks(input: &[u8], expected: usize, blocks: &mut Vec<(usize, usize)>) -> Option<()> {
    blocks.clear();
    if input.len() < 6 || input[..4] != MAGIC || input[4] != 0 {
        return None;
    }
    let max = max_block(input[5]);
    let (mut at, mut total) = (6, 0);
    loop {
        let h = input.get(at..at + 3)?;
        let h = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
        let (last, kind, n) = (h & 1 == 1, (h >> 1) & 3, (h >> 3) as usize);
        if kind != 0 || n > max || at + 3 + n > input.len() {
            return None;
        }
        blocks.push((at + 3, n));
        (at, total) = (at + 3 + n, total + n);
        if last {
            return (at == input.len() && total == expected).then_some(());
        }
    }
}

impl Decompressor for ZstdDecompressor {
    fn decompress(&mut self, input: &[u8], out: &mut WriteTarget) -> Result<()> {
        if self.at_frame_start && raw_frame_blocks(input, out.len(), &mut self.blocks).is_some() {
            // A whole frame of raw blocks: copied into the pages as they come; zstd's context
            // stays between frames.
            let mut at = 0;
            for &(from, n) in &self.blocks {
                out.copy_in_at(at, &input[from..from + n]);
                at += n;
            }
            return Ok(());
        }
        let mut inb = sys::ZSTD_inBuffer { src: input.as_ptr().cast(), size: input.len(), pos: 0 };
        let expected = out.len();
        let mut produced = 0usize;
        for region in out.regions() {
            let mut outb = sys::ZSTD_outBuffer { dst: region.iov_base, size: region.iov_len, pos: 0 };
            while outb.pos < outb.size {
                if !self.step(&mut inb, &mut outb)? {
                    // Input used up and nothing held back: the payload is short.
                    return check_exact("zstd", produced + outb.pos, expected, inb.pos, input.len());
                }
            }
            produced += outb.pos;
        }
        // Pages full: the rest of the input (the flush's empty block) must decode to nothing,
        // and the decoder must hold nothing more. One spare byte shows a payload that is long.
        let mut spare = [0u8; 1];
        loop {
            let mut outb = sys::ZSTD_outBuffer { dst: spare.as_mut_ptr().cast(), size: 1, pos: 0 };
            let progress = self.step(&mut inb, &mut outb)?;
            produced += outb.pos;
            if outb.pos > 0 || !progress {
                break;
            }
        }
        check_exact("zstd", produced, expected, inb.pos, input.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::tests::pack;
    use crate::error::ErrorCode;
    use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer};

    const PAGE: usize = 4096;

    fn random_packet(seed: u64) -> Vec<Vec<u8>> {
        let mut x = seed * 2 + 1;
        (0..128).map(|_| (0..PAGE).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; (x >> 24) as u8 }).collect()).collect()
    }

    fn text_packet(seed: u64) -> Vec<Vec<u8>> {
        (0..128).map(|i| format!("page {seed}:{i} ").bytes().chain(b"The quick brown fox. ".iter().copied().cycle()).take(PAGE).collect()).collect()
    }

    /// QEMU's receiver (`multifd-zstd.c`): each page decoded on its own, looping while zstd
    /// returns more than 0, input is left and the page has room.
    fn qemu_decode(d: &mut DCtx, payload: &[u8], pages: usize) -> Vec<u8> {
        let mut input = InBuffer::around(payload);
        let mut got = vec![0u8; pages * PAGE];
        for page in got.chunks_exact_mut(PAGE) {
            let mut out = OutBuffer::around(page);
            loop {
                let ret = d.decompress_stream(&mut out, &mut input).expect("QEMU's loop: zstd error");
                if !(ret > 0 && input.pos() < payload.len() && out.pos() < PAGE) {
                    assert!(ret == 0 || out.pos() == PAGE, "QEMU's loop: decompressStream buffer too small");
                    break;
                }
            }
            assert_eq!(out.pos(), PAGE);
        }
        assert_eq!(input.pos(), payload.len());
        got
    }

    #[test]
    fn incompressible_packets_go_out_as_raw_frames_of_the_pages() {
        let mut c = compressor(1).unwrap();
        let mut ours = decompressor().unwrap();
        let mut qemu = DCtx::create();
        // Random (through zstd), random as raw frames, then text through zstd again, twice over.
        let round = RAW_PACKETS as usize + 3;
        let packets: Vec<_> = (0..2 * round).map(|i| if i % round <= RAW_PACKETS as usize { random_packet(i as u64) } else { text_packet(i as u64) }).collect();
        let mut out = Vec::new();
        for (i, ps) in packets.iter().enumerate() {
            let slices: Vec<&[u8]> = ps.iter().map(|p| p.as_slice()).collect();
            let pages = ReadSource::slices(&slices);
            let payload = c.compress(&pages, &mut out).unwrap();
            let raw = (1..=RAW_PACKETS as usize).contains(&(i % round));
            assert_eq!(matches!(payload, Payload::Spliced(_)), raw, "packet {i}");
            let len = payload.len(&out);
            if raw {
                // The pages go out where they are: every page byte is an iovec into the pages.
                let mut iov = Vec::new();
                payload.push_iovecs(&out, &pages, &mut iov, 0);
                let into_pages: usize = iov.iter().filter(|v| slices.iter().any(|p| p.as_ptr_range().contains(&v.iov_base.cast_const().cast()))).map(|v| v.iov_len).sum();
                assert_eq!(into_pages, 128 * PAGE, "packet {i}");
                // A frame header, four block headers, and the old frame's end once.
                assert_eq!(len, 128 * PAGE + 6 + 4 * 3, "packet {i}");
            } else if i % round > RAW_PACKETS as usize {
                assert!(len < 128 * PAGE / 10, "packet {i}: text compresses again ({len} bytes)");
            }
            payload.into_bytes(&mut out, &pages);
            assert_eq!(out.len(), len);
            let mut got = vec![0u8; 128 * PAGE];
            ours.decompress(&out, &mut WriteTarget::buffer(&mut got)).unwrap();
            assert!(got == ps.concat(), "packet {i}: our decoder");
            assert!(qemu_decode(&mut qemu, &out, 128) == ps.concat(), "packet {i}: QEMU's decoding loop");
        }
    }

    #[test]
    fn raw_frames_fill_scattered_pages_and_nothing_else() {
        let m = crate::memory::Mapping::anonymous(256 * PAGE, false).unwrap();
        let mut c = compressor(1).unwrap();
        let mut d = decompressor().unwrap();
        for (i, ps) in (0..3).map(random_packet).enumerate() {
            let mut out = Vec::new();
            pack(c.as_mut(), &ps.iter().map(|p| p.as_slice()).collect::<Vec<_>>(), &mut out);
            m.fill(0, 256 * PAGE, 0xee);
            // Every other page of the mapping, so block boundaries fall between regions.
            let iov: Vec<_> = (0..128).map(|p| m.iovec((2 * p * PAGE) as u64, PAGE)).collect();
            // SAFETY: iovecs of a live private mapping no reference covers.
            d.decompress(&out, &mut unsafe { WriteTarget::pages(&iov) }).unwrap();
            let mut got = vec![0u8; PAGE];
            for p in 0..256 {
                m.copy_to((p * PAGE) as u64, &mut got);
                if p % 2 == 0 {
                    assert!(got == ps[p / 2], "packet {i} page {}", p / 2);
                } else {
                    assert!(got.iter().all(|&b| b == 0xee), "packet {i} wrote between pages");
                }
            }
        }
    }

    #[test]
    fn a_raw_frame_of_the_wrong_size_is_refused() {
        let ps = random_packet(1);
        let slices: Vec<&[u8]> = ps.iter().map(|p| p.as_slice()).collect();
        let mut c = compressor(1).unwrap();
        let mut first = Vec::new();
        pack(c.as_mut(), &slices, &mut first);
        let mut raw = Vec::new();
        pack(c.as_mut(), &slices, &mut raw);
        let fresh = || {
            let mut d = decompressor().unwrap();
            d.decompress(&first, &mut WriteTarget::buffer(&mut vec![0; 128 * PAGE])).unwrap();
            d
        };
        for (what, payload, pages) in [("short", &raw[..raw.len() - 1], 128), ("more pages", &raw[..], 129), ("fewer pages", &raw[..], 127)] {
            let e = fresh().decompress(payload, &mut WriteTarget::buffer(&mut vec![0; pages * PAGE])).unwrap_err();
            assert!(matches!(e.code, ErrorCode::PayloadSize | ErrorCode::Decompress), "{what}: {e}");
        }
    }
}
