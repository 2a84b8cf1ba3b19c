//! End-to-end integrity (optional, negotiated): an xxh3-64 digest of every packet's data pages
//! carried in a reserved header word, and a whole-block digest compared at completion.
//!
//! Block memory is hashed where it lies, with SIMD loads chosen at run time
//! ([`crate::memory::Mapping::xxh3_runs`]); contiguous pages are one run, so a packet's
//! pages are usually one call over up to 512 KiB rather than one per page.

use std::sync::atomic::{AtomicUsize, Ordering};

use xxhash_rust::xxh3::xxh3_64;

use crate::block::RamBlock;

/// Bytes of a block per leaf of the block digest: small enough to spread a block over every
/// core, large enough that the leaves (8 bytes per MiB) cost nothing to combine.
pub const PIECE: u64 = 1 << 20;

/// Most threads one block digest uses.
const MAX_THREADS: usize = 8;

/// xxh3-64 of pages in private buffers, taken in order (the compression paths hash their copy).
pub fn pages_digest<'a>(pages: impl Iterator<Item = &'a [u8]>) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    pages.for_each(|p| h.update(p));
    h.digest()
}

/// xxh3-64 of the pages of `block` at `offsets`, taken in order, read in place.
pub fn block_pages_digest(block: &RamBlock, offsets: &[u64]) -> u64 {
    let page = u64::from(block.page_size());
    let mut runs: Vec<(u64, usize)> = Vec::with_capacity(4);
    for &o in offsets {
        match runs.last_mut() {
            Some((start, len)) if *start + *len as u64 == o => *len += page as usize,
            _ => runs.push((o, page as usize)),
        }
    }
    block.memory().xxh3_runs(&runs)
}

/// The block digest compared at completion: xxh3-64 of the concatenated little-endian xxh3-64
/// digests of the block's consecutive [`PIECE`]-byte pieces (the last one may be shorter).
/// The pieces are hashed in parallel, on up to one thread per core.
pub fn block_digest(block: &RamBlock) -> u64 {
    let all: Vec<u64> = (0..block.len().div_ceil(PIECE)).collect();
    let bytes: Vec<u8> = piece_digests(block, &all).iter().flat_map(|d| d.to_le_bytes()).collect();
    xxh3_64(&bytes)
}

/// The xxh3-64 of each piece `indexes[i]` of `block` (the [`PIECE`] bytes at `index * PIECE`,
/// the last piece shorter), in the order given: the leaves of [`block_digest`], and what a
/// resuming destination and source compare (docs/PROTOCOL.md, "Resume"). Hashed in parallel,
/// on up to one thread per core. Panics on an index past the block's end.
pub fn piece_digests(block: &RamBlock, indexes: &[u64]) -> Vec<u64> {
    let len = block.len();
    let piece = |i: usize| {
        let at = indexes[i] * PIECE;
        assert!(at < len, "piece {} is past the end of block {:?} ({len} bytes)", indexes[i], block.name());
        block.memory().xxh3_runs(&[(at, PIECE.min(len - at) as usize)])
    };
    let pieces = indexes.len();
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(MAX_THREADS).min(pieces.div_ceil(8)).max(1);
    let mut leaves = vec![0u64; pieces];
    if threads == 1 {
        leaves.iter_mut().enumerate().for_each(|(i, d)| *d = piece(i));
    } else {
        let next = AtomicUsize::new(0);
        let work = || {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= pieces {
                    return done;
                }
                done.push((i, piece(i)));
            }
        };
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
            let mut all = work();
            helpers.into_iter().for_each(|h| all.extend(h.join().expect("a digest thread panicked")));
            all.into_iter().for_each(|(i, d)| leaves[i] = d);
        });
    }
    leaves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: u64) -> RamBlock {
        let b = RamBlock::allocate("b", len, 4096, false).unwrap();
        let bytes: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(0x9E37_79B1) >> 7) as u8).collect();
        b.memory().copy_from(0, &bytes);
        b
    }

    fn private(b: &RamBlock) -> Vec<u8> {
        let mut out = vec![0u8; b.len() as usize];
        b.memory().copy_to(0, &mut out);
        out
    }

    #[test]
    fn packet_digest_is_xxh3_of_the_pages_in_order() {
        let b = filled(64 * 4096);
        let bytes = private(&b);
        let offsets = [0u64, 4096, 8192, 40960, 12288, 16384];
        let mut concat = Vec::new();
        offsets.iter().for_each(|&o| concat.extend_from_slice(&bytes[o as usize..o as usize + 4096]));
        assert_eq!(block_pages_digest(&b, &offsets), xxh3_64(&concat));
        assert_eq!(pages_digest(concat.chunks_exact(4096)), xxh3_64(&concat));
    }

    #[test]
    fn block_digest_is_the_digest_of_its_piece_digests() {
        for len in [4096u64, PIECE, 3 * PIECE + 8192, 20 * PIECE] {
            let b = filled(len);
            let bytes = private(&b);
            let leaves: Vec<u8> = bytes.chunks(PIECE as usize).flat_map(|c| xxh3_64(c).to_le_bytes()).collect();
            assert_eq!(block_digest(&b), xxh3_64(&leaves), "len {len}");
        }
    }

    #[test]
    fn piece_digests_are_the_pieces_asked_for_in_order() {
        let b = filled(3 * PIECE + 8192);
        let bytes = private(&b);
        let want = |i: usize| xxh3_64(&bytes[i * PIECE as usize..((i + 1) * PIECE as usize).min(bytes.len())]);
        assert_eq!(piece_digests(&b, &[3, 0, 2]), vec![want(3), want(0), want(2)]);
        assert_eq!(piece_digests(&b, &[]), Vec::<u64>::new());
    }
}
