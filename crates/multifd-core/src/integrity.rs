//! End-to-end integrity (optional, negotiated): an xxh3-64 digest of every packet's data pages
//! carried in a reserved header word, and a whole-block digest compared at completion.

use xxhash_rust::xxh3::Xxh3;

use crate::block::RamBlock;

/// xxh3-64 of pages taken in order.
pub fn pages_digest<'a>(pages: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut h = Xxh3::new();
    pages.for_each(|p| h.update(p));
    h.digest()
}

/// xxh3-64 of a whole block, page by page.
pub fn block_digest(block: &RamBlock) -> u64 {
    let page = u64::from(block.page_size());
    pages_digest((0..block.pages() as u64).map(|p| block.page(p * page)))
}
