//! What the A/B examples share: process CPU time and a reproducible random source block.
#![allow(dead_code)] // each example uses what it needs

use multifd_core::block::RamBlock;

/// User plus system CPU seconds of this process (both sides of an in-process transfer) so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers (all zeroes is a value); getrusage fills the one given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// The xorshift64 step the examples fill pages with.
pub fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Fills every 4 KiB page of `block` with the same pseudo-random bytes on every run.
pub fn fill_random(block: &RamBlock) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = vec![0u8; 4096];
    for p in 0..block.pages() as u64 {
        for w in page.chunks_exact_mut(8) {
            w.copy_from_slice(&xorshift(&mut x).to_ne_bytes());
        }
        block.store(p * 4096, &page).unwrap();
    }
}
