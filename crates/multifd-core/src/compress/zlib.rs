//! zlib as QEMU's multifd-zlib: a zlib-wrapped deflate stream per channel, never reset or
//! finished, `Z_SYNC_FLUSH` after the last page of each packet.

use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

use super::{Compressor, Decompressor, check_exact};
use crate::error::{Error, ErrorCode, Result, fail};
use crate::wire::MAX_COMPRESSED_PAYLOAD;

pub fn compressor(level: u32) -> Result<Box<dyn Compressor>> {
    Ok(Box::new(ZlibCompressor(Compress::new(flate2::Compression::new(level), true))))
}

pub fn decompressor() -> Result<Box<dyn Decompressor>> {
    Ok(Box::new(ZlibDecompressor(Decompress::new(true))))
}

struct ZlibCompressor(Compress);

fn zlib_error(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::Decompress, format!("zlib: {e}"))
}

impl Compressor for ZlibCompressor {
    fn compress(&mut self, pages: &mut dyn Iterator<Item = &[u8]>, out: &mut Vec<u8>) -> Result<()> {
        out.clear();
        out.reserve(MAX_COMPRESSED_PAYLOAD as usize);
        let mut pages = pages.peekable();
        while let Some(mut page) = pages.next() {
            let flush = if pages.peek().is_none() { FlushCompress::Sync } else { FlushCompress::None };
            loop {
                let before = self.0.total_in();
                if out.len() == out.capacity() {
                    fail!(PayloadSize, "zlib output for one packet exceeds {MAX_COMPRESSED_PAYLOAD} bytes");
                }
                self.0.compress_vec(page, out, flush).map_err(|e| Error::new(ErrorCode::Io, format!("zlib compress: {e}")))?;
                page = &page[(self.0.total_in() - before) as usize..];
                // Done with this page once it is consumed and (on a flush) the output had room left.
                if page.is_empty() && (matches!(flush, FlushCompress::None) || out.len() < out.capacity()) {
                    break;
                }
            }
        }
        Ok(())
    }
}

struct ZlibDecompressor(Decompress);

impl Decompressor for ZlibDecompressor {
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<()> {
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
