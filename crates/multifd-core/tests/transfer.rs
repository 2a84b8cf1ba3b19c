//! Source and destination data planes end to end on loopback, without the orchestrator.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};
use multifd_core::ErrorCode;

mod common;
use common::{fill, sink};

fn same(a: &RamBlock, b: &RamBlock) -> bool {
    (0..a.pages() as u64).all(|p| a.read_page(p * 4096) == b.read_page(p * 4096))
}

fn wait_for(rx: &mpsc::Receiver<Event>, mut want: impl FnMut(&Event) -> bool) -> Event {
    loop {
        let e = rx.recv_timeout(Duration::from_secs(10)).expect("event in time");
        if want(&e) {
            return e;
        }
    }
}

/// A source configuration for these tests: zero-page detection on, no zero-copy or throttle.
fn source_config(address: &Address, uuid: [u8; 16], channels: u8, compression: Compression) -> SourceConfig {
    SourceConfig {
        address: address.clone(),
        uuid,
        channels,
        geometry: Geometry::x86(),
        compression,
        compression_level: None,
        zero_page_detection: true,
        zero_copy: false,
        max_bandwidth: None,
        connect_timeout: Duration::from_secs(5),
        peer_timeout: None,
        integrity: false,
        tls: None,
        channel_retries: 0,
        min_channels: 1,
    }
}

fn run(address: &str, channels: u8, compression: Compression) {
    let src_blocks: Vec<Arc<RamBlock>> = [("pc.ram", 4 << 20), ("odd", 3 * 4096 + 128 * 4096 * 2 + 4096)]
        .iter()
        .map(|(n, l)| Arc::new(RamBlock::allocate(n, *l, 4096, false).unwrap()))
        .collect();
    for (i, b) in src_blocks.iter().enumerate() {
        fill(b, i as u64 + 7, 5);
    }
    let dst_blocks: Vec<Arc<RamBlock>> = src_blocks.iter().map(|b| Arc::new(RamBlock::allocate(b.name(), b.len(), 4096, false).unwrap())).collect();
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse(address).unwrap(), Duration::from_secs(5), None, dsink).unwrap();
    let uuid = [9u8; 16];
    dest.configure(DestConfig {
        uuid,
        channels,
        geometry: Geometry::x86(),
        compression,
        blocks: dst_blocks.clone(),
        channel_timeout: Duration::from_secs(5),
        peer_timeout: None,
        integrity: false,
        resume_window: Duration::ZERO,
    })
    .unwrap();
    let (ssink, srx) = sink();
    let failure = Failure::new(ssink);
    let source = Source::start(
        source_config(dest.address(), uuid, channels, compression),
        failure.clone(),
    )
    .unwrap();
    for (i, b) in src_blocks.iter().enumerate() {
        source.send(i as u32, b.clone(), Selection::Whole).unwrap();
    }
    source.sync(100).unwrap();
    wait_for(&srx, |e| matches!(e, Event::Done { id: 100, .. }));
    wait_for(&drx, |e| matches!(e, Event::Synced { epoch: 1, .. }));
    assert!(src_blocks.iter().zip(&dst_blocks).all(|(a, b)| same(a, b)));

    // Round 2: change a few pages, send only the dirty ones.
    src_blocks[0].store(8192, &[0xab]).unwrap();
    src_blocks[0].mark_dirty(8192, 1).unwrap();
    src_blocks[1].mark_dirty(0, 4096 * 3).unwrap();
    src_blocks[1].fill(4096, 4096, 0).unwrap();
    for (i, b) in src_blocks.iter().enumerate() {
        source.send(200 + i as u32, b.clone(), Selection::Dirty).unwrap();
    }
    source.sync(300).unwrap();
    wait_for(&drx, |e| matches!(e, Event::Synced { epoch: 2, .. }));
    assert!(src_blocks.iter().zip(&dst_blocks).all(|(a, b)| same(a, b)));
    // Pages land in block memory without a staging copy, compressed or not (nothing in this
    // file receives into a file without `fallocate`, the one path that stages).
    assert_eq!(multifd_core::dest::staged_bytes(), 0, "{compression:?}: pages copied through a receive buffer");
    let sent: u64 = source.stats().iter().map(|s| s.normal_pages + s.zero_pages).sum();
    let total: u64 = src_blocks.iter().map(|b| b.pages() as u64).sum::<u64>() + 4;
    assert_eq!(sent, total);

    dest.finish().unwrap();
    source.close(false);
    assert!(!failure.is_failed());
    dest.close();
}

#[test]
fn tcp_one_channel() {
    run("tcp:127.0.0.1:0", 1, Compression::None);
}

#[test]
fn tcp_four_channels() {
    run("tcp:127.0.0.1:0", 4, Compression::None);
}

#[test]
fn unix_sixteen_channels() {
    run(&format!("unix:{}/multifd-test-{}.sock", std::env::temp_dir().display(), std::process::id()), 16, Compression::None);
}

#[test]
fn zlib_three_channels() {
    run("tcp:127.0.0.1:0", 3, Compression::Zlib);
}

#[test]
fn zstd_two_channels() {
    run("tcp:127.0.0.1:0", 2, Compression::Zstd);
}

#[test]
fn channels_of_another_session_are_rejected_and_the_destination_carries_on() {
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, dsink).unwrap();
    dest.configure(DestConfig {
        uuid: [1; 16],
        channels: 2,
        geometry: Geometry::x86(),
        compression: Compression::None,
        blocks: vec![],
        channel_timeout: Duration::from_secs(5),
        peer_timeout: None,
        integrity: false,
        resume_window: Duration::ZERO,
    })
    .unwrap();
    let (ssink, _srx) = sink();
    let source = Source::start(
        source_config(dest.address(), [2; 16], 2, Compression::None),
        Failure::new(ssink),
    )
    .unwrap();
    for _ in 0..2 {
        let Event::Warning(e) = wait_for(&drx, |e| matches!(e, Event::Warning(_) | Event::Failed(_))) else { panic!("the destination failed") };
        assert_eq!(e.code, ErrorCode::UuidMismatch, "{e}");
    }
    assert_eq!(dest.rejected_connections(), 2);
    assert!(dest.failure().first().is_none());
    source.close(true);
    dest.close();
}

#[test]
fn missing_channels_time_out() {
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, dsink).unwrap();
    dest.configure(DestConfig {
        uuid: [1; 16],
        channels: 3,
        geometry: Geometry::x86(),
        compression: Compression::None,
        blocks: vec![],
        channel_timeout: Duration::from_millis(300),
        peer_timeout: None,
        integrity: false,
        resume_window: Duration::ZERO,
    })
    .unwrap();
    let Event::Failed(e) = wait_for(&drx, |e| matches!(e, Event::Failed(_))) else { unreachable!() };
    assert_eq!(e.code, ErrorCode::Timeout);
    assert!(e.message.contains("[0, 1, 2]"), "{e}");
    dest.close();
}

/// Regression: `close` right after the source connected (channels still in the accept backlog)
/// must shut every admitted channel down; it once missed a late one and joined it forever.
#[test]
fn close_right_after_channels_connect_never_hangs() {
    for _ in 0..30 {
        let (dsink, _drx) = sink();
        let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, dsink).unwrap();
        dest.configure(DestConfig {
            uuid: [3; 16],
            channels: 8,
            geometry: Geometry::x86(),
            compression: Compression::None,
            blocks: vec![],
            channel_timeout: Duration::from_secs(5),
        peer_timeout: None,
        integrity: false,
            resume_window: Duration::ZERO,
        })
        .unwrap();
        let (ssink, _srx) = sink();
        let source = Source::start(
            source_config(dest.address(), [3; 16], 8, Compression::None),
            Failure::new(ssink),
        )
        .unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let closer = std::thread::spawn(move || {
            dest.close();
            done_tx.send(()).unwrap();
        });
        done_rx.recv_timeout(Duration::from_secs(5)).expect("Destination::close returned");
        closer.join().unwrap();
        source.close(true);
    }
}
