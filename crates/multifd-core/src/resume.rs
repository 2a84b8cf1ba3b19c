//! Resumable transfers (docs/PROTOCOL.md, "Resume"): what a destination holds, in pieces.
//!
//! A block is cut into [`PIECE`]-byte pieces (1 MiB, the leaves of the integrity block digest;
//! the last piece of a block may be shorter). A resuming destination offers the pieces it
//! holds with their xxh3-64 ([`crate::integrity::piece_digests`]); the source skips a piece
//! only when its own digest of the piece is equal, so a source that changed between runs is
//! still copied correctly. A piece is *complete* when every one of its pages was received in
//! this session or held from an earlier one ([`RamBlock::received`]); the destination takes
//! the complete pieces of every block at each sync barrier ([`complete_pieces`]), while every
//! channel is parked there, so the set names only pages whose bytes have landed.

use crate::block::RamBlock;
use crate::error::{Result, fail};
pub use crate::integrity::PIECE;

/// Pieces in `block`.
pub fn piece_count(block: &RamBlock) -> u64 {
    block.len().div_ceil(PIECE)
}

/// The pages of piece `index`: first page and count.
fn piece_pages(block: &RamBlock, index: u64) -> (usize, usize) {
    let page = u64::from(block.page_size());
    let first = index * PIECE;
    let end = (first + PIECE).min(block.len());
    ((first / page) as usize, ((end - first) / page) as usize)
}

/// A bitmap of the pieces of `block` whose every page is marked received: bit `i` of byte
/// `i / 8` (least significant first) for piece `i`.
pub fn complete_pieces(block: &RamBlock) -> Vec<u8> {
    let n = piece_count(block);
    let mut bits = vec![0u8; n.div_ceil(8) as usize];
    for i in 0..n {
        let (first, count) = piece_pages(block, i);
        if block.received.is_range_set(first, count) {
            bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }
    bits
}

/// Marks every page of the pieces `indexes` of `block` received: the destination holds them
/// from an earlier session (a zero page later received there is then written explicitly, and
/// the pieces count as complete unless a page of them is received again and cut short).
pub fn mark_held(block: &RamBlock, indexes: &[u64]) -> Result<()> {
    let n = piece_count(block);
    for &i in indexes {
        if i >= n {
            fail!(InvalidArgument, "piece {i} is past the end of block {:?} ({n} pieces)", block.name());
        }
        let (first, count) = piece_pages(block, i);
        block.received.set_range(first, count)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_is_complete_once_every_page_is_received() {
        let b = RamBlock::allocate("b", 2 * PIECE + 8192, 4096, false).unwrap();
        assert_eq!(piece_count(&b), 3);
        assert_eq!(complete_pieces(&b), vec![0]);
        b.received.set_range(0, 255).unwrap();
        assert_eq!(complete_pieces(&b), vec![0], "one page of piece 0 missing");
        b.received.set(255);
        b.received.set_range(512, 2).unwrap();
        assert_eq!(complete_pieces(&b), vec![0b101], "the short last piece is two pages");
        mark_held(&b, &[1]).unwrap();
        assert_eq!(complete_pieces(&b), vec![0b111]);
        assert!(mark_held(&b, &[3]).is_err());
    }
}
