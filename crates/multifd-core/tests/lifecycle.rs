//! A source session's lifecycle against a real destination, without JavaScript: control
//! connection, channels, the destination's own SYNC acknowledgement, and the sequencing rules
//! that keep either side from completing without the data.

use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use multifd_core::ErrorCode;
use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::lifecycle::SourceSession;
use multifd_core::session::Event;
use multifd_core::source::{Selection, SourceConfig};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};

mod common;
use common::{fill, sink};

const UUID: [u8; 16] = [7; 16];

fn wait_for<T>(rx: &mpsc::Receiver<Event>, mut want: impl FnMut(Event) -> Option<T>) -> T {
    loop {
        let e = rx.recv_timeout(Duration::from_secs(10)).expect("event in time");
        if let Some(v) = want(e) {
            return v;
        }
    }
}

fn dest_config(channels: u8, blocks: Vec<Arc<RamBlock>>) -> DestConfig {
    DestConfig {
        uuid: UUID,
        channels,
        geometry: Geometry::x86(),
        compression: Compression::None,
        blocks,
        channel_timeout: Duration::from_secs(10),
        peer_timeout: None,
        integrity: false,
        resume_window: Duration::ZERO,
    }
}

fn source_config(s: &SourceSession, channels: u8) -> SourceConfig {
    SourceConfig { address: s.address().clone(), tls: s.tls().cloned(), ..source_config_for(channels) }
}

fn block(name: &str) -> Arc<RamBlock> {
    Arc::new(RamBlock::allocate(name, 2 << 20, 4096, false).unwrap())
}

#[test]
fn a_whole_session_with_the_destination_acknowledging_syncs_itself() {
    let (src, dst) = (block("ram"), block("ram"));
    fill(&src, 3, 7);
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, dsink).unwrap();
    let (ssink, srx) = sink();
    let session = SourceSession::connect(dest.address().clone(), Duration::from_secs(5), None, ssink).unwrap();
    wait_for(&srx, |e| matches!(e, Event::ControlConnected).then_some(()));
    // A control connection is admitted by its first frame, a hello. The hello/welcome exchange
    // is the orchestrator's; here the destination is configured directly, as its orchestrator
    // would after a hello.
    session.send_control(br#"{"type":"hello"}"#).unwrap();
    wait_for(&drx, |e| matches!(e, Event::ControlConnected).then_some(()));
    dest.configure(dest_config(3, vec![dst.clone()])).unwrap();
    session.start_channels(source_config(&session, 3)).unwrap();
    wait_for(&srx, |e| matches!(e, Event::ChannelsReady).then_some(()));
    session.send(1, src.clone(), Selection::Whole).unwrap();
    let epoch = session.sync(2).unwrap();
    assert_eq!(epoch, 1);
    // The destination's channel threads send `synced` on the control connection themselves.
    let frame = wait_for(&srx, |e| match e {
        Event::Control(f) => Some(f),
        Event::Failed(e) => panic!("{e}"),
        _ => None,
    });
    let text = String::from_utf8(frame).unwrap();
    assert!(text.starts_with(r#"{"type":"synced","epoch":1,"packetNum":"#), "{text}");
    session.synced(1).unwrap();
    session.send_complete(1, br#"{"type":"complete","epoch":1}"#).unwrap();
    dest.complete(1).unwrap();
    session.completed().unwrap();
    session.close(false);
    dest.close();
    assert!((0..src.pages() as u64).all(|p| src.read_page(p * 4096) == dst.read_page(p * 4096)), "blocks differ");
}

#[test]
fn a_destination_refuses_complete_before_every_channel_delivered_the_last_sync() {
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, dsink).unwrap();
    dest.configure(dest_config(4, vec![block("ram")])).unwrap();
    // Hello announced 4 channels, none connected, then `complete`.
    let err = dest.complete(0).unwrap_err();
    assert_eq!(err.code, ErrorCode::OutOfSequence);
    let failed = wait_for(&drx, |e| match e {
        Event::Failed(e) => Some(e),
        _ => None,
    });
    assert_eq!(failed.code, ErrorCode::OutOfSequence);
    dest.close();
}

#[test]
fn a_source_refuses_acknowledgements_it_is_not_owed() {
    let (dsink, _drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(5), None, dsink).unwrap();
    let (ssink, srx) = sink();
    let session = SourceSession::connect(dest.address().clone(), Duration::from_secs(5), None, ssink).unwrap();
    wait_for(&srx, |e| matches!(e, Event::ControlConnected).then_some(()));
    // `synced` for an epoch never sent, then `completed` before `complete`.
    assert_eq!(session.synced(1).unwrap_err().code, ErrorCode::OutOfSequence);
    assert_eq!(session.completed().unwrap_err().code, ErrorCode::OutOfSequence);
    let failed = wait_for(&srx, |e| match e {
        Event::Failed(e) => Some(e),
        _ => None,
    });
    assert_eq!(failed.code, ErrorCode::OutOfSequence);
    // First error wins: the second refusal is kept as secondary.
    assert_eq!(session.failure().secondary().len(), 1);
    session.close(true);
    dest.close();
}

#[test]
fn unsent_bytes_shrink_as_the_destination_reads() {
    use std::io::Read;
    use multifd_core::session::Failure;
    use multifd_core::source::Source;
    // A peer that lets the channels connect (kernel backlog) but reads nothing until told.
    let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = Address::parse(&format!("tcp:{}", peer.local_addr().unwrap())).unwrap();
    let big = Arc::new(RamBlock::allocate("ram", 64 << 20, 4096, false).unwrap());
    fill(&big, 5, 0);
    let (events, _rx) = sink();
    // A peer timeout, so a failing assertion does not leave a channel blocked in write forever.
    let config = SourceConfig { address, zero_page_detection: false, peer_timeout: Some(Duration::from_secs(2)), ..source_config_for(1) };
    let source = Source::start(config, Failure::new(events)).unwrap();
    source.send(1, big, Selection::Whole).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut queued = 0;
    while queued == 0 && std::time::Instant::now() < deadline {
        queued = source.unsent_bytes();
        std::thread::yield_now();
    }
    assert!(queued > 0, "nothing queued on the channel");
    // The peer starts reading: what this side has queued drains.
    let (mut conn, _) = peer.accept().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        while conn.read(&mut buf).is_ok_and(|n| n > 0) {}
    });
    let mut now = queued;
    while now >= queued && std::time::Instant::now() < deadline {
        now = source.unsent_bytes();
        std::thread::yield_now();
    }
    assert!(now < queued, "the send queue never shrank ({queued} bytes)");
    source.close(true);
    reader.join().unwrap();
}

fn source_config_for(channels: u8) -> SourceConfig {
    common::source_config(&Address::parse("tcp:127.0.0.1:1").unwrap(), UUID, channels)
}
