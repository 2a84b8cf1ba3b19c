//! In-process A/B of the compressed data path's copies, zstd and zlib level 1, alternating rep
//! by rep: "staged" copies a packet's pages out of block memory before compressing and decodes
//! into a buffer copied into block memory (the code before issue 17), "direct" hands the codec
//! the pages' raw iovecs (`ReadSource`/`WriteTarget`). CPU seconds per GiB per side; pages a
//! payload carries as they are (zstd's raw frames) are gathered untimed, as `writev` would.
//!
//!   cargo run --release -p multifd-core --example compress_ab [MiB] [reps]

use multifd_core::compress;
use multifd_core::memory::{Mapping, ReadSource, WriteTarget};
use multifd_core::wire::Compression;

const PACKET: usize = 128 * 4096;
const TEXT: &[u8] = b"The quick brown fox jumps over the lazy dog while multifd moves pages over parallel channels. ";

fn cpu() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes the thread's CPU clock into `t`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

fn fill(m: &Mapping, text: bool) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = vec![0u8; 4096];
    for p in 0..m.len() / 4096 {
        if text {
            let mut v = format!("page 0:{p} ").into_bytes();
            while v.len() < 4096 {
                v.extend_from_slice(TEXT);
            }
            page.copy_from_slice(&v[..4096]);
        } else {
            for b in page.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 24) as u8;
            }
        }
        m.copy_from((p * 4096) as u64, &page);
    }
}

/// (send CPU s, receive CPU s) for the whole mapping.
fn run(c: Compression, src: &Mapping, dst: &Mapping, direct: bool) -> (f64, f64) {
    let mut enc = compress::compressor(c, Some(1)).unwrap().unwrap();
    let mut dec = compress::decompressor(c).unwrap().unwrap();
    let (mut send, mut recv) = (0.0, 0.0);
    let mut staging = vec![0u8; PACKET];
    let mut payload = Vec::new();
    for off in (0..src.len()).step_by(PACKET) {
        let t = cpu();
        if direct {
            let iov = [src.iovec(off as u64, PACKET)];
            // SAFETY: a live private mapping.
            let pages = unsafe { ReadSource::pages(&iov) };
            let layout = enc.compress(&pages, &mut payload).unwrap();
            // Pages a payload carries as they are would be gathered by the kernel's `writev`
            // (as on the uncompressed path): untimed here.
            let t = cpu() - t;
            layout.into_bytes(&mut payload, &pages);
            send += t;
        } else {
            for (i, page) in staging.chunks_exact_mut(4096).enumerate() {
                src.copy_to((off + i * 4096) as u64, page);
            }
            let pages = [staging.as_slice()];
            let pages = ReadSource::slices(&pages);
            let layout = enc.compress(&pages, &mut payload).unwrap();
            let t = cpu() - t;
            layout.into_bytes(&mut payload, &pages);
            send += t;
        }
        let t2 = cpu();
        if direct {
            let iov = [dst.iovec(off as u64, PACKET)];
            // SAFETY: a live private mapping.
            dec.decompress(&payload, &mut unsafe { WriteTarget::pages(&iov) }).unwrap();
        } else {
            dec.decompress(&payload, &mut WriteTarget::buffer(&mut staging)).unwrap();
            for (i, page) in staging.chunks_exact(4096).enumerate() {
                dst.copy_from((off + i * 4096) as u64, page);
            }
        }
        recv += cpu() - t2;
    }
    (send, recv)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mib: usize = std::env::args().nth(1).map_or(256, |a| a.parse().unwrap());
    let reps: usize = std::env::args().nth(2).map_or(5, |a| a.parse().unwrap());
    let src = Mapping::anonymous(mib << 20, true).unwrap();
    let dst = Mapping::anonymous(mib << 20, true).unwrap();
    let per_gib = 1024.0 / mib as f64;
    for text in [false, true] {
        fill(&src, text);
        for c in [Compression::Zstd, Compression::Zlib] {
            let mut r: [Vec<(f64, f64)>; 2] = [vec![], vec![]];
            for rep in 0..reps {
                for direct in if rep % 2 == 0 { [false, true] } else { [true, false] } {
                    r[direct as usize].push(run(c, &src, &dst, direct));
                }
            }
            let show = |v: &[(f64, f64)]| {
                let (mut s, mut d): (Vec<f64>, Vec<f64>) = v.iter().copied().unzip();
                let (smin, smax) = (s.iter().copied().fold(f64::MAX, f64::min), s.iter().copied().fold(0.0, f64::max));
                let (dmin, dmax) = (d.iter().copied().fold(f64::MAX, f64::min), d.iter().copied().fold(0.0, f64::max));
                format!(
                    "send {:.3} s/GiB [{:.3}-{:.3}], receive {:.3} s/GiB [{:.3}-{:.3}]",
                    median(&mut s) * per_gib, smin * per_gib, smax * per_gib, median(&mut d) * per_gib, dmin * per_gib, dmax * per_gib
                )
            };
            let kind = if text { "text" } else { "random" };
            println!("{kind:6} {:4} staged: {}", c.name(), show(&r[0]));
            println!("{kind:6} {:4} direct: {}", c.name(), show(&r[1]));
        }
    }
}
