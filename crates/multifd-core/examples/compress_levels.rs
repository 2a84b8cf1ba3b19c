//! Wire bytes and CPU time per GiB for each zlib (flate2 + zlib-rs) and zstd level, on the
//! data `bench/compression` sends (random, and text pages), compressed as the channels do:
//! one stream, flushed after every 128-page packet. The numbers that chose the level mapping in
//! `compress/mod.rs`.
//!
//!   cargo run --release -p multifd-core --example compress_levels [MiB]
use std::time::Instant;

use flate2::{Compress, FlushCompress};

const TEXT: &[u8] = b"The quick brown fox jumps over the lazy dog while multifd moves pages over parallel channels. ";
const PACKET: usize = 128 * 4096;

fn text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for p in 0..len / 4096 {
        let mut page = format!("page 0:{p} ").into_bytes();
        while page.len() < 4096 {
            page.extend_from_slice(TEXT);
        }
        out.extend_from_slice(&page[..4096]);
    }
    out
}

fn random(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn zlib(data: &[u8], level: u32) -> usize {
    let mut c = Compress::new(flate2::Compression::new(level), true);
    let mut out = Vec::with_capacity(2 * PACKET);
    let mut total = 0;
    for packet in data.chunks(PACKET) {
        out.clear();
        c.compress_vec(packet, &mut out, FlushCompress::Sync).unwrap();
        assert_eq!(c.total_in() as usize % PACKET, 0);
        total += out.len();
    }
    total
}

fn zstd(data: &[u8], level: i32) -> usize {
    use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};
    let mut e = Encoder::new(level).unwrap();
    let mut out = vec![0u8; 2 * PACKET];
    let mut total = 0;
    for packet in data.chunks(PACKET) {
        let mut input = InBuffer::around(packet);
        let mut o = OutBuffer::around(&mut out[..]);
        while input.pos() < packet.len() {
            e.run(&mut input, &mut o).unwrap();
        }
        while e.flush(&mut o).unwrap() > 0 {}
        total += o.pos();
    }
    total
}

fn main() {
    let mib: usize = std::env::args().nth(1).map_or(64, |a| a.parse().unwrap());
    let per_gib = 1024.0 / mib as f64;
    for (kind, data) in [("text", text(mib << 20)), ("random", random(mib << 20))] {
        for level in 1..=9 {
            let t = Instant::now();
            let n = zlib(&data, level);
            println!("{kind:6} zlib-rs level {level}: {:8.2} MiB/GiB, {:6.2} s/GiB", n as f64 * per_gib / 1048576.0, t.elapsed().as_secs_f64() * per_gib);
        }
        for level in [1, 2, 3] {
            let t = Instant::now();
            let n = zstd(&data, level);
            println!("{kind:6} zstd level {level}:    {:8.2} MiB/GiB, {:6.2} s/GiB", n as f64 * per_gib / 1048576.0, t.elapsed().as_secs_f64() * per_gib);
        }
    }
}
