//! One bit per page, shared between threads: dirty tracking on the source, received pages on
//! the destination. Range operations touch whole words at a time.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Result, fail};

const BITS: usize = 64;

/// A fixed-size bitmap of atomic words. All methods take `&self`, so one bitmap can be shared
/// by a JavaScript writer marking dirty ranges and a channel thread taking a round.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    len: usize,
}

/// Mask of bits `lo..hi` within one word (`hi` <= 64, `lo` < `hi`).
fn mask(lo: usize, hi: usize) -> u64 {
    let upper = if hi == BITS { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl AtomicBitmap {
    /// A bitmap of `len` clear bits.
    pub fn new(len: usize) -> Self {
        AtomicBitmap { words: (0..len.div_ceil(BITS)).map(|_| AtomicU64::new(0)).collect(), len }
    }

    /// Number of bits (pages).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check_range(&self, start: usize, count: usize) -> Result<()> {
        if start.checked_add(count).is_none_or(|end| end > self.len) {
            fail!(InvalidArgument, "page range {start}+{count} is outside a bitmap of {} pages", self.len);
        }
        Ok(())
    }

    /// Applies `op(word, mask)` to every word that bits `start..start+count` touch.
    fn for_range(&self, start: usize, count: usize, mut op: impl FnMut(&AtomicU64, u64)) -> Result<()> {
        self.check_range(start, count)?;
        let end = start + count;
        let mut bit = start;
        while bit < end {
            let word = bit / BITS;
            let hi = (end - word * BITS).min(BITS);
            op(&self.words[word], mask(bit % BITS, hi));
            bit = (word + 1) * BITS;
        }
        Ok(())
    }

    /// Panics if `bit >= len()`, as slice indexing does.
    pub fn set(&self, bit: usize) {
        assert!(bit < self.len, "bit {bit} out of range for {} bits", self.len);
        self.words[bit / BITS].fetch_or(1 << (bit % BITS), Ordering::Relaxed);
    }

    /// Sets `bit` and returns whether it was set before.
    pub fn test_and_set(&self, bit: usize) -> bool {
        assert!(bit < self.len, "bit {bit} out of range for {} bits", self.len);
        let m = 1 << (bit % BITS);
        self.words[bit / BITS].fetch_or(m, Ordering::Relaxed) & m != 0
    }

    pub fn clear(&self, bit: usize) {
        assert!(bit < self.len, "bit {bit} out of range for {} bits", self.len);
        self.words[bit / BITS].fetch_and(!(1 << (bit % BITS)), Ordering::Relaxed);
    }

    pub fn test(&self, bit: usize) -> bool {
        assert!(bit < self.len, "bit {bit} out of range for {} bits", self.len);
        self.words[bit / BITS].load(Ordering::Relaxed) & (1 << (bit % BITS)) != 0
    }

    /// Release ordering: a writer that changes a page and then marks it dirty makes the change
    /// visible to whoever takes the bit (`take` acquires), so the round that sends the page
    /// reads the new bytes, even from another thread on a weakly ordered CPU.
    pub fn set_range(&self, start: usize, count: usize) -> Result<()> {
        self.for_range(start, count, |w, m| {
            w.fetch_or(m, Ordering::Release);
        })
    }

    pub fn clear_range(&self, start: usize, count: usize) -> Result<()> {
        self.for_range(start, count, |w, m| {
            w.fetch_and(!m, Ordering::Relaxed);
        })
    }

    /// Whether every bit of `start..start+count` is set (false for a range outside).
    pub fn is_range_set(&self, start: usize, count: usize) -> bool {
        let mut all = true;
        let inside = self.for_range(start, count, |w, m| all &= w.load(Ordering::Acquire) & m == m);
        inside.is_ok() && all
    }

    pub fn set_all(&self) {
        self.set_range(0, self.len).expect("whole range is in bounds");
    }

    pub fn clear_all(&self) {
        self.words.iter().for_each(|w| w.store(0, Ordering::Relaxed));
    }

    /// Number of set bits.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum()
    }

    /// Atomically takes every set bit and clears it: the pages dirtied since the last round.
    /// A bit set concurrently lands either in the snapshot or in the bitmap, never neither.
    pub fn take(&self) -> PageSet {
        PageSet { words: self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect(), len: self.len }
    }

    /// A copy of the current bits without clearing them.
    pub fn snapshot(&self) -> PageSet {
        PageSet { words: self.words.iter().map(|w| w.load(Ordering::Acquire)).collect(), len: self.len }
    }

    /// Runs of consecutive set bits, as `(first, count)`, read word by word as it goes.
    pub fn runs(&self) -> Runs<impl Fn(usize) -> u64 + '_> {
        Runs::new(self.len, move |i| self.words[i].load(Ordering::Relaxed))
    }
}

/// A plain (non-atomic) set of pages, e.g. one round's dirty pages taken from an
/// [`AtomicBitmap`]. Bit `i` of word `i / 64` is page `i`: the same little-endian order as
/// QEMU's mapped-ram bitmap on x86.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    words: Vec<u64>,
    len: usize,
}

impl PageSet {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn test(&self, bit: usize) -> bool {
        bit < self.len && self.words[bit / BITS] & (1 << (bit % BITS)) != 0
    }

    pub fn runs(&self) -> Runs<impl Fn(usize) -> u64 + '_> {
        Runs::new(self.len, move |i| self.words[i])
    }
}

/// Runs of set bits (`set`) or of clear bits among the first `len` bits of `words` (bit `i` in
/// word `i / 64`), as `(first, count)`: the one run finder for page bitmaps read from files.
pub fn word_runs(words: &[u64], len: usize, set: bool) -> Runs<impl Fn(usize) -> u64 + '_> {
    assert!(words.len() * BITS >= len, "{} words hold fewer than {len} bits", words.len());
    Runs::new(len, move |i| if set { words[i] } else { !words[i] })
}

/// Iterator over runs of set bits, `(first bit, length)`, in ascending order.
pub struct Runs<F: Fn(usize) -> u64> {
    word: F,
    len: usize,
    next: usize,
}

impl<F: Fn(usize) -> u64> Runs<F> {
    fn new(len: usize, word: F) -> Self {
        Runs { word, len, next: 0 }
    }

    /// First bit at or after `from` whose value is `set`, or `len`.
    fn next_with(&self, from: usize, set: bool) -> usize {
        let mut bit = from;
        while bit < self.len {
            let raw = (self.word)(bit / BITS);
            let w = if set { raw } else { !raw } & !((1u64 << (bit % BITS)) - 1);
            if w != 0 {
                return ((bit / BITS) * BITS + w.trailing_zeros() as usize).min(self.len);
            }
            bit = (bit / BITS + 1) * BITS;
        }
        self.len
    }
}

impl<F: Fn(usize) -> u64> Iterator for Runs<F> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        let start = self.next_with(self.next, true);
        if start >= self.len {
            self.next = self.len;
            return None;
        }
        let end = self.next_with(start, false);
        self.next = end;
        Some((start, end - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn naive_runs(bits: &[bool]) -> Vec<(usize, usize)> {
        let mut out = vec![];
        let mut i = 0;
        while i < bits.len() {
            if bits[i] {
                let s = i;
                while i < bits.len() && bits[i] {
                    i += 1;
                }
                out.push((s, i - s));
            } else {
                i += 1;
            }
        }
        out
    }

    #[test]
    fn ranges_across_word_boundaries() {
        for len in [1, 63, 64, 65, 127, 128, 129, 1000] {
            for (start, count) in [(0, len), (0, 1), (len - 1, 1), (len / 3, len / 2), (len / 2, 0)] {
                let b = AtomicBitmap::new(len);
                b.set_range(start, count).unwrap();
                let expect: Vec<bool> = (0..len).map(|i| i >= start && i < start + count).collect();
                assert_eq!((0..len).map(|i| b.test(i)).collect::<Vec<_>>(), expect, "len {len} {start}+{count}");
                assert_eq!(b.count(), count);
                assert_eq!(b.runs().collect::<Vec<_>>(), naive_runs(&expect));
                b.clear_range(start, count).unwrap();
                assert_eq!(b.count(), 0);
            }
        }
    }

    #[test]
    fn out_of_range_is_an_error_not_a_write() {
        let b = AtomicBitmap::new(100);
        assert_eq!(b.set_range(90, 11).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(b.set_range(usize::MAX, 2).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(b.count(), 0);
        b.set_range(100, 0).unwrap();
    }

    #[test]
    fn take_clears_and_returns_the_round() {
        let b = AtomicBitmap::new(300);
        b.set(5);
        b.set_range(60, 10).unwrap();
        b.set(299);
        assert!(b.test_and_set(5));
        assert!(!b.test_and_set(6));
        let round = b.take();
        assert_eq!(b.count(), 0);
        assert_eq!(round.count(), 13);
        assert_eq!(round.runs().collect::<Vec<_>>(), vec![(5, 2), (60, 10), (299, 1)]);
        assert!(round.test(299) && !round.test(300));
        b.set_all();
        assert_eq!(b.count(), 300);
        assert_eq!(b.snapshot().runs().collect::<Vec<_>>(), vec![(0, 300)]);
        b.clear(0);
        b.clear_all();
        assert!(b.runs().next().is_none());
    }

    #[test]
    fn random_patterns_match_naive_runs() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 700) as usize + 1;
            let b = AtomicBitmap::new(len);
            let bits: Vec<bool> = (0..len).map(|k| (seed >> (k % 61)) & 3 == 0).collect();
            bits.iter().enumerate().filter(|(_, set)| **set).for_each(|(k, _)| b.set(k));
            assert_eq!(b.runs().collect::<Vec<_>>(), naive_runs(&bits));
        }
    }

    #[test]
    fn concurrent_setters_lose_nothing_across_takes() {
        let b = std::sync::Arc::new(AtomicBitmap::new(4096));
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || (t..4096).step_by(4).for_each(|i| b.set(i)))
            })
            .collect();
        let mut seen = 0;
        while writers.iter().any(|w| !w.is_finished()) {
            seen += b.take().count();
        }
        writers.into_iter().for_each(|w| w.join().unwrap());
        seen += b.take().count();
        assert_eq!(seen, 4096);
    }
}
