//! Helpers shared by the data-plane integration tests.
#![allow(dead_code)] // each test file uses its own subset

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use multifd_core::block::RamBlock;
use multifd_core::source::SourceConfig;
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};
use multifd_core::session::{Event, EventSink};
use multifd_core::tls::TlsOptions;

/// An event sink whose events arrive on the returned receiver.
pub fn sink() -> (EventSink, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    (Arc::new(move |e| drop(tx.lock().unwrap().send(e))), rx)
}

/// Fills `block` with pseudo-random pages from `seed`, leaving every `zero_every`-th page
/// zero (0: none).
pub fn fill(block: &RamBlock, seed: u64, zero_every: u64) {
    let mut x = seed | 1;
    for p in 0..block.pages() as u64 {
        if zero_every > 0 && p % zero_every == 0 {
            continue; // leave some zero pages
        }
        let page: Vec<u8> = (0..block.page_size() as usize / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_ne_bytes()
            })
            .collect();
        block.store(p * block.page_size() as u64, &page).unwrap();
    }
}


/// A fresh test PKI from `scripts/test-certs.sh` (openssl), made once per process.
pub fn pki() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("multifd-tls-test-{}", std::process::id()));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-certs.sh");
        let ok = std::process::Command::new("bash").arg(script).arg(&dir).status().expect("run test-certs.sh").success();
        assert!(ok, "test-certs.sh failed (is openssl installed?)");
        dir
    })
}

pub fn pem(name: &str) -> Vec<u8> {
    std::fs::read(pki().join(name)).unwrap()
}

/// TLS options with `who`'s certificate and key, trusting `ca`.
pub fn options(who: &str, ca: &str) -> TlsOptions {
    TlsOptions { cert: pem(&format!("{who}.pem")), key: pem(&format!("{who}.key")), ca: pem(ca), ..Default::default() }
}

/// A plain source configuration (no compression, zero-page detection on, no TLS, 5 s connect
/// timeout, no peer timeout); tests override what they exercise with struct update syntax.
#[allow(dead_code)]
pub fn source_config(address: &Address, uuid: [u8; 16], channels: u8) -> SourceConfig {
    SourceConfig {
        address: address.clone(),
        uuid,
        channels,
        geometry: Geometry::x86(),
        compression: Compression::None,
        compression_level: None,
        zero_page_detection: true,
        zero_copy: false,
        connect_timeout: std::time::Duration::from_secs(5),
        max_bandwidth: None,
        peer_timeout: None,
        integrity: false,
        tls: None,
        channel_retries: 0,
    }
}
