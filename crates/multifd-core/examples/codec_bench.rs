//! Codec and zero-scan throughput, printed next to their baselines. Run through `bench/codec`.
//!
//! - header round trip: encode a full 128-page data header, then decode and validate it
//!   (every offset checked against the block), as a receiver does per packet;
//! - zero scan: `Mapping::is_zero` (volatile loads) over every 4 KiB page of a zeroed,
//!   touched mapping, against `page == ZERO_PAGE` (a memcmp) over a private buffer of the
//!   same size.

use std::hint::black_box;
use std::time::{Duration, Instant};

use multifd_core::wire::{BlockInfo, Compression, Geometry, PacketHeader, PacketValidator};
use multifd_core::memory::Mapping;

const PAGE: usize = 4096;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` (which does `per_call` units of work) repeatedly for about `span`; units per second.
fn rate(span: Duration, per_call: f64, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < span {
        for _ in 0..64 {
            f();
        }
        calls += 64;
    }
    calls as f64 * per_call / start.elapsed().as_secs_f64()
}

fn main() {
    let reps: usize = std::env::var("REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let json = std::env::args().any(|a| a == "--json");
    let span = Duration::from_millis(400);
    let g = Geometry::x86();

    let blocks = [BlockInfo { name: b"pc.ram".to_vec(), length: 1 << 30 }];
    let validator = PacketValidator { geometry: g, compression: Compression::None, blocks: &blocks[..] };
    let normal: Vec<u64> = (0..100u64).map(|i| i * 2 * PAGE as u64).collect();
    let zero: Vec<u64> = (0..28u64).map(|i| (i * 2 + 1) * PAGE as u64).collect();
    let header = PacketHeader::data(g, Compression::None, 42, b"pc.ram", &normal, &zero, 100 * PAGE as u32);
    let mut wire = vec![0u8; g.header_len()];
    let mut back = PacketHeader::default();
    let round_trips = median(
        (0..reps)
            .map(|_| {
                rate(span, 1.0, || {
                    header.encode_into(g, black_box(&mut wire)).unwrap();
                    black_box(validator.decode(black_box(&wire), &mut back).unwrap());
                })
            })
            .collect(),
    );
    assert_eq!(back, header);

    // 256 MiB of zero pages, written once so every page is faulted in (not the shared zero page).
    let size = 256 << 20;
    let mut buf = vec![1u8; size];
    buf.fill(0);
    black_box(&mut buf);
    let mapping = Mapping::anonymous(size, true).unwrap();
    mapping.fill(0, size, 1);
    mapping.fill(0, size, 0);
    let zero_page = [0u8; PAGE];
    let scan = |f: &dyn Fn(usize) -> bool| {
        median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    let zeros = (0..size / PAGE).filter(|&p| f(black_box(p))).count();
                    assert_eq!(zeros, size / PAGE);
                    size as f64 / t.elapsed().as_secs_f64() / 1e9
                })
                .collect(),
        )
    };
    let ours = scan(&|p| mapping.is_zero((p * PAGE) as u64, PAGE));
    let memcmp = scan(&|p| black_box(&buf)[p * PAGE..(p + 1) * PAGE] == zero_page);

    if json {
        println!(
            "{{\"headerRoundTripsPerSecond\":{round_trips:.0},\"zeroScanGBps\":{ours:.2},\"memcmpGBps\":{memcmp:.2},\"zeroScanRatio\":{:.3}}}",
            ours / memcmp
        );
    } else {
        println!("header encode+decode+validate (128 offsets): {:.2} M round trips/s   (target >= 5 M)", round_trips / 1e6);
        println!("zero-page scan, multifd_core::memory::Mapping::is_zero: {ours:.2} GB/s");
        println!("zero-page scan, memcmp against a zero page:  {memcmp:.2} GB/s   (baseline)");
        println!("ratio is_zero / memcmp: {:.2}x   (target >= 0.8x)", ours / memcmp);
    }
}
