//! In-process A/B of the integrity path against plain, variants rotated rep by rep: wall time
//! of the transfer (send + sync acknowledged), of the source's and the destination's block
//! digests taken one after the other as the orchestrators do at completion, and process CPU
//! seconds per GiB (both sides). Variants: `plain`; `xxh3` (completion combines the page
//! digests taken as pages moved, what the library does); `xxh3-mem` (completion hashes both
//! blocks from memory again, what it did before); ONLY=NAME runs one. `cargo run --release -p multifd-core
//! --example integrity_ab -- CHANNELS SIZE_MIB REPS`
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::integrity::block_digest;
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};


mod common;
use common::cpu_seconds as cpu;

/// One transfer's seconds: wall time of the transfer, of the source's and the destination's
/// completion digests; process CPU in all and for the transfer alone.
struct Sample(f64, f64, f64, f64, f64);

fn run(channels: u8, src: &Arc<RamBlock>, dst: &Arc<RamBlock>, variant: usize) -> Sample {
    let integrity = variant > 0;
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let sink: multifd_core::session::EventSink = Arc::new(move |e| drop(tx.lock().unwrap().send(e)));
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, sink.clone()).unwrap();
    dest.configure(DestConfig { uuid: [0; 16], channels, geometry: Geometry::x86(), compression: Compression::None, blocks: vec![dst.clone()], channel_timeout: Duration::from_secs(5), peer_timeout: None, integrity, resume_window: Duration::ZERO }).unwrap();
    let source = Source::start(
        SourceConfig { address: dest.address().clone(), uuid: [0; 16], channels, geometry: Geometry::x86(), compression: Compression::None, zero_page_detection: true, zero_copy: false, compression_level: None, connect_timeout: Duration::from_secs(5), peer_timeout: None, max_bandwidth: None, integrity, tls: None, channel_retries: 0, min_channels: 1 },
        Failure::new(sink),
    )
    .unwrap();
    let c0 = cpu();
    let t = Instant::now();
    source.send(1, src.clone(), Selection::Whole).unwrap();
    source.sync(2).unwrap();
    while !matches!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), Event::Synced { .. }) {}
    let transfer = t.elapsed().as_secs_f64();
    let tc = cpu() - c0;
    let (mut sd, mut dd) = (0.0, 0.0);
    if integrity {
        let (sent, landed) = (source.page_digests().unwrap(), dest.page_digests().unwrap());
        let t = Instant::now();
        let a = if variant == 1 { sent.block_digest(src, Some(&src.dirty)) } else { block_digest(src) };
        sd = t.elapsed().as_secs_f64();
        dest.finish().unwrap();
        let t = Instant::now();
        let b = if variant == 1 { landed.block_digest(dst, None) } else { block_digest(dst) };
        dd = t.elapsed().as_secs_f64();
        assert_eq!(a, b);
    } else {
        dest.finish().unwrap();
    }
    let c = cpu() - c0;
    source.close(false);
    dest.close();
    Sample(transfer, sd, dd, c, tc)
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (channels, mib, pairs) = (args[0] as u8, args[1], args.get(2).copied().unwrap_or(5));
    let size = mib << 20;
    let src = Arc::new(RamBlock::allocate("b", size, 4096, true).unwrap());
    common::fill_random(&src);
    let dst = Arc::new(RamBlock::allocate("b", size, 4096, true).unwrap());
    let gib = size as f64 / (1u64 << 30) as f64;
    const NAMES: [&str; 3] = ["plain", "xxh3", "xxh3-mem"];
    // ONLY=NAME runs one variant (for profiles).
    let only = std::env::var("ONLY").ok().map(|o| NAMES.iter().position(|n| *n == o).expect("ONLY names a variant"));
    let mut rows: [Vec<Sample>; 3] = [vec![], vec![], vec![]];
    for rep in 0..pairs as usize {
        for k in 0..3 {
            let variant = (rep + k) % 3;
            if only.is_some_and(|o| o != variant) {
                continue;
            }
            dst.fill(0, size, 0).unwrap();
            rows[variant].push(run(channels, &src, &dst, variant));
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!("{channels} channels, {mib} MiB, {pairs} rotated reps: median [min..max]");
    let mut totals = [0.0; 3];
    let mut cpus = [0.0; 3];
    for (i, name) in NAMES.iter().enumerate() {
        let r = &rows[i];
        if r.is_empty() {
            continue;
        }
        let total = med(r.iter().map(|t| t.0 + t.1 + t.2).collect());
        totals[i] = total.0;
        let tr = med(r.iter().map(|t| t.0 * 1e3).collect());
        let sd = med(r.iter().map(|t| t.1 * 1e3).collect());
        let dd = med(r.iter().map(|t| t.2 * 1e3).collect());
        let c = med(r.iter().map(|t| t.3 / gib).collect());
        let tc = med(r.iter().map(|t| t.4 / gib).collect());
        cpus[i] = c.0;
        println!("{name:8} total {:.2} GB/s [{:.2}..{:.2}]  transfer {:.1} ms  src digest {:.1} ms  dst digest {:.1} ms  CPU {:.3} s/GiB [{:.3}..{:.3}] (transfer alone {:.3})", size as f64 / total.0 / 1e9, size as f64 / total.2 / 1e9, size as f64 / total.1 / 1e9, tr.0, sd.0, dd.0, c.0, c.1, c.2, tc.0);
    }
    for i in (1..3).filter(|_| only.is_none()) {
        println!("{}/plain: throughput {:.2}x, CPU {:.2}x", NAMES[i], totals[0] / totals[i], cpus[i] / cpus[0]);
    }
}
