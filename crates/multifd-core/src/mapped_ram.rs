//! QEMU's mapped-ram layout for one block: a 28-byte header, a bitmap of the pages present,
//! and a pages region where page `i` lives at `pages_offset + i * page_size`. Shared by our
//! snapshot files and the reader of QEMU's own files.
//!
//! All header integers are big-endian. The bitmap is an array of little-endian u64 words
//! (page `i` is bit `i % 64` of word `i / 64`), which is QEMU's in-memory bitmap as written by
//! an x86-64 host; we fix that byte order for every host.

use crate::error::{Result, fail};

/// `MAPPED_RAM_HDR_VERSION`.
pub const HEADER_VERSION: u32 = 1;
/// Size of the per-block header.
pub const HEADER_LEN: usize = 28;
/// `MAPPED_RAM_FILE_OFFSET_ALIGNMENT`: where each pages region starts.
pub const PAGES_ALIGN: u64 = 1 << 20;

/// The per-block mapped-ram header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    pub page_size: u64,
    /// Absolute file offset of the bitmap.
    pub bitmap_offset: u64,
    /// Absolute file offset of page 0.
    pub pages_offset: u64,
}

/// Bytes of the bitmap for `pages` pages: whole u64 words.
pub fn bitmap_len(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

impl BlockHeader {
    /// The layout QEMU writes for a block whose header starts at `header_offset`: bitmap right
    /// after the header, pages at the next 1 MiB boundary.
    pub fn layout(header_offset: u64, used_len: u64, page_size: u64) -> Result<Self> {
        if page_size == 0 || !page_size.is_power_of_two() || !used_len.is_multiple_of(page_size) {
            fail!(InvalidArgument, "mapped-ram block of {used_len} bytes with {page_size}-byte pages");
        }
        let bitmap_offset = header_offset + HEADER_LEN as u64;
        let pages_offset = (bitmap_offset + bitmap_len(used_len / page_size)).next_multiple_of(PAGES_ALIGN);
        Ok(BlockHeader { page_size, bitmap_offset, pages_offset })
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&HEADER_VERSION.to_be_bytes());
        out[4..12].copy_from_slice(&self.page_size.to_be_bytes());
        out[12..20].copy_from_slice(&self.bitmap_offset.to_be_bytes());
        out[20..28].copy_from_slice(&self.pages_offset.to_be_bytes());
        out
    }

    /// Parses a header found at `header_offset` and checks it describes a block of
    /// `used_len` bytes that fits in a file of `file_len` bytes: version 1, a power-of-two
    /// page size (equal to `expect_page_size` when given), the bitmap after the header and
    /// before the pages, a page-aligned pages region, everything inside the file.
    pub fn decode(bytes: &[u8], header_offset: u64, used_len: u64, file_len: u64, expect_page_size: Option<u64>) -> Result<Self> {
        let Some(b) = bytes.first_chunk::<HEADER_LEN>() else {
            fail!(Truncated, "mapped-ram header needs {HEADER_LEN} bytes, got {}", bytes.len());
        };
        let version = u32::from_be_bytes(b[0..4].try_into().unwrap());
        if version != HEADER_VERSION {
            fail!(BadVersion, "mapped-ram header version {version}, expected {HEADER_VERSION}");
        }
        let h = BlockHeader {
            page_size: u64::from_be_bytes(b[4..12].try_into().unwrap()),
            bitmap_offset: u64::from_be_bytes(b[12..20].try_into().unwrap()),
            pages_offset: u64::from_be_bytes(b[20..28].try_into().unwrap()),
        };
        if !h.page_size.is_power_of_two() || !(512..=(1 << 21)).contains(&h.page_size) {
            fail!(FileFormat, "mapped-ram page size {} is not a power of two from 512 to 2 MiB", h.page_size);
        }
        if let Some(p) = expect_page_size.filter(|&p| p != h.page_size) {
            fail!(FileFormat, "mapped-ram page size {} differs from the expected {p}", h.page_size);
        }
        if !used_len.is_multiple_of(h.page_size) {
            fail!(FileFormat, "block length {used_len} is not a multiple of the page size {}", h.page_size);
        }
        let bitmap_end = h.bitmap_offset.checked_add(bitmap_len(used_len / h.page_size));
        let pages_end = h.pages_offset.checked_add(used_len);
        if h.bitmap_offset < header_offset + HEADER_LEN as u64 || bitmap_end.is_none_or(|e| e > h.pages_offset) {
            fail!(FileFormat, "mapped-ram bitmap at {} does not fit between the header at {header_offset} and the pages at {}", h.bitmap_offset, h.pages_offset);
        }
        if !h.pages_offset.is_multiple_of(h.page_size) {
            fail!(FileFormat, "mapped-ram pages offset {} is not page-aligned", h.pages_offset);
        }
        // The pages region may end past the file (a sparse tail); a present page there is an
        // error when it is read, not here.
        if pages_end.is_none() {
            fail!(FileFormat, "mapped-ram pages region at {} overflows", h.pages_offset);
        }
        if bitmap_end.is_none_or(|e| e > file_len) {
            fail!(FileFormat, "mapped-ram bitmap at {} runs past the end of the file ({file_len} bytes)", h.bitmap_offset);
        }
        Ok(h)
    }

    /// File offset just after this block's pages region (where QEMU's next block starts).
    pub fn end(&self, used_len: u64) -> u64 {
        self.pages_offset + used_len
    }
}

/// Decodes a bitmap read from a file into u64 words (little-endian on every host).
pub fn bitmap_words(bytes: &[u8]) -> Vec<u64> {
    bytes.chunks(8).map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
    }).collect()
}

/// Encodes bitmap words for the file.
pub fn bitmap_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    /// The spec's worked example: 1 GiB block, header at 0x1A0.
    #[test]
    fn qemu_worked_example() {
        let h = BlockHeader::layout(0x1a0, 1 << 30, 4096).unwrap();
        assert_eq!(h.bitmap_offset, 0x1bc);
        assert_eq!(h.pages_offset, 0x100000);
        assert_eq!(h.end(1 << 30), 0x4010_0000);
        assert_eq!(bitmap_len((1 << 30) / 4096), 32768);
        let bytes = h.encode();
        assert_eq!(bytes[..4], [0, 0, 0, 1]);
        assert_eq!(BlockHeader::decode(&bytes, 0x1a0, 1 << 30, 0x4010_0000, Some(4096)).unwrap(), h);
    }

    #[test]
    fn bad_headers_are_refused() {
        let h = BlockHeader::layout(0, 64 << 20, 4096).unwrap();
        let file = h.end(64 << 20);
        let with = |f: &dyn Fn(&mut [u8; HEADER_LEN])| {
            let mut b = h.encode();
            f(&mut b);
            BlockHeader::decode(&b, 0, 64 << 20, file, Some(4096)).unwrap_err().code
        };
        assert_eq!(with(&|b| b[3] = 2), ErrorCode::BadVersion);
        assert_eq!(with(&|b| b[4..12].copy_from_slice(&0u64.to_be_bytes())), ErrorCode::FileFormat);
        assert_eq!(with(&|b| b[4..12].copy_from_slice(&8192u64.to_be_bytes())), ErrorCode::FileFormat);
        assert_eq!(with(&|b| b[12..20].copy_from_slice(&4u64.to_be_bytes())), ErrorCode::FileFormat);
        assert_eq!(with(&|b| b[20..28].copy_from_slice(&(h.pages_offset + 1).to_be_bytes())), ErrorCode::FileFormat);
        assert_eq!(with(&|b| b[12..20].copy_from_slice(&u64::MAX.to_be_bytes())), ErrorCode::FileFormat);
        assert_eq!(BlockHeader::decode(&h.encode()[..27], 0, 64 << 20, file, None).unwrap_err().code, ErrorCode::Truncated);
    }

    #[test]
    fn bitmap_byte_order_is_little_endian() {
        let words = vec![0b1011u64, 1 << 63];
        let bytes = bitmap_bytes(&words);
        assert_eq!(bytes[0], 0b1011);
        assert_eq!(bytes[15], 0x80);
        assert_eq!(bitmap_words(&bytes), words);
        assert_eq!(bitmap_words(&bytes[..9]), vec![0b1011, 0]);
    }
}
