//! Our own channel streams, recorded off the wire, decode back to the source's blocks.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use multifd_core::ErrorCode;
use multifd_core::block::RamBlock;
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::stream::rebuild;
use multifd_core::transport::{Address, Listener};
use multifd_core::wire::{Compression, Geometry};

mod common;
use common::{fill, sink};

/// Accepts `n` connections and records each one's bytes until it closes.
fn recorder(n: usize) -> (Address, std::thread::JoinHandle<Vec<Vec<u8>>>) {
    let l = Listener::bind(&Address::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let addr = l.local_address().unwrap();
    let h = std::thread::spawn(move || {
        let conns: Vec<_> = (0..n).map(|_| l.accept_timeout(Duration::from_secs(5)).unwrap().expect("a channel")).collect();
        let readers: Vec<_> = conns
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let multifd_core::transport::Socket::Tcp(s) = c.socket() else { unreachable!() };
                    let mut v = Vec::new();
                    (&*s).read_to_end(&mut v).unwrap();
                    v
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    (addr, h)
}

fn record(compression: Compression, channels: u8) -> (Vec<Arc<RamBlock>>, Vec<Vec<u8>>) {
    let blocks: Vec<_> = [("mem", 2 << 20), ("rom", 5 * 4096)].iter().map(|(n, l)| Arc::new(RamBlock::allocate(n, *l, 4096, false).unwrap())).collect();
    blocks.iter().enumerate().for_each(|(i, b)| fill(b, i as u64 + 3, 4));
    let (addr, rec) = recorder(channels as usize);
    let (events, rx) = sink();
    let source = Source::start(
        SourceConfig { compression, ..common::source_config(&addr, [5; 16], channels) },
        Failure::new(events),
    )
    .unwrap();
    for b in &blocks {
        source.send(0, b.clone(), Selection::Whole).unwrap();
    }
    source.sync(1).unwrap();
    // Round 2: rewrite the first pages (data -> other data, data -> zero, zero -> data) and
    // send them again: they may travel on other channels than in round 1.
    blocks[0].fill(4096, 4096, 0x77).unwrap();
    blocks[0].fill(2 * 4096, 4096, 0).unwrap();
    blocks[0].fill(0, 4096, 0x11).unwrap();
    blocks[0].mark_dirty(0, 3 * 4096).unwrap();
    source.send(2, blocks[0].clone(), Selection::Dirty).unwrap();
    source.sync(3).unwrap();
    while !matches!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), Event::Done { id: 3, .. }) {}
    source.close(false);
    (blocks, rec.join().unwrap())
}

#[test]
fn recorded_streams_rebuild_the_blocks_for_every_method() {
    for compression in [Compression::None, Compression::Zlib, Compression::Zstd] {
        let (blocks, streams) = record(compression, 3);
        let refs: Vec<&[u8]> = streams.iter().map(|s| s.as_slice()).collect();
        let r = rebuild(&refs, Geometry::x86(), 1 << 30).unwrap();
        assert_eq!(r.channels.len(), 3);
        let mut ids: Vec<u8> = r.channels.iter().map(|c| c.channel_id).collect();
        ids.sort();
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(r.channels.iter().all(|c| c.syncs == 2 && c.uuid == [5; 16]));
        let data_pages = r.channels.iter().any(|c| c.normal_pages > 0);
        assert!(data_pages && r.channels.iter().all(|c| c.compression == compression || c.normal_pages + c.zero_pages == 0));
        for b in &blocks {
            let (_, data) = r.blocks.iter().find(|(n, _)| n == b.name()).expect("block present");
            assert_eq!(data.len() as u64, b.len(), "{}", b.name());
            let same = (0..b.pages() as u64).all(|p| b.read_page(p * 4096) == data[p as usize * 4096..(p as usize + 1) * 4096]);
            assert!(same, "{} differs with {}", b.name(), compression.name());
        }
    }
}

#[test]
fn hostile_streams_are_errors() {
    let (_, streams) = record(Compression::Zstd, 1);
    let s = &streams[0];
    // Truncated inside a payload.
    let e = rebuild(&[&s[..s.len() - 100]], Geometry::x86(), 1 << 30).unwrap_err();
    assert!(matches!(e.code, ErrorCode::Truncated | ErrorCode::Decompress | ErrorCode::PayloadSize), "{e}");
    // A block larger than allowed.
    let e = rebuild(&[s], Geometry::x86(), 1 << 20).unwrap_err();
    assert_eq!(e.code, ErrorCode::OffsetRange);
    // Not a multifd stream at all.
    assert_eq!(rebuild(&[b"GET / HTTP/1.1\r\n\r\n".repeat(8).as_slice()], Geometry::x86(), 1 << 30).unwrap_err().code, ErrorCode::BadMagic);
}
