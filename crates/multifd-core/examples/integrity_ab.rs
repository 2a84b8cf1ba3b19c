//! In-process A/B of the integrity path against plain, alternating rep by rep: wall time of the
//! transfer (send + sync acknowledged), of the source's and the destination's block digests
//! taken one after the other as the orchestrators do at completion, and process CPU seconds
//! per GiB (both sides). `cargo run --release -p multifd-core --example integrity_ab -- CHANNELS
//! SIZE_MIB PAIRS`
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::integrity::block_digest;
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};

fn cpu() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(u.ru_utime) + s(u.ru_stime)
}

/// One transfer; returns (transfer s, source digest s, destination digest s, CPU s, transfer CPU s).
fn run(channels: u8, src: &Arc<RamBlock>, dst: &Arc<RamBlock>, integrity: bool) -> (f64, f64, f64, f64, f64) {
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
        let t = Instant::now();
        let a = block_digest(src);
        sd = t.elapsed().as_secs_f64();
        dest.finish().unwrap();
        let t = Instant::now();
        let b = block_digest(dst);
        dd = t.elapsed().as_secs_f64();
        assert_eq!(a, b);
    } else {
        dest.finish().unwrap();
    }
    let c = cpu() - c0;
    source.close(false);
    dest.close();
    (transfer, sd, dd, c, tc)
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (channels, mib, pairs) = (args[0] as u8, args[1], args.get(2).copied().unwrap_or(5));
    let size = mib << 20;
    let src = Arc::new(RamBlock::allocate("b", size, 4096, true).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut page = vec![0u8; 4096];
    for p in 0..src.pages() as u64 {
        for w in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_ne_bytes());
        }
        src.store(p * 4096, &page).unwrap();
    }
    let dst = Arc::new(RamBlock::allocate("b", size, 4096, true).unwrap());
    let gib = size as f64 / (1u64 << 30) as f64;
    let mut rows: [Vec<(f64, f64, f64, f64, f64)>; 2] = [vec![], vec![]];
    for rep in 0..pairs {
        let order: [bool; 2] = if rep % 2 == 0 { [false, true] } else { [true, false] };
        for integrity in order {
            dst.fill(0, size, 0).unwrap();
            rows[integrity as usize].push(run(channels, &src, &dst, integrity));
        }
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    println!("{channels} channels, {mib} MiB, {pairs} alternating pairs: median [min..max]");
    let mut totals = [0.0; 2];
    for (i, name) in ["plain", "xxh3"].iter().enumerate() {
        let r = &rows[i];
        let total = med(r.iter().map(|t| t.0 + t.1 + t.2).collect());
        totals[i] = total.0;
        let tr = med(r.iter().map(|t| t.0 * 1e3).collect());
        let sd = med(r.iter().map(|t| t.1 * 1e3).collect());
        let dd = med(r.iter().map(|t| t.2 * 1e3).collect());
        let c = med(r.iter().map(|t| t.3 / gib).collect());
        let tc = med(r.iter().map(|t| t.4 / gib).collect());
        println!("{name:6} total {:.2} GB/s [{:.2}..{:.2}]  transfer {:.1} ms  src digest {:.1} ms  dst digest {:.1} ms  CPU {:.3} s/GiB [{:.3}..{:.3}] (transfer alone {:.3})", size as f64 / total.0 / 1e9, size as f64 / total.2 / 1e9, size as f64 / total.1 / 1e9, tr.0, sd.0, dd.0, c.0, c.1, c.2, tc.0);
    }
    println!("ratio xxh3/plain throughput {:.2}x", totals[0] / totals[1]);
}
