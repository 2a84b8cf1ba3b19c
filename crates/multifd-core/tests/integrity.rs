//! Integrity's block digests at completion: both sides combine the page digests they took as
//! pages moved (the source's from source memory as it sent them, the destination's from
//! destination memory as they landed) and equal the digest of their memory, through live
//! rounds that send pages again, zero pages and compression; what was never moved, or changed
//! on the source after it was sent, comes from memory.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::integrity::block_digest;
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};

mod common;
use common::{fill, sink};

fn wait_for(rx: &mpsc::Receiver<Event>, mut want: impl FnMut(&Event) -> bool) {
    loop {
        if want(&rx.recv_timeout(Duration::from_secs(10)).expect("event in time")) {
            return;
        }
    }
}

fn run(channels: u8, compression: Compression) {
    let src: Vec<Arc<RamBlock>> = [("pc.ram", 4 << 20), ("odd", (3 + 256 + 1) * 4096)].iter().map(|(n, l)| Arc::new(RamBlock::allocate(n, *l, 4096, false).unwrap())).collect();
    for (i, b) in src.iter().enumerate() {
        fill(b, i as u64 + 3, 5);
    }
    let dst: Vec<Arc<RamBlock>> = src.iter().map(|b| Arc::new(RamBlock::allocate(b.name(), b.len(), 4096, false).unwrap())).collect();
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, dsink).unwrap();
    let uuid = [4u8; 16];
    dest.configure(DestConfig { uuid, channels, geometry: Geometry::x86(), compression, blocks: dst.clone(), channel_timeout: Duration::from_secs(5), peer_timeout: None, integrity: true, resume_window: Duration::ZERO }).unwrap();
    let (ssink, _srx) = sink();
    let failure = Failure::new(ssink);
    let config = SourceConfig { compression, integrity: true, ..common::source_config(dest.address(), uuid, channels) };
    let source = Source::start(config, failure.clone()).unwrap();
    let (sent, landed) = (source.page_digests().unwrap(), dest.page_digests().unwrap());
    let completion = |i: usize| (sent.block_digest(&src[i], Some(&src[i].dirty)), landed.block_digest(&dst[i], None));

    // Round 1: everything but the last page of "odd", which is never sent.
    source.send(0, src[0].clone(), Selection::Whole).unwrap();
    source.send(1, src[1].clone(), Selection::Ranges(vec![(0, src[1].len() - 4096)])).unwrap();
    source.sync(10).unwrap();
    wait_for(&drx, |e| matches!(e, Event::Synced { epoch: 1, .. }));
    assert_eq!(completion(0), (block_digest(&src[0]), block_digest(&src[0])), "{compression:?}: round 1");
    let (s, d) = completion(1);
    assert_eq!(s, block_digest(&src[1]), "the page never sent is hashed from source memory");
    assert_eq!(d, block_digest(&dst[1]), "and from destination memory");
    assert_ne!(s, d, "so a page never sent is caught");
    // The destination's digests are of its pages as they landed: memory changed behind the
    // migration's back afterwards is not in them (`block_digest` of memory shows it).
    let was = dst[0].read_vec(12345, 1);
    dst[0].store(12345, &[!was[0]]).unwrap();
    assert_eq!(landed.block_digest(&dst[0], None), block_digest(&src[0]), "taken as the pages landed");
    assert_ne!(block_digest(&dst[0]), block_digest(&src[0]));
    dst[0].store(12345, &was).unwrap();

    // Round 2 writes pages again: a data page with new data, a data page that became zero, and
    // the page round 1 left out; the destination's digests of those pages are taken anew.
    src[0].store(8192, &[0xab; 100]).unwrap();
    src[0].mark_dirty(8192, 100).unwrap();
    src[0].fill(3 << 20, 4096, 0).unwrap();
    src[0].mark_dirty(3 << 20, 4096).unwrap();
    src[1].mark_dirty(src[1].len() - 4096, 4096).unwrap();
    for (i, b) in src.iter().enumerate() {
        source.send(20 + i as u32, b.clone(), Selection::Dirty).unwrap();
    }
    source.sync(30).unwrap();
    wait_for(&drx, |e| matches!(e, Event::Synced { epoch: 2, .. }));
    for (i, b) in src.iter().enumerate() {
        assert_eq!(completion(i), (block_digest(b), block_digest(b)), "{compression:?}: block {i} after round 2");
    }

    // A source page changed after it was sent and marked dirty, not sent again: the source
    // takes it from memory, so the digests differ.
    src[0].store(4096 * 77, &[1, 2, 3]).unwrap();
    src[0].mark_dirty(4096 * 77, 3).unwrap();
    let (s, d) = completion(0);
    assert_eq!(s, block_digest(&src[0]));
    assert_ne!(s, d, "a dirty page left unsent is caught");

    dest.finish().unwrap();
    source.close(false);
    assert!(!failure.is_failed());
    dest.close();
}

#[test]
fn plain_three_channels() {
    run(3, Compression::None);
}

#[test]
fn zstd_two_channels() {
    run(2, Compression::Zstd);
}

#[test]
fn zlib_one_channel() {
    run(1, Compression::Zlib);
}
