//! End-to-end integrity (optional, negotiated): an xxh3-64 digest of every packet's data pages
//! carried in a reserved header word, and a whole-block digest compared at completion.
//!
//! Block memory is hashed where it lies, with SIMD loads chosen at run time
//! ([`crate::memory::Mapping::xxh3_pages`]). The block digest is a tree whose leaves are the
//! xxh3-64 of each page ([`block_digest`]), and the pass that hashes a packet's pages for its
//! header yields every page's own digest at the same time (one load and one multiply per
//! stripe for both). Each side keeps the page digests it took as pages moved ([`SessionDigests`]): the
//! source as it sent them, from source memory; the destination as they landed, from
//! destination memory. At completion a block's digest combines them (8 bytes per page) and
//! hashes from memory only the pages without one (never sent or received, held from an earlier
//! session, or marked dirty again on the source), instead of a second pass over every block.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use xxhash_rust::xxh3::xxh3_64;

use crate::bitmap::AtomicBitmap;
use crate::block::RamBlock;

/// Bytes of a block per piece: the unit of resume, and of the block digest's middle level (a
/// whole number of pages: page sizes stop at 512 KiB). Small enough to spread a block over
/// every core, large enough that the leaves (8 bytes per MiB) cost nothing to combine.
pub const PIECE: u64 = 1 << 20;

/// Most threads one block digest uses.
const MAX_THREADS: usize = 8;

/// xxh3-64 of pages in private buffers, taken in order (the compression paths hash their copy),
/// and each page's own xxh3-64 in `each`.
pub fn pages_digest<'a>(pages: impl Iterator<Item = &'a [u8]>, each: &mut Vec<u64>) -> u64 {
    each.clear();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    pages.for_each(|p| {
        h.update(p);
        each.push(xxh3_64(p));
    });
    h.digest()
}

/// xxh3-64 of the pages of `block` at `offsets`, taken in order, read in place; each page's own
/// xxh3-64 goes to `each` (from the same pass).
pub fn block_pages_digest(block: &RamBlock, offsets: &[u64], each: &mut Vec<u64>) -> u64 {
    block.memory().xxh3_pages(offsets, block.page_size() as usize, each)
}

/// Pages per piece of the block digest's middle level.
fn pages_per_piece(block: &RamBlock) -> usize {
    (PIECE / u64::from(block.page_size())) as usize
}

/// The block digest compared at completion: xxh3-64 of the concatenated little-endian piece
/// digests, where a piece digest is the xxh3-64 of the concatenated little-endian xxh3-64
/// digests of the piece's pages (the pages of each consecutive [`PIECE`] bytes, the last piece
/// may be shorter). Read from memory, the
/// pieces in parallel on up to one thread per core.
pub fn block_digest(block: &RamBlock) -> u64 {
    tree(block, &|_, _| None)
}

/// The block digest from `known(page index, page offset)` where it says, from memory elsewhere.
fn tree(block: &RamBlock, known: &(dyn Fn(usize, u64) -> Option<u64> + Sync)) -> u64 {
    let page = u64::from(block.page_size());
    let per_piece = pages_per_piece(block);
    let pages = block.pages();
    let leaves = parallel(pages.div_ceil(per_piece), &|i| {
        let first = i * per_piece;
        let count = per_piece.min(pages - first);
        let mut leaves = vec![0u64; count];
        let mut missing: Vec<(usize, u64)> = Vec::new();
        for (k, d) in leaves.iter_mut().enumerate() {
            let at = (first + k) as u64 * page;
            match known(first + k, at) {
                Some(v) => *d = v,
                None => missing.push((k, at)),
            }
        }
        if !missing.is_empty() {
            let offsets: Vec<u64> = missing.iter().map(|m| m.1).collect();
            let mut hashed = Vec::with_capacity(missing.len());
            block_pages_digest(block, &offsets, &mut hashed);
            missing.iter().zip(hashed).for_each(|(&(k, _), d)| leaves[k] = d);
        }
        xxh3_64(&le_bytes(&leaves))
    });
    xxh3_64(&le_bytes(&leaves))
}

fn le_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// The page digests one side took of a block as its pages moved in this session.
pub struct PageDigests {
    digests: Box<[AtomicU64]>,
    /// Pages whose digest is in `digests`.
    known: AtomicBitmap,
    page: u64,
    zero: u64,
}

impl PageDigests {
    pub fn new(block: &RamBlock) -> Self {
        let page = u64::from(block.page_size());
        PageDigests {
            digests: (0..block.pages()).map(|_| AtomicU64::new(0)).collect(),
            known: AtomicBitmap::new(block.pages()),
            page,
            zero: xxh3_64(&vec![0u8; page as usize]),
        }
    }

    /// The pages at `offsets` hash to `digests` (taken from block memory after they were
    /// written there, or before they were sent from it).
    pub fn record(&self, offsets: &[u64], digests: &[u64]) {
        debug_assert_eq!(offsets.len(), digests.len());
        for (&o, &d) in offsets.iter().zip(digests) {
            let i = (o / self.page) as usize;
            self.digests[i].store(d, Ordering::Relaxed);
            self.known.set(i);
        }
    }

    /// The pages at `offsets` are zero pages (found zero on the source, zeroed on the
    /// destination).
    pub fn record_zero(&self, offsets: &[u64]) {
        for &o in offsets {
            let i = (o / self.page) as usize;
            self.digests[i].store(self.zero, Ordering::Relaxed);
            self.known.set(i);
        }
    }

    fn get(&self, index: usize) -> Option<u64> {
        self.known.test(index).then(|| self.digests[index].load(Ordering::Relaxed))
    }
}

/// The page digests of one session, per block (by name, unique in a session).
#[derive(Default)]
pub struct SessionDigests {
    blocks: Mutex<HashMap<String, Arc<PageDigests>>>,
}

impl SessionDigests {
    /// `block`'s page digests, created empty on first use.
    pub fn block(&self, block: &RamBlock) -> Arc<PageDigests> {
        let mut blocks = self.blocks.lock().unwrap();
        match blocks.get(block.name()) {
            Some(d) if d.digests.len() == block.pages() => d.clone(),
            _ => blocks.entry(block.name().to_owned()).insert_entry(Arc::new(PageDigests::new(block))).get().clone(),
        }
    }

    /// `block`'s digest at completion ([`block_digest`]), from the page digests taken as pages
    /// moved; a page without one, or marked in `stale` (the source's dirty bitmap: changed
    /// after it was sent), is hashed from memory. Callers run it once every channel has
    /// delivered or received its last page (the session's last sync barrier).
    pub fn block_digest(&self, block: &RamBlock, stale: Option<&AtomicBitmap>) -> u64 {
        let Some(d) = self.blocks.lock().unwrap().get(block.name()).cloned().filter(|d| d.digests.len() == block.pages()) else {
            return block_digest(block);
        };
        tree(block, &|i, _| if stale.is_some_and(|s| s.test(i)) { None } else { d.get(i) })
    }
}

/// The xxh3-64 of each piece `indexes[i]` of `block` (the [`PIECE`] bytes at `index * PIECE`,
/// the last piece shorter), in the order given: what a resuming destination and source compare
/// (docs/PROTOCOL.md, "Resume"). Hashed in parallel, on up to one thread per core. Panics on
/// an index past the block's end.
pub fn piece_digests(block: &RamBlock, indexes: &[u64]) -> Vec<u64> {
    let len = block.len();
    parallel(indexes.len(), &|i| {
        let at = indexes[i] * PIECE;
        assert!(at < len, "piece {} is past the end of block {:?} ({len} bytes)", indexes[i], block.name());
        block.memory().xxh3_runs(&[(at, PIECE.min(len - at) as usize)])
    })
}

/// `leaf(i)` for `i` in `0..n`, in order, computed on up to one thread per core.
fn parallel(n: usize, leaf: &(dyn Fn(usize) -> u64 + Sync)) -> Vec<u64> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from).min(MAX_THREADS).min(n.div_ceil(8)).max(1);
    let mut leaves = vec![0u64; n];
    if threads == 1 {
        leaves.iter_mut().enumerate().for_each(|(i, d)| *d = leaf(i));
        return leaves;
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return done;
            }
            done.push((i, leaf(i)));
        }
    };
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..threads).map(|_| s.spawn(work)).collect();
        let mut all = work();
        helpers.into_iter().for_each(|h| all.extend(h.join().expect("a digest thread panicked")));
        all.into_iter().for_each(|(i, d)| leaves[i] = d);
    });
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

    /// The definition, spelled out over a private copy with the crate's xxh3.
    fn reference(bytes: &[u8], page: usize) -> u64 {
        let per_piece = PIECE as usize / page * page;
        let pieces: Vec<u8> = bytes.chunks(per_piece).flat_map(|piece| xxh3_64(&piece.chunks(page).flat_map(|p| xxh3_64(p).to_le_bytes()).collect::<Vec<u8>>()).to_le_bytes()).collect();
        xxh3_64(&pieces)
    }

    #[test]
    fn packet_digest_is_xxh3_of_the_pages_in_order_with_each_page_s_own() {
        let b = filled(64 * 4096);
        let bytes = private(&b);
        let offsets = [0u64, 4096, 8192, 40960, 12288, 16384];
        let mut concat = Vec::new();
        offsets.iter().for_each(|&o| concat.extend_from_slice(&bytes[o as usize..o as usize + 4096]));
        let each: Vec<u64> = concat.chunks(4096).map(xxh3_64).collect();
        let mut got = Vec::new();
        assert_eq!(block_pages_digest(&b, &offsets, &mut got), xxh3_64(&concat));
        assert_eq!(got, each);
        assert_eq!(pages_digest(concat.chunks_exact(4096), &mut got), xxh3_64(&concat));
        assert_eq!(got, each);
    }

    #[test]
    fn block_digest_is_a_tree_of_page_digests_under_piece_digests() {
        for len in [4096u64, PIECE, 3 * PIECE + 8192, 20 * PIECE] {
            let b = filled(len);
            assert_eq!(block_digest(&b), reference(&private(&b), 4096), "len {len}");
        }
        // The smallest pages (hashed in two passes, see `Mapping::xxh3_pages`) and the largest.
        for page in [512u32, 512 << 10] {
            let b = RamBlock::allocate("b", 3 * PIECE, page, false).unwrap();
            b.memory().copy_from(PIECE + 1000, &private(&filled(8192)));
            assert_eq!(block_digest(&b), reference(&private(&b), page as usize), "{page}-byte pages");
        }
    }

    #[test]
    fn session_digests_combine_the_page_digests_taken_and_hash_the_rest_from_memory() {
        let b = filled(3 * PIECE + 8192);
        let want = block_digest(&b);
        let all = SessionDigests::default();
        assert_eq!(all.block_digest(&b, None), want, "nothing recorded: all from memory");
        let d = all.block(&b);
        let offsets: Vec<u64> = (0..300).map(|p| p * 4096).collect();
        let mut each = Vec::new();
        block_pages_digest(&b, &offsets, &mut each);
        d.record(&offsets, &each);
        assert_eq!(all.block_digest(&b, None), want, "some recorded, the rest from memory");
        // A recorded page is taken from the record, not from memory again ...
        b.memory().copy_from(4096, &[0xee; 16]);
        assert_eq!(all.block_digest(&b, None), want);
        assert_ne!(block_digest(&b), want);
        // ... unless it is stale (on the source: marked dirty after it was sent).
        let stale = AtomicBitmap::new(b.pages());
        stale.set(1);
        assert_eq!(all.block_digest(&b, Some(&stale)), block_digest(&b));
        // A zero page recorded as such.
        b.memory().fill(0, 4096, 0);
        d.record_zero(&[0]);
        b.memory().copy_from(4096, &private(&filled(3 * PIECE + 8192))[4096..8192]);
        assert_eq!(all.block_digest(&b, None), block_digest(&b));
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
