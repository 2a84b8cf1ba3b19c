//! The destination's acceptor under floods: connections that never identify themselves,
//! channels that arrive before any session, and a process out of descriptors. A real source
//! still gets in, nothing is fatal, nothing spins, and every descriptor is closed afterwards.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use multifd_core::block::RamBlock;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::limits::{MAX_EARLY_CHANNELS, MAX_UNIDENTIFIED};
use multifd_core::integrity::block_digest;
use multifd_core::session::{Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry, InitPacket};
use multifd_core::ErrorCode;

mod common;
use common::{fill, sink};

const UUID: [u8; 16] = [7; 16];
const SIZE: u64 = 8 << 20;

/// The tests here count the process's descriptors: they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits (bounded, backing off) until `cond` holds.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pause = Duration::from_millis(1);
    while !cond() {
        assert!(Instant::now() < deadline, "{what} did not happen within 20 s");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

fn dest_config(channels: u8, block: &Arc<RamBlock>) -> DestConfig {
    DestConfig { uuid: UUID, channels, geometry: Geometry::x86(), compression: Compression::None, blocks: vec![block.clone()], channel_timeout: Duration::from_secs(30), peer_timeout: None, integrity: false, resume_window: Duration::ZERO }
}

/// Sends `block` to `address` over `channels` channels and waits until the final SYNC has been
/// written on every one of them. The caller closes the source once the destination finished.
fn send(address: &Address, channels: u8, block: &Arc<RamBlock>) -> Source {
    let (ssink, srx) = sink();
    let config = SourceConfig { connect_timeout: Duration::from_secs(10), ..common::source_config(address, UUID, channels) };
    let source = Source::start(config, Failure::new(ssink)).expect("the real source connects");
    source.send(1, block.clone(), Selection::Whole).unwrap();
    source.sync(2).unwrap();
    loop {
        match srx.recv_timeout(Duration::from_secs(20)).expect("the source finishes in time") {
            Event::Done { id: 2, result } => break result.map(drop).expect("sync"),
            Event::Failed(e) => panic!("source failed: {e}"),
            _ => {}
        }
    }
    source
}

fn source_block() -> Arc<RamBlock> {
    let b = Arc::new(RamBlock::allocate("pc.ram", SIZE, 4096, false).unwrap());
    fill(&b, 11, 7);
    b
}

#[test]
fn a_real_source_gets_in_past_silent_connections_and_early_strangers() {
    let _serial = one_at_a_time();
    let baseline = open_fds();
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(10), None, dsink).unwrap();
    let Address::Tcp { port, .. } = dest.address().clone() else { unreachable!() };
    // Channels of no session (random UUIDs) before any session exists, more than are kept...
    let extra = 9;
    let early: Vec<TcpStream> = (0..MAX_EARLY_CHANNELS + extra)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let uuid: [u8; 16] = std::array::from_fn(|j| (i * 31 + j) as u8 | 0x80);
            s.write_all(&InitPacket { uuid, channel_id: 0 }.encode()).unwrap();
            s
        })
        .collect();
    eventually("the early channels being held", || dest.early_channels() == MAX_EARLY_CHANNELS);
    // ... then more silent connections than are kept while unidentified, all held open.
    let silent: Vec<TcpStream> = (0..MAX_UNIDENTIFIED + extra).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    eventually("the silent flood being accepted", || dest.rejected_connections() as usize >= 2 * extra);

    let src = source_block();
    let dst = Arc::new(RamBlock::allocate("pc.ram", SIZE, 4096, false).unwrap());
    dest.configure(dest_config(4, &dst)).unwrap();
    let source = send(dest.address(), 4, &src);
    while !matches!(drx.recv_timeout(Duration::from_secs(20)).expect("the destination syncs"), Event::Synced { epoch: 1, .. }) {}
    dest.finish().expect("no stranger failed the session");
    source.close(false);
    assert_eq!(block_digest(&dst), block_digest(&src), "destination equals source");
    // Every early channel was closed (crowded out, or naming another session at configure),
    // and at least the silent ones beyond the cap.
    assert!(dest.rejected_connections() as usize >= MAX_EARLY_CHANNELS + 2 * extra, "{} rejected", dest.rejected_connections());
    drop((early, silent));
    dest.close();
    assert_eq!(open_fds(), baseline, "descriptors back to where they were");
}

#[test]
fn more_channels_than_classifier_threads_once_allowed_all_get_in() {
    // The acceptor once classified in line past 64 classifier threads, and a plaintext channel's
    // receive loop runs on the thread that classified it: channel 65 took the acceptor over.
    let _serial = one_at_a_time();
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(10), None, dsink).unwrap();
    let src = source_block();
    let dst = Arc::new(RamBlock::allocate("pc.ram", SIZE, 4096, false).unwrap());
    dest.configure(dest_config(100, &dst)).unwrap();
    let source = send(dest.address(), 100, &src);
    loop {
        match drx.recv_timeout(Duration::from_secs(20)).expect("the destination syncs") {
            Event::Synced { epoch: 1, .. } => break,
            Event::Failed(e) => panic!("the destination failed: {e}"),
            _ => {}
        }
    }
    dest.finish().unwrap();
    source.close(false);
    assert_eq!(block_digest(&dst), block_digest(&src));
}

#[test]
fn early_channels_expire_after_the_classify_timeout() {
    let _serial = one_at_a_time();
    let (dsink, _drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_millis(300), None, dsink).unwrap();
    let Address::Tcp { port, .. } = dest.address().clone() else { unreachable!() };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&InitPacket { uuid: [1; 16], channel_id: 0 }.encode()).unwrap();
    eventually("the early channel being held", || dest.early_channels() == 1);
    eventually("the early channel expiring", || dest.early_channels() == 0);
    assert_eq!(dest.rejected_connections(), 1);
    // The destination closed it: the peer sees the end of the stream.
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(std::io::Read::read(&mut s, &mut [0; 1]).unwrap(), 0);
    assert!(dest.failure().first().is_none());
}

const CHILD_ENV: &str = "MULTIFD_ACCEPTOR_CHILD";
/// The child's descriptor limit (`prlimit --nofile`): the flood goes well past it.
const CHILD_FDS: usize = 96;

/// CPU time (user + system) of process `pid`, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based over the line).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[test]
fn out_of_descriptors_the_acceptor_backs_off_and_recovers() {
    let _serial = one_at_a_time();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={CHILD_FDS}:{CHILD_FDS}"))
        .arg("--")
        .arg(exe)
        .args(["--exact", "destination_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("prlimit runs");
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = |prefix: &str| -> String {
        loop {
            let line = lines.next().expect("a line from the child").unwrap();
            // libtest may print `test destination_child ... ` ahead of the first line.
            if let Some((_, rest)) = line.split_once(prefix) {
                return rest.trim().to_string();
            }
        }
    };
    let address = Address::parse(&next("listening")).unwrap();
    let Address::Tcp { port, .. } = address.clone() else { unreachable!() };

    // Twice the child's descriptors in silent connections, held open.
    let flood: Vec<TcpStream> = (0..2 * CHILD_FDS).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    // Whatever it does about them, it may not spin: a second of wall time, a fraction on CPU.
    let before = cpu_time(pid);
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(1)); // a measuring window, not a synchronisation
    let used = cpu_time(pid) - before;
    let wall = window.elapsed();
    assert!(used < wall / 4, "the child used {used:?} of CPU in {wall:?} out of descriptors");

    // A real source still gets in while the flood is held open, and its data arrives whole.
    let src = source_block();
    let source = send(&address, 2, &src);
    let digest = next("digest");
    assert_eq!(digest, format!("{:016x}", block_digest(&src)), "destination equals source");
    source.close(false);

    drop(flood);
    writeln!(stdin, "close").unwrap();
    let fds: Vec<u64> = next("fds").split_whitespace().map(|w| w.parse().unwrap()).collect();
    let [after, baseline, strangers] = fds[..] else { panic!("{fds:?}") };
    assert_eq!(after, baseline, "the child's descriptors are back to baseline");
    assert!(strangers > 0, "the flood was shed");
    assert!(child.wait().unwrap().success());
}

/// The destination side of `out_of_descriptors_the_acceptor_backs_off_and_recovers`, run in a
/// child process under a low descriptor limit. Talks to the parent in lines.
#[test]
#[ignore = "run by out_of_descriptors_the_acceptor_backs_off_and_recovers in a child process"]
fn destination_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let baseline = open_fds();
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(60), None, dsink).unwrap();
    let dst = Arc::new(RamBlock::allocate("pc.ram", SIZE, 4096, false).unwrap());
    dest.configure(dest_config(2, &dst)).unwrap();
    println!("listening {}", dest.address());
    loop {
        match drx.recv_timeout(Duration::from_secs(60)).expect("the real source's sync") {
            Event::Synced { epoch: 1, .. } => break,
            Event::Failed(e) => panic!("the destination failed: {e}"),
            _ => {}
        }
    }
    dest.finish().expect("no stranger failed the session");
    println!("digest {:016x}", block_digest(&dst));
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let strangers = dest.rejected_connections();
    dest.close();
    drop(dest);
    println!("fds {} {baseline} {strangers}", open_fds());
}

/// Opens a connection to `port` that sends `bytes` and stays open; returns it with the address
/// the destination sees it from.
fn junk(port: u16, bytes: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(bytes).unwrap();
    let peer = s.local_addr().unwrap().to_string();
    (s, peer)
}

/// A control connection's first bytes: the magic, then one frame.
fn control_bytes(frame: &[u8]) -> Vec<u8> {
    let mut b = multifd_core::control::CONTROL_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    b.extend_from_slice(frame);
    b
}

#[test]
fn every_kind_of_stranger_is_rejected_with_its_reason_and_the_session_carries_on() {
    let _serial = one_at_a_time();
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(2), None, dsink).unwrap();
    let Address::Tcp { port, .. } = dest.address().clone() else { unreachable!() };
    let next = |what: &str| loop {
        match drx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what} within 10 s")) {
            Event::Failed(e) => panic!("{what}: the destination failed: {e}"),
            Event::Warning(w) => break Some(w),
            Event::Control(frame) => {
                assert_eq!(frame, br#"{"type":"hello"}"#, "{what}");
                break None;
            }
            _ => {}
        }
    };
    // The session's own control connection: its first frame is the hello.
    let (_control, _) = junk(port, &control_bytes(br#"{"type":"hello"}"#));
    assert!(next("the hello").is_none(), "the hello was admitted");
    let dst = Arc::new(RamBlock::allocate("pc.ram", SIZE, 4096, false).unwrap());
    dest.configure(dest_config(2, &dst)).unwrap();

    let mut other_uuid = InitPacket { uuid: [9; 16], channel_id: 0 }.encode().to_vec();
    other_uuid.truncate(64);
    let kinds: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("an HTTP request", b"GET / HTTP/1.1\r\n\r\n".to_vec(), ErrorCode::UnknownChannel),
        ("a TLS ClientHello at a plaintext destination", vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 0, 0, 1, 0], ErrorCode::TlsUnavailable),
        ("a channel of another session", other_uuid, ErrorCode::UuidMismatch),
        ("the control magic, then garbage", control_bytes(b"\x00\x01garbage"), ErrorCode::Protocol),
        ("the control magic, then an oversized frame", [multifd_core::control::CONTROL_MAGIC.to_be_bytes(), [0xff; 4]].concat(), ErrorCode::Protocol),
        ("a control connection that starts with a ping", control_bytes(br#"{"type":"ping"}"#), ErrorCode::Protocol),
        ("a second hello", control_bytes(br#"{"type":"hello"}"#), ErrorCode::Protocol),
        ("a connection that closes at once", Vec::new(), ErrorCode::ConnectionClosed),
    ];
    let mut held = Vec::new();
    for (what, bytes, code) in &kinds {
        let (s, peer) = junk(port, bytes);
        if bytes.is_empty() {
            s.shutdown(std::net::Shutdown::Both).unwrap();
        }
        let w = next(what).unwrap_or_else(|| panic!("{what} was admitted as a control connection"));
        assert_eq!(w.code, *code, "{what}: {w}");
        assert!(w.message.starts_with(&format!("rejected a connection from {peer}: ")), "{what}: {w}");
        held.push(s);
    }
    // A silent one is rejected after the classify timeout.
    let (silent, peer) = junk(port, &[]);
    let w = next("the silent connection").unwrap();
    assert_eq!((w.code, w.message.starts_with(&format!("rejected a connection from {peer}: sent nothing within 2000 ms"))), (ErrorCode::Timeout, true), "{w}");
    assert_eq!(dest.rejected_connections(), kinds.len() as u64 + 1);

    // The session is unharmed: a real source completes it.
    let src = source_block();
    let source = send(dest.address(), 2, &src);
    while !matches!(drx.recv_timeout(Duration::from_secs(20)).expect("the destination syncs"), Event::Synced { epoch: 1, .. }) {}
    dest.finish().expect("no stranger failed the session");
    source.close(false);
    assert_eq!(block_digest(&dst), block_digest(&src), "destination equals source");
    drop((held, silent));
    dest.close();
}

#[test]
fn a_channel_of_this_session_that_breaks_the_protocol_still_fails_it() {
    let _serial = one_at_a_time();
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(2), None, dsink).unwrap();
    let Address::Tcp { port, .. } = dest.address().clone() else { unreachable!() };
    let dst = Arc::new(RamBlock::allocate("pc.ram", SIZE, 4096, false).unwrap());
    dest.configure(dest_config(2, &dst)).unwrap();
    // The right session, a channel id out of range.
    let (_s, _) = junk(port, &InitPacket { uuid: UUID, channel_id: 2 }.encode());
    let e = loop {
        match drx.recv_timeout(Duration::from_secs(10)).expect("the session fails within 10 s") {
            Event::Failed(e) => break e,
            Event::Warning(w) => panic!("rejected instead of failing the session: {w}"),
            _ => {}
        }
    };
    assert_eq!(e.code, ErrorCode::ChannelIdRange, "{e}");
    assert_eq!(dest.rejected_connections(), 0);
    dest.close();
}

/// Reads one control frame from a raw control connection.
fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut frame).unwrap();
    frame
}

/// A destination whose control connection said hello, configured for 2 channels with
/// `resume_window`.
struct Configured {
    dest: Destination,
    events: std::sync::mpsc::Receiver<Event>,
    port: u16,
    control: TcpStream,
}

fn configured_after_hello(resume_window: Duration) -> Configured {
    let (dsink, events) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(2), None, dsink).unwrap();
    let Address::Tcp { port, .. } = dest.address().clone() else { unreachable!() };
    let (control, _) = junk(port, &control_bytes(br#"{"type":"hello"}"#));
    loop {
        if let Event::Control(_) = events.recv_timeout(Duration::from_secs(10)).expect("the hello") {
            break;
        }
    }
    let block = Arc::new(RamBlock::allocate("pc.ram", SIZE, 4096, false).unwrap());
    dest.configure(DestConfig { resume_window, ..dest_config(2, &block) }).unwrap();
    Configured { dest, events, port, control }
}

#[test]
fn a_control_reconnect_is_admitted_only_for_this_session_and_answered_with_what_the_destination_knows() {
    let _serial = one_at_a_time();
    let Configured { dest, events: drx, port, control, .. } = configured_after_hello(Duration::from_secs(5));
    let session = UUID.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let next = || loop {
        match drx.recv_timeout(Duration::from_secs(10)).expect("an event within 10 s") {
            Event::Failed(e) => panic!("the destination failed: {e}"),
            Event::ControlClosed(end) => panic!("the control connection's end reached the orchestrator: {end:?}"),
            e @ (Event::Warning(_) | Event::Recovered(_)) => break e,
            _ => {}
        }
    };
    // Another session's reconnect is a stranger.
    let (_other, _) = junk(port, &control_bytes(br#"{"type":"reconnect","session":"ffffffffffffffffffffffffffffffff","acked":0}"#));
    let Event::Warning(w) = next() else { panic!("not rejected") };
    assert_eq!(w.code, ErrorCode::UuidMismatch, "{w}");
    // The session's control connection breaks; the window holds the session.
    drop(control);
    // Its replacement is admitted and answered before anything else.
    let (mut again, _) = junk(port, &control_bytes(format!(r#"{{"type":"reconnect","session":"{session}","acked":0}}"#).as_bytes()));
    assert_eq!(read_frame(&mut again), br#"{"type":"reconnected","epoch":0,"completed":false}"#);
    let Event::Recovered(r) = next() else { panic!("no recovery") };
    assert_eq!((r.connection, r.cause.code, r.pages_resent), (None, ErrorCode::ConnectionClosed, 0));
    // A later `completed` goes out on the replacement.
    dest.send_control(br#"{"type":"completed"}"#).unwrap();
    assert_eq!(read_frame(&mut again), br#"{"type":"completed"}"#);
    assert_eq!(dest.rejected_connections(), 1);
    assert!(dest.failure().first().is_none());
    dest.close();
}

#[test]
fn a_lost_control_connection_fails_the_destination_only_after_the_resume_window() {
    let _serial = one_at_a_time();
    let Configured { dest, events: drx, control, .. } = configured_after_hello(Duration::from_millis(500));
    let lost = Instant::now();
    drop(control);
    let end = loop {
        if let Event::ControlClosed(end) = drx.recv_timeout(Duration::from_secs(10)).expect("the window ends within 10 s") {
            break end;
        }
    };
    let waited = lost.elapsed();
    let e = end.expect("an error, not a clean end");
    assert_eq!(e.code, ErrorCode::ConnectionClosed, "{e}");
    assert!(e.message.contains("resumeWindowMs (500 ms)"), "{e}");
    assert!(waited >= Duration::from_millis(450) && waited < Duration::from_secs(5), "told after {waited:?}");
    dest.close();
}
