//! End-to-end integrity (optional, negotiated): an xxh3-64 digest of every packet's data pages
//! carried in a reserved header word, and a whole-block digest compared at completion.

use xxhash_rust::xxh3::Xxh3;

use crate::block::RamBlock;

/// Bytes copied out of block memory per hash update: small enough to stay in L1.
const CHUNK: usize = 4096;

/// xxh3-64 of pages in private buffers, taken in order.
pub fn pages_digest<'a>(pages: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut h = Xxh3::new();
    pages.for_each(|p| h.update(p));
    h.digest()
}

/// xxh3-64 of the pages of `block` at `offsets`, taken in order. Block memory is never hashed
/// in place (see `crate::memory`): each 4 KiB is copied into a stack buffer first, which adds
/// one L1-resident memcpy per 4 KiB to the hash's own cost.
pub fn block_pages_digest(block: &RamBlock, offsets: &[u64]) -> u64 {
    let mut h = Xxh3::new();
    let page = u64::from(block.page_size());
    offsets.iter().for_each(|&o| update(&mut h, block, o, page));
    h.digest()
}

/// xxh3-64 of a whole block.
pub fn block_digest(block: &RamBlock) -> u64 {
    let mut h = Xxh3::new();
    update(&mut h, block, 0, block.len());
    h.digest()
}

/// Feeds `len` bytes of `block` at `offset` to `h`, through a stack buffer.
fn update(h: &mut Xxh3, block: &RamBlock, offset: u64, len: u64) {
    let mut buf = [0u8; CHUNK];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(CHUNK as u64) as usize;
        block.memory().copy_to(at, &mut buf[..n]);
        h.update(&buf[..n]);
        at += n as u64;
    }
}
