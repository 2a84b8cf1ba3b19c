//! zstd for multifd-zstd, one frame per packet: a stream any zstd decoder reads (QEMU's
//! page-by-page `ZSTD_decompressStream` loop included, which takes concatenated frames as long
//! as a frame never ends before a page is full), with the costs of QEMU's single endless frame
//! per channel taken out.
//!
//! # Why a frame per packet
//! In QEMU's stream (`ZSTD_e_flush` after each packet, the frame never ending) zstd cannot
//! work in place on either side: the compressor copies every page into its window before
//! looking at it, and the decoder writes every page into its window, then copies it out. On
//! compressible data those two copies were a third of the transfer's CPU. A packet that is a
//! frame of its own, with its size in the header, needs neither when its pages are one run of
//! memory (contiguous pages, the common case): `ZSTD_compress2` reads the run where it is, and
//! zstd's stream decoder, given a whole frame whose size it knows and one output buffer that
//! holds it, decodes it there in one pass, taking matches from the pages it has just written.
//! Pages in several runs go through zstd's stream with its copies, still one frame per packet.
//! The price is the history a packet no longer borrows from the ones before it, some tens of
//! bytes per packet on text (docs/ARCHITECTURE.md has the figures); QEMU's streams, which never
//! end a frame, are still decoded with zstd's stream.
//!
//! Compressing in place reads block memory that the application may write meanwhile. zstd's
//! fast and double-fast match finders (levels up to [`IN_PLACE_MAX_LEVEL`]) bound every read
//! by the run's end whatever the bytes they see, and a frame always decodes to exactly the
//! run's length; a page written during its compression can decode to bytes it never held, as
//! a page written during `writev` can arrive torn, and either is dirty and sent again. Higher
//! levels' parsers are only given zstd's own copy.
//!
//! The parameters are QEMU's: the level alone, every other parameter zstd's default.
//!
//! # Incompressible packets
//! zstd spends most of a random page's cost finding that it does not compress, then copies
//! it twice on each side (into its window, out as a raw block). So, as zlib does
//! (`zlib::STORED_PACKETS`), a packet that does not shrink is followed by [`RAW_PACKETS`]
//! packets sent as frames of raw blocks with the pages spliced in as they are
//! ([`Payload::Spliced`], no copy on the sender); ours copies a raw frame's blocks straight
//! into the pages, once, without zstd. A raw packet costs 6 bytes of frame header and 3 per
//! 128 KiB block.

use std::ptr::NonNull;

use zstd::zstd_safe::zstd_sys as sys;

use super::{Compressor, Decompressor, Payload, Piece, check_exact};
use crate::error::{Error, ErrorCode, Result};
use crate::memory::{ReadSource, WriteTarget};
use crate::wire::MAX_COMPRESSED_PAYLOAD;

pub fn compressor(level: u32) -> Result<Box<dyn Compressor>> {
    Ok(Box::new(ZstdCompressor::new(level)?))
}

pub fn decompressor() -> Result<Box<dyn Decompressor>> {
    Ok(Box::new(ZstdDecompressor::new()?))
}

/// Packets sent as raw frames after one that did not compress.
pub(super) const RAW_PACKETS: u32 = 8;

/// The highest level whose match finder zstd runs on the pages in place (fast at 1 and 2,
/// double-fast at 3 and 4, for inputs of a packet's size); level 0 is zstd's default, 3.
const IN_PLACE_MAX_LEVEL: u32 = 4;

/// A raw frame's window descriptor: 512 KiB (a packet), so its blocks may be 128 KiB.
const RAW_WINDOW: u8 = 9 << 3;

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
    /// The level lets zstd read a run of pages in place (see the module's documentation).
    in_place: bool,
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
        if self.raw_for > 0 {
            self.raw_for -= 1;
            self.raw_frame(pages.len(), out);
            return Ok(Payload::Spliced(&self.pieces));
        }
        self.frame(pages, out)?;
        if out.len() >= pages.len() {
            self.raw_for = RAW_PACKETS;
        }
        Ok(Payload::Packed)
    }
}

impl ZstdCompressor {
    fn new(level: u32) -> Result<Self> {
        // SAFETY: creates a fresh context (or returns null when out of memory).
        let ctx = NonNull::new(unsafe { sys::ZSTD_createCCtx() }).ok_or_else(|| Error::new(ErrorCode::Io, "zstd init: out of memory"))?;
        let c = ZstdCompressor { ctx, raw_for: 0, in_place: level <= IN_PLACE_MAX_LEVEL, pieces: Vec::new() };
        // SAFETY: our context; sets its level (QEMU's `ZSTD_initCStream(level)` does the same).
        check(unsafe { sys::ZSTD_CCtx_setParameter(ctx.as_ptr(), sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level as i32) }, ErrorCode::InvalidArgument, "level")?;
        Ok(c)
    }

    /// A raw packet: a frame of raw blocks whose bytes are the pages, spliced in.
    fn raw_frame(&mut self, len: usize, out: &mut Vec<u8>) {
        out.clear();
        self.pieces.clear();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&[0, RAW_WINDOW]);
        let block = max_block(RAW_WINDOW);
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

    /// One packet as one frame, into `out`: in place when its pages are one run and the level
    /// allows it, through zstd's stream otherwise.
    fn frame(&mut self, pages: &ReadSource, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.reserve(MAX_COMPRESSED_PAYLOAD as usize);
        let cap = MAX_COMPRESSED_PAYLOAD as usize;
        let mut regions = pages.regions();
        if let (Some((ptr, len)), None, true) = (regions.next(), regions.next(), self.in_place) {
            // SAFETY: the run is readable for `len` bytes while `pages` lives, and zstd only
            // reads it, each read bounded by its end (see the module's documentation on
            // block memory written meanwhile); `out`'s allocation holds `cap` bytes. The
            // context is ours.
            let n = check(unsafe { sys::ZSTD_compress2(self.ctx.as_ptr(), out.as_mut_ptr().cast(), cap, ptr.cast(), len) }, ErrorCode::Io, "compress")?;
            // SAFETY: zstd initialised the first `n <= cap` bytes.
            unsafe { out.set_len(n) };
            return Ok(());
        }
        // SAFETY: our context, between frames; the size makes the frame say how long it is.
        unsafe {
            check(sys::ZSTD_CCtx_reset(self.ctx.as_ptr(), sys::ZSTD_ResetDirective::ZSTD_reset_session_only), ErrorCode::Io, "reset")?;
            check(sys::ZSTD_CCtx_setPledgedSrcSize(self.ctx.as_ptr(), pages.len() as u64), ErrorCode::Io, "size")?;
        }
        let mut outb = sys::ZSTD_outBuffer { dst: out.as_mut_ptr().cast(), size: cap, pos: 0 };
        let mut regions = pages.regions().peekable();
        while let Some((ptr, len)) = regions.next() {
            let last = regions.peek().is_none();
            let mode = if last { sys::ZSTD_EndDirective::ZSTD_e_end } else { sys::ZSTD_EndDirective::ZSTD_e_continue };
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

/// The largest window a frame may ask the decoder for: 2^25 bytes (32 MiB), what zstd's level
/// 20 uses (QEMU's highest `multifd-zstd-level`, and ours). zstd's default, 2^27, let a frame
/// header of a few bytes reserve 128 MiB per channel; a frame asking for more than this is
/// refused before anything is allocated. A frame decoded in one pass (its whole content in
/// the pages, as ours are) needs no window at all.
const WINDOW_LOG_MAX: i32 = 25;

impl ZstdDecompressor {
    fn new() -> Result<Self> {
        // SAFETY: creates a fresh context (or returns null when out of memory).
        let ctx = NonNull::new(unsafe { sys::ZSTD_createDCtx() }).ok_or_else(|| Error::new(ErrorCode::Decompress, "zstd init: out of memory"))?;
        let d = ZstdDecompressor { ctx, at_frame_start: true, blocks: Vec::new() };
        // SAFETY: the context just made, ours.
        check(unsafe { sys::ZSTD_DCtx_setParameter(d.ctx.as_ptr(), sys::ZSTD_dParameter::ZSTD_d_windowLogMax, WINDOW_LOG_MAX) }, ErrorCode::Decompress, "window limit")?;
        Ok(d)
    }

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

    /// A frame with no content size asking for a `window_log` window, of one RLE block making
    /// `PAGE` bytes of 'A' (zstd decodes it; it is no raw frame).
    fn frame_asking_window(window_log: u8) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.push(0); // no content size, not single-segment, no checksum, no dictionary
        f.push((window_log - 10) << 3); // window descriptor: exponent, mantissa 0
        let h = (PAGE as u32) << 3 | 1 << 1 | 1; // last block, RLE, PAGE bytes
        f.extend_from_slice(&h.to_le_bytes()[..3]);
        f.push(b'A');
        f
    }

    #[test]
    fn a_frame_asking_for_a_window_past_level_20s_is_refused_before_it_is_allocated() {
        // QEMU's stream at its highest level (20): no content size, zstd's level-20 window.
        let mut qemu = zstd::zstd_safe::CCtx::create();
        qemu.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(20)).unwrap();
        let pages = text_packet(7).concat();
        let mut payload = vec![0u8; 2 * pages.len()];
        let mut out = OutBuffer::around(&mut payload[..]);
        let mut input = InBuffer::around(&pages);
        while qemu.compress_stream2(&mut out, &mut input, sys::ZSTD_EndDirective::ZSTD_e_flush).unwrap() > 0 || input.pos() < pages.len() {}
        let n = out.pos();
        payload.truncate(n);
        assert_eq!(payload[5] >> 3, 25 - 10, "level 20 asks for a 2^25 window");
        let mut ours = decompressor().unwrap();
        let mut got = vec![0u8; pages.len()];
        ours.decompress(&payload, &mut WriteTarget::buffer(&mut got)).unwrap();
        assert!(got == pages, "QEMU's level-20 stream decodes");

        for (window_log, ok) in [(25, true), (26, false), (27, false)] {
            let mut d = ZstdDecompressor::new().unwrap();
            let mut page = vec![0u8; PAGE];
            let r = d.decompress(&frame_asking_window(window_log), &mut WriteTarget::buffer(&mut page));
            if ok {
                r.unwrap();
                assert!(page.iter().all(|&b| b == b'A'));
            } else {
                assert_eq!(r.unwrap_err().code, ErrorCode::Decompress, "window 2^{window_log}");
                assert!(dctx_bytes(&d) < 1 << 20, "window 2^{window_log}: nothing allocated ({} bytes)", dctx_bytes(&d));
            }
        }
    }

    /// Bytes a context holds: its tables, and its window and staging buffers once it needed them.
    fn cctx_bytes(c: &ZstdCompressor) -> usize {
        // SAFETY: a live context of ours.
        unsafe { sys::ZSTD_sizeof_CCtx(c.ctx.as_ptr()) }
    }
    fn dctx_bytes(d: &ZstdDecompressor) -> usize {
        // SAFETY: a live context of ours.
        unsafe { sys::ZSTD_sizeof_DCtx(d.ctx.as_ptr()) }
    }

    /// `n` pages of `m` from page `first`, every `step`th page, as the data path's iovecs
    /// (contiguous pages merged into one run).
    fn runs(m: &crate::memory::Mapping, first: usize, n: usize, step: usize) -> Vec<libc::iovec> {
        let mut iov: Vec<libc::iovec> = Vec::new();
        for p in (0..n).map(|i| first + i * step) {
            match iov.last_mut() {
                Some(v) if v.iov_base as usize + v.iov_len == m.iovec((p * PAGE) as u64, PAGE).iov_base as usize => v.iov_len += PAGE,
                _ => iov.push(m.iovec((p * PAGE) as u64, PAGE)),
            }
        }
        iov
    }

    #[test]
    fn a_packet_is_a_frame_of_its_own_made_and_decoded_in_place_when_its_pages_are_one_run() {
        let src = crate::memory::Mapping::anonymous(256 * PAGE, false).unwrap();
        let dst = crate::memory::Mapping::anonymous(256 * PAGE, false).unwrap();
        // One pair works on runs (as contiguous block pages are), the other on every other page.
        let (mut c_run, mut c_scattered) = (ZstdCompressor::new(1).unwrap(), ZstdCompressor::new(1).unwrap());
        let (mut d_run, mut d_scattered) = (ZstdDecompressor::new().unwrap(), ZstdDecompressor::new().unwrap());
        let mut qemu = DCtx::create();
        for i in 0..4 {
            let ps = text_packet(i);
            for (step, c, d) in [(1, &mut c_run, &mut d_run), (2, &mut c_scattered, &mut d_scattered)] {
                for (k, p) in ps.iter().enumerate() {
                    src.copy_from((k * step * PAGE) as u64, p);
                }
                let from = runs(&src, 0, 128, step);
                assert_eq!(from.len(), if step == 1 { 1 } else { 128 });
                let mut out = Vec::new();
                // SAFETY: iovecs of a live private mapping no reference covers.
                let payload = c.compress(&unsafe { ReadSource::pages(&from) }, &mut out).unwrap();
                assert!(matches!(payload, Payload::Packed));
                // A whole frame that says how long it is, so a decoder can write it in place.
                // SAFETY: reads headers within a live slice.
                let (size, content) = unsafe { (sys::ZSTD_findFrameCompressedSize(out.as_ptr().cast(), out.len()), sys::ZSTD_getFrameContentSize(out.as_ptr().cast(), out.len())) };
                assert_eq!((size, content), (out.len(), (128 * PAGE) as u64), "packet {i}, step {step}");
                assert!(out.len() < 128 * PAGE / 10, "packet {i}: text compresses ({} bytes)", out.len());
                dst.fill(0, 256 * PAGE, 0xee);
                let into = runs(&dst, 1, 128, step);
                // SAFETY: as above.
                d.decompress(&out, &mut unsafe { WriteTarget::pages(&into) }).unwrap();
                let mut got = vec![0u8; PAGE];
                for p in 0..256 {
                    dst.copy_to((p * PAGE) as u64, &mut got);
                    let k = (p as isize - 1) / step as isize;
                    if p >= 1 && (p - 1) % step == 0 && k < 128 {
                        assert!(got == ps[k as usize], "packet {i}, step {step}: page {k}");
                    } else {
                        assert!(got.iter().all(|&b| b == 0xee), "packet {i}, step {step}: wrote page {p}, outside the pages");
                    }
                }
                assert!(qemu_decode(&mut qemu, &out, 128) == ps.concat(), "packet {i}, step {step}: QEMU's decoding loop");
            }
        }
        // In place, neither side needed zstd's window (512 KiB, and its staging buffers).
        assert!(cctx_bytes(&c_run) + (512 << 10) <= cctx_bytes(&c_scattered), "compressor: {} vs {} bytes", cctx_bytes(&c_run), cctx_bytes(&c_scattered));
        assert!(dctx_bytes(&d_run) + (512 << 10) <= dctx_bytes(&d_scattered), "decoder: {} vs {} bytes", dctx_bytes(&d_run), dctx_bytes(&d_scattered));
    }

    #[test]
    fn a_frame_decoded_in_place_of_the_wrong_size_or_corrupt_is_refused_within_its_run() {
        let ps = text_packet(7);
        let slices: Vec<&[u8]> = ps.iter().map(|p| p.as_slice()).collect();
        let mut frame = Vec::new();
        pack(compressor(1).unwrap().as_mut(), &slices, &mut frame);
        let mut corrupt = frame.clone();
        let at = corrupt.len() / 2;
        corrupt[at] ^= 0x5a;
        let dst = crate::memory::Mapping::anonymous(130 * PAGE, false).unwrap();
        for (what, payload, pages, codes) in [
            ("fewer pages", &frame, 127, &[ErrorCode::PayloadSize][..]),
            ("more pages", &frame, 129, &[ErrorCode::PayloadSize]),
            ("short", &frame[..frame.len() - 1].to_vec(), 128, &[ErrorCode::PayloadSize, ErrorCode::Decompress]),
            ("corrupt", &corrupt, 128, &[ErrorCode::PayloadSize, ErrorCode::Decompress]),
        ] {
            dst.fill(0, 130 * PAGE, 0xee);
            let mut d = ZstdDecompressor::new().unwrap();
            let into = runs(&dst, 0, pages, 1);
            // SAFETY: iovecs of a live private mapping no reference covers.
            let e = d.decompress(payload, &mut unsafe { WriteTarget::pages(&into) }).unwrap_err();
            assert!(codes.contains(&e.code), "{what}: {e}");
            let mut after = vec![0u8; (130 - pages) * PAGE];
            dst.copy_to((pages * PAGE) as u64, &mut after);
            assert!(after.iter().all(|&b| b == 0xee), "{what}: wrote past the run");
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
