//! In-process source -> destination transfer for A/B experiments on the data plane.
//! `cargo run --release --example loopback_ab -- CHANNELS SIZE_MIB REPS` (ZERO=0 disables
//! zero-page detection; TLS=DIR uses mutual TLS with the certificates scripts/test-certs.sh
//! made in DIR; RETRIES=N sets channel_retries, whose journal and idle-socket watcher run
//! only when it is above 0; COMPRESSION=zstd|zlib compresses; DATA=text fills the block with
//! the compression bench's text pages instead of random bytes; INTEGRITY=1 turns on xxh3 digests; DEST_DIR=DIR receives into a new
//! file in DIR each rep, as `recv --out` does, e.g. /dev/shm for tmpfs). Every rep is checked
//! byte for byte after it is timed.

use std::sync::{Arc, mpsc, Mutex};
use std::time::{Duration, Instant};

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::tls::{TlsClient, TlsOptions, TlsServer};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};

mod common;
use common::cpu_seconds;

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (channels, mib, reps) = (args[0] as u8, args[1], args.get(2).copied().unwrap_or(3));
    let zero = std::env::var("ZERO").map(|v| v != "0").unwrap_or(true);
    let integrity = std::env::var("INTEGRITY").is_ok();
    let retries: u32 = std::env::var("RETRIES").map(|v| v.parse().unwrap()).unwrap_or(0);
    let size = mib << 20;
    let src = Arc::new(match std::env::var("SRC_FILE") {
        Ok(path) => RamBlock::map_file("b", std::path::Path::new(&path), 4096, Some(size), true).unwrap(),
        Err(_) => RamBlock::allocate("b", size, 4096, true).unwrap(),
    });
    let compression = std::env::var("COMPRESSION").map_or(Compression::None, |c| Compression::from_name(&c).unwrap());
    let text = std::env::var("DATA").is_ok_and(|d| d == "text");
    if text {
        const TEXT: &[u8] = b"The quick brown fox jumps over the lazy dog while multifd moves pages over parallel channels. ";
        for p in 0..src.pages() as u64 {
            let mut page = format!("page 0:{p} ").into_bytes();
            while page.len() < 4096 {
                page.extend_from_slice(TEXT);
            }
            src.store(p * 4096, &page[..4096]).unwrap();
        }
    } else {
        common::fill_random(&src);
    }
    // DEST_DIR: a new file there per rep, pages allocated as they arrive (`recv --out`).
    let dest_file = std::env::var("DEST_DIR").ok().map(|d| std::path::Path::new(&d).join(format!("loopback-ab-{}.ram", std::process::id())));
    let tls = std::env::var("TLS").ok().map(|dir| {
        let read = |f: &str| std::fs::read(std::path::Path::new(&dir).join(f)).unwrap();
        let opts = |who: &str| TlsOptions { cert: read(&format!("{who}.pem")), key: read(&format!("{who}.key")), ca: read("ca.pem"), name: Some("localhost".into()), allow: vec![] };
        (TlsServer::new(&opts("dest")).unwrap(), opts("source"))
    });
    for _ in 0..reps {
        let dst = Arc::new(match &dest_file {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                RamBlock::map_file("b", path, 4096, Some(size), false).unwrap()
            }
            None => RamBlock::allocate("b", size, 4096, true).unwrap(),
        });
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let sink: multifd_core::session::EventSink = Arc::new(move |e| drop(tx.lock().unwrap().send(e)));
        let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), tls.as_ref().map(|t| t.0.clone()), sink.clone()).unwrap();
        let client = tls.as_ref().map(|t| TlsClient::new(&t.1, dest.address()).unwrap());
        dest.configure(DestConfig { uuid: [0; 16], channels, geometry: Geometry::x86(), compression, blocks: vec![dst.clone()], channel_timeout: Duration::from_secs(5), peer_timeout: None, integrity, resume_window: if retries > 0 { Duration::from_secs(10) } else { Duration::ZERO } }).unwrap();
        let source = Source::start(
            SourceConfig { address: dest.address().clone(), uuid: [0; 16], channels, geometry: Geometry::x86(), compression, zero_page_detection: zero, zero_copy: std::env::var("ZC").is_ok(), compression_level: None, connect_timeout: Duration::from_secs(5),
            peer_timeout: None, max_bandwidth: None, integrity, tls: client, channel_retries: retries, min_channels: 1 },
            Failure::new(sink),
        )
        .unwrap();
        let (t, cpu) = (Instant::now(), cpu_seconds());
        source.send(1, src.clone(), Selection::Whole).unwrap();
        source.sync(2).unwrap();
        loop {
            if let Event::Synced { .. } = rx.recv_timeout(Duration::from_secs(60)).unwrap() {
                break;
            }
        }
        let (secs, cpu) = (t.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        println!("channels={channels} zero={zero} gbps={:.2} cpu_s_per_gib={:.3}", size as f64 / secs / 1e9, cpu / (size as f64 / (1u64 << 30) as f64));
        dest.finish().unwrap();
        source.close(false);
        dest.close();
        let same = (0..size).step_by(1 << 20).all(|at| src.read_vec(at, 1 << 20) == dst.read_vec(at, 1 << 20));
        assert!(same, "the destination differs from the source");
    }
    if let Some(path) = &dest_file {
        let _ = std::fs::remove_file(path);
    }
}

