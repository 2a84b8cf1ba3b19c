//! Integrity hash path, GB/s on one core, on the same bytes: the crate's one-shot xxh3-64 over a
//! private buffer (the ceiling), the old path (each 4 KiB page copied to a stack buffer, then a
//! streaming update) and the in-place path (`integrity::block_pages_digest`, which also yields
//! every page's digest from the same pass; next to it the packet digest alone, what that extra
//! costs), for a packet that sits in cache (128 pages hashed again and again) and for a block
//! streamed from memory.
//! Variants alternate rep by rep. `cargo run --release -p multifd-core --example hash_bench`
use std::hint::black_box;
use std::time::Instant;

use multifd_core::block::RamBlock;
use multifd_core::integrity;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

const PAGE: u64 = 4096;

fn old_path(block: &RamBlock, offsets: &[u64]) -> u64 {
    let mut h = Xxh3::new();
    let mut buf = [0u8; 4096];
    for &o in offsets {
        block.memory().copy_to(o, &mut buf);
        h.update(&buf);
    }
    h.digest()
}

fn main() {
    let size: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1 << 30);
    let reps = 5;
    let block = RamBlock::allocate("bench", size, PAGE as u32, true).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for at in (0..size).step_by(chunk.len()) {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        block.memory().copy_from(at, &chunk);
    }
    let packet: Vec<u64> = (0..128).map(|i| i * PAGE).collect();
    let mut private = vec![0u8; 128 * PAGE as usize];
    block.memory().copy_to(0, &mut private);
    let hot_rounds = 4096; // 2 GiB through a 512 KiB packet
    let packets: Vec<Vec<u64>> = (0..size / (128 * PAGE)).map(|p| (0..128).map(|i| (p * 128 + i) * PAGE).collect()).collect();
    let gbs = |bytes: u64, t: f64| bytes as f64 / t / 1e9;
    let mut each = Vec::with_capacity(128);
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        ("hot  crate xxh3_64 (private buffer)", vec![]),
        ("hot  old: page copy + streaming", vec![]),
        ("hot  new: in place, with page digests", vec![]),
        ("hot  in place, packet digest only", vec![]),
        ("cold old: page copy + streaming", vec![]),
        ("cold new: in place, with page digests", vec![]),
        ("block digest from memory (all cores)", vec![]),
    ];
    assert_eq!(old_path(&block, &packet), integrity::block_pages_digest(&block, &packet, &mut Vec::new()));
    assert_eq!(xxh3_64(&private), integrity::block_pages_digest(&block, &packet, &mut Vec::new()));
    for _ in 0..reps {
        let hot_bytes = hot_rounds * 128 * PAGE;
        let t = Instant::now();
        (0..hot_rounds).for_each(|_| {
            black_box(xxh3_64(black_box(&private)));
        });
        rows[0].1.push(gbs(hot_bytes, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        (0..hot_rounds).for_each(|_| {
            black_box(old_path(&block, black_box(&packet)));
        });
        rows[1].1.push(gbs(hot_bytes, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        (0..hot_rounds).for_each(|_| {
            black_box(integrity::block_pages_digest(&block, black_box(&packet), &mut each));
        });
        rows[2].1.push(gbs(hot_bytes, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        let runs = [(0u64, 128 * PAGE as usize)];
        (0..hot_rounds).for_each(|_| {
            black_box(block.memory().xxh3_runs(black_box(&runs)));
        });
        rows[3].1.push(gbs(hot_bytes, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        packets.iter().for_each(|p| {
            black_box(old_path(&block, p));
        });
        rows[4].1.push(gbs(size, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        packets.iter().for_each(|p| {
            black_box(integrity::block_pages_digest(&block, p, &mut each));
        });
        rows[5].1.push(gbs(size, t.elapsed().as_secs_f64()));
        let t = Instant::now();
        black_box(integrity::block_digest(&block));
        rows[6].1.push(gbs(size, t.elapsed().as_secs_f64()));
    }
    println!("{} MiB block, {reps} alternating reps, GB/s median [min..max]", size >> 20);
    for (name, mut v) in rows {
        v.sort_by(f64::total_cmp);
        println!("{name:38} {:6.2} [{:.2}..{:.2}]", v[v.len() / 2], v[0], v[v.len() - 1]);
    }
}
