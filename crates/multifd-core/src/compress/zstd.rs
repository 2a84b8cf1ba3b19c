//! zstd as QEMU's multifd-zstd: one frame per channel that never ends, `ZSTD_e_flush` after the
//! last page of each packet; the decoder keeps its window between packets.

use std::ptr::NonNull;

use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};
use zstd::zstd_safe::zstd_sys as sys;

use super::{Compressor, Decompressor, check_exact};
use crate::error::{Error, ErrorCode, Result, fail};
use crate::memory::WriteTarget;
use crate::wire::MAX_COMPRESSED_PAYLOAD;

fn zstd_error(what: &str, e: std::io::Error) -> Error {
    Error::new(ErrorCode::Decompress, format!("zstd {what}: {e}"))
}

pub fn compressor(level: u32) -> Result<Box<dyn Compressor>> {
    Ok(Box::new(ZstdCompressor(Encoder::new(level as i32).map_err(|e| zstd_error("init", e))?)))
}

pub fn decompressor() -> Result<Box<dyn Decompressor>> {
    // SAFETY: creates a fresh context (or returns null when out of memory).
    let ctx = unsafe { sys::ZSTD_createDCtx() };
    let ctx = NonNull::new(ctx).ok_or_else(|| Error::new(ErrorCode::Decompress, "zstd init: out of memory"))?;
    Ok(Box::new(ZstdDecompressor(ctx)))
}

struct ZstdCompressor(Encoder<'static>);

impl Compressor for ZstdCompressor {
    fn compress(&mut self, pages: &mut dyn Iterator<Item = &[u8]>, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.resize(MAX_COMPRESSED_PAYLOAD as usize, 0);
        let mut pos = 0;
        let cap = out.len();
        let full = || Error::new(ErrorCode::PayloadSize, format!("zstd output for one packet exceeds {MAX_COMPRESSED_PAYLOAD} bytes"));
        for page in pages {
            let mut input = InBuffer::around(page);
            while input.pos() < page.len() {
                let mut output = OutBuffer::around_pos(out.as_mut_slice(), pos);
                self.0.run(&mut input, &mut output).map_err(|e| zstd_error("compress", e))?;
                if output.pos() == pos && input.pos() < page.len() && pos == cap {
                    return Err(full());
                }
                pos = output.pos();
            }
        }
        loop {
            let mut output = OutBuffer::around_pos(out.as_mut_slice(), pos);
            let left = self.0.flush(&mut output).map_err(|e| zstd_error("flush", e))?;
            pos = output.pos();
            if left == 0 {
                break;
            }
            if pos == cap {
                return Err(full());
            }
        }
        out.truncate(pos);
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
        // SAFETY: a pure function of the code.
        if unsafe { sys::ZSTD_isError(r) } != 0 {
            fail!(Decompress, "zstd decompress: {}", zstd::zstd_safe::get_error_name(r));
        }
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
