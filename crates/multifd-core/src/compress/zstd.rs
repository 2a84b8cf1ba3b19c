//! zstd as QEMU's multifd-zstd: one frame per channel that never ends, `ZSTD_e_flush` after the
//! last page of each packet; the decoder keeps its window between packets.
//!
//! Both directions use zstd-sys contexts directly: the compressor reads block pages through
//! raw pointers (zstd copies its input into its own window, so no staging copy on our side),
//! and the decoder writes straight into the destination pages (zstd copies its output out of
//! its own window, so none there either). The parameters are QEMU's: the level alone
//! (`ZSTD_initCStream(level)`), every other parameter zstd's default, the same frame.

use std::ptr::NonNull;

use zstd::zstd_safe::zstd_sys as sys;

use super::{Compressor, Decompressor, check_exact};
use crate::error::{Error, ErrorCode, Result};
use crate::memory::{ReadSource, WriteTarget};
use crate::wire::MAX_COMPRESSED_PAYLOAD;

pub fn compressor(level: u32) -> Result<Box<dyn Compressor>> {
    // SAFETY: creates a fresh context (or returns null when out of memory).
    let ctx = NonNull::new(unsafe { sys::ZSTD_createCCtx() }).ok_or_else(|| Error::new(ErrorCode::Io, "zstd init: out of memory"))?;
    let c = ZstdCompressor(ctx);
    // SAFETY: our context; sets its level (QEMU's `ZSTD_initCStream(level)` does the same).
    check(unsafe { sys::ZSTD_CCtx_setParameter(ctx.as_ptr(), sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level as i32) }, ErrorCode::InvalidArgument, "level")?;
    Ok(Box::new(c))
}

pub fn decompressor() -> Result<Box<dyn Decompressor>> {
    // SAFETY: creates a fresh context (or returns null when out of memory).
    let ctx = NonNull::new(unsafe { sys::ZSTD_createDCtx() }).ok_or_else(|| Error::new(ErrorCode::Decompress, "zstd init: out of memory"))?;
    Ok(Box::new(ZstdDecompressor(ctx)))
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
struct ZstdCompressor(NonNull<sys::ZSTD_CCtx>);

// SAFETY: the context is owned by this value and used only through `&mut self`, by one thread
// at a time; zstd contexts are not tied to the thread that made them.
unsafe impl Send for ZstdCompressor {}

impl Drop for ZstdCompressor {
    fn drop(&mut self) {
        // SAFETY: the context this value created, freed once.
        unsafe { sys::ZSTD_freeCCtx(self.0.as_ptr()) };
    }
}

impl Compressor for ZstdCompressor {
    fn compress(&mut self, pages: &ReadSource, out: &mut Vec<u8>) -> Result<()> {
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
                let left = check(unsafe { sys::ZSTD_compressStream2(self.0.as_ptr(), &mut outb, &mut inb, mode) }, ErrorCode::Io, "compress")?;
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
struct ZstdDecompressor(NonNull<sys::ZSTD_DCtx>);

// SAFETY: the context is owned by this value and used only through `&mut self`, by one thread
// at a time; zstd contexts are not tied to the thread that made them.
unsafe impl Send for ZstdDecompressor {}

impl Drop for ZstdDecompressor {
    fn drop(&mut self) {
        // SAFETY: the context this value created, freed once.
        unsafe { sys::ZSTD_freeDCtx(self.0.as_ptr()) };
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
        let r = unsafe { sys::ZSTD_decompressStream(self.0.as_ptr(), output, input) };
        check(r, ErrorCode::Decompress, "decompress")?;
        Ok(input.pos > read || output.pos > made)
    }
}

impl Decompressor for ZstdDecompressor {
    fn decompress(&mut self, input: &[u8], out: &mut WriteTarget) -> Result<()> {
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
