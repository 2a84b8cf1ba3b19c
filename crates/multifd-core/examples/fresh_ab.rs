//! Receiving into a new file on tmpfs (as `recv --out` does: pages allocated as they arrive),
//! in process, for A/B experiments on file-backed destinations.
//! `cargo run --release -p multifd-core --example fresh_ab -- CHANNELS SIZE_MIB REPS [DIR]`
//! (DIR defaults to /dev/shm; the source is random anonymous memory). Prints GB/s and the
//! process CPU seconds per rep.

use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};


mod common;
use common::cpu_seconds;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let channels: u8 = args[0].parse().unwrap();
    let mib: u64 = args[1].parse().unwrap();
    let reps: usize = args.get(2).map_or(3, |a| a.parse().unwrap());
    let dir = args.get(3).cloned().unwrap_or_else(|| "/dev/shm".into());
    let size = mib << 20;
    let src = Arc::new(RamBlock::allocate("b", size, 4096, true).unwrap());
    common::fill_random(&src);
    let path = Path::new(&dir).join(format!("fresh-ab-{}.ram", std::process::id()));
    for _ in 0..reps {
        let _ = std::fs::remove_file(&path);
        let dst = Arc::new(RamBlock::map_file("b", &path, 4096, Some(size), false).unwrap());
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let sink: multifd_core::session::EventSink = Arc::new(move |e| drop(tx.lock().unwrap().send(e)));
        let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, sink.clone()).unwrap();
        dest.configure(DestConfig { uuid: [0; 16], channels, geometry: Geometry::x86(), compression: Compression::None, blocks: vec![dst.clone()], channel_timeout: Duration::from_secs(5), peer_timeout: None, integrity: false, resume_window: Duration::ZERO }).unwrap();
        let source = Source::start(
            SourceConfig { address: dest.address().clone(), uuid: [0; 16], channels, geometry: Geometry::x86(), compression: Compression::None, zero_page_detection: true, zero_copy: false, compression_level: None, connect_timeout: Duration::from_secs(5),
            peer_timeout: None, max_bandwidth: None, integrity: false, tls: None, channel_retries: 0, min_channels: 1 },
            Failure::new(sink),
        )
        .unwrap();
        let (t, c) = (Instant::now(), cpu_seconds());
        source.send(1, src.clone(), Selection::Whole).unwrap();
        source.sync(2).unwrap();
        loop {
            if let Event::Synced { .. } = rx.recv_timeout(Duration::from_secs(60)).unwrap() {
                break;
            }
        }
        let (secs, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - c);
        dest.finish().unwrap();
        source.close(false);
        dest.close();
        let same = (0..size).step_by(1 << 20).all(|at| src.read_vec(at, 1 << 20) == dst.read_vec(at, 1 << 20));
        println!("channels={channels} gbps={:.2} cpu={cpu:.2} same={same}", size as f64 / secs / 1e9);
    }
    let _ = std::fs::remove_file(&path);
}
