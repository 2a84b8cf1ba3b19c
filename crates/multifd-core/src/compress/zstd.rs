//! zstd as QEMU's multifd-zstd: one frame per channel that never ends, `ZSTD_e_flush` after the
//! last page of each packet; the decoder keeps its window between packets.

use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

use super::{Compressor, Decompressor, check_exact};
use crate::error::{Error, ErrorCode, Result};
use crate::wire::MAX_COMPRESSED_PAYLOAD;

fn zstd_error(what: &str, e: std::io::Error) -> Error {
    Error::new(ErrorCode::Decompress, format!("zstd {what}: {e}"))
}

pub fn compressor(level: u32) -> Result<Box<dyn Compressor>> {
    Ok(Box::new(ZstdCompressor(Encoder::new(level as i32).map_err(|e| zstd_error("init", e))?)))
}

pub fn decompressor() -> Result<Box<dyn Decompressor>> {
    Ok(Box::new(ZstdDecompressor(Decoder::new().map_err(|e| zstd_error("init", e))?)))
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

struct ZstdDecompressor(Decoder<'static>);

impl Decompressor for ZstdDecompressor {
    fn decompress(&mut self, input: &[u8], out: &mut [u8]) -> Result<()> {
        let mut inb = InBuffer::around(input);
        let mut produced = 0usize;
        let mut spare = [0u8; 1];
        loop {
            let (read0, made0) = (inb.pos(), produced);
            if produced < out.len() {
                let mut outb = OutBuffer::around_pos(&mut *out, produced);
                self.0.run(&mut inb, &mut outb).map_err(|e| zstd_error("decompress", e))?;
                produced = outb.pos();
            } else {
                let mut outb = OutBuffer::around(&mut spare[..]);
                self.0.run(&mut inb, &mut outb).map_err(|e| zstd_error("decompress", e))?;
                produced += outb.pos();
            }
            if produced > out.len() {
                break;
            }
            let progress = inb.pos() > read0 || produced > made0;
            if !progress || (inb.pos() == input.len() && produced == out.len()) {
                break;
            }
            if inb.pos() == input.len() && produced < out.len() {
                // Input used up: one more call with no input drains what the decoder holds.
                let mut outb = OutBuffer::around_pos(&mut *out, produced);
                self.0.run(&mut InBuffer::around(&[]), &mut outb).map_err(|e| zstd_error("decompress", e))?;
                if outb.pos() == produced {
                    break;
                }
                produced = outb.pos();
            }
        }
        if produced == out.len() {
            // The decoder may have swallowed all input and still hold output: probe for it.
            let mut outb = OutBuffer::around(&mut spare[..]);
            self.0.run(&mut inb, &mut outb).map_err(|e| zstd_error("decompress", e))?;
            produced += outb.pos();
        }
        check_exact("zstd", produced, out.len(), inb.pos(), input.len())
    }
}
