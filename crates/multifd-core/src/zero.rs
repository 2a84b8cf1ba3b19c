//! Zero-page detection, run on every page the sender sees.

/// True when every byte of `page` is zero.
///
/// Folds 256-byte blocks with OR over `u64` words (which the compiler vectorises) and stops at
/// the first block that has a set bit, so data pages usually exit after one block.
pub fn is_zero(page: &[u8]) -> bool {
    const BLOCK: usize = 256;
    let mut blocks = page.chunks_exact(BLOCK);
    for block in &mut blocks {
        let folded = block
            .chunks_exact(8)
            .fold(0u64, |acc, w| acc | u64::from_ne_bytes(w.try_into().unwrap()));
        if folded != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_any_set_byte() {
        for len in [0, 1, 255, 256, 257, 4096, 65536] {
            let mut page = vec![0u8; len];
            assert!(is_zero(&page));
            for at in [0, len / 2, len.saturating_sub(1)] {
                if len == 0 {
                    continue;
                }
                page[at] = 0x80;
                assert!(!is_zero(&page), "len {len} at {at}");
                page[at] = 0;
            }
        }
    }
}
