//! Resume pieces on a real destination (docs/PROTOCOL.md, "Resume"): the complete pieces are
//! taken at each sync barrier, count held pieces, and name only pages that landed.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::integrity::piece_digests;
use multifd_core::resume::{PIECE, mark_held};
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};

mod common;
use common::{fill, sink, source_config};

fn wait_for(rx: &mpsc::Receiver<Event>, mut want: impl FnMut(&Event) -> bool) {
    loop {
        let e = rx.recv_timeout(Duration::from_secs(10)).expect("event in time");
        if want(&e) {
            return;
        }
    }
}

#[test]
fn complete_pieces_are_taken_at_each_barrier_and_count_held_pieces() {
    let src = Arc::new(RamBlock::allocate("mem", 4 * PIECE + 8192, 4096, false).unwrap());
    fill(&src, 3, 7);
    let dst = Arc::new(RamBlock::allocate("mem", src.len(), 4096, false).unwrap());
    // Piece 4 (the short last one) is held from an earlier session: same bytes as the source.
    dst.memory().copy_from(4 * PIECE, &src.read_vec(4 * PIECE, 8192));
    mark_held(&dst, &[4]).unwrap();
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, dsink).unwrap();
    let uuid = [5u8; 16];
    dest.configure(DestConfig {
        uuid,
        channels: 3,
        geometry: Geometry::x86(),
        compression: Compression::None,
        blocks: vec![dst.clone()],
        channel_timeout: Duration::from_secs(5),
        peer_timeout: None,
        integrity: false,
        resume_window: Duration::ZERO,
    })
    .unwrap();
    assert_eq!(dest.complete_pieces(), None, "nothing before the first barrier");
    let (ssink, srx) = sink();
    let failure = Failure::new(ssink);
    let source = Source::start(source_config(dest.address(), uuid, 3), failure.clone()).unwrap();

    // Pieces 0 and 1, and half of piece 2.
    source.send(1, src.clone(), Selection::Ranges(vec![(0, 2 * PIECE + PIECE / 2)])).unwrap();
    source.sync(2).unwrap();
    wait_for(&srx, |e| matches!(e, Event::Done { id: 2, .. }));
    wait_for(&drx, |e| matches!(e, Event::Synced { epoch: 1, .. }));
    assert_eq!(dest.complete_pieces(), Some((1, vec![vec![0b1_0011]])));

    // The rest of piece 2, then piece 3.
    source.send(3, src.clone(), Selection::Ranges(vec![(2 * PIECE + PIECE / 2, PIECE + PIECE / 2)])).unwrap();
    source.sync(4).unwrap();
    wait_for(&drx, |e| matches!(e, Event::Synced { epoch: 2, .. }));
    assert_eq!(dest.complete_pieces(), Some((2, vec![vec![0b1_1111]])));
    assert_eq!(piece_digests(&dst, &[0, 1, 2, 3, 4]), piece_digests(&src, &[0, 1, 2, 3, 4]));

    dest.finish().unwrap();
    source.close(false);
    assert!(!failure.is_failed());
    dest.close();
}
