//! Mutual TLS end to end: pages over TLS channels, and every refusal with its code on both
//! sides and no page written. Certificates come fresh from `scripts/test-certs.sh` (openssl).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use multifd_core::block::RamBlock;
use multifd_core::control::Control;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::session::{Event, Failure, control_events};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::tls::{TlsClient, TlsOptions, TlsServer};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};
use multifd_core::{Error, ErrorCode};

mod common;
use common::{fill, options, pem, sink};

fn server(allow: &[&str]) -> TlsServer {
    TlsServer::new(&TlsOptions { allow: allow.iter().map(|s| s.to_string()).collect(), ..options("dest", "ca.pem") }).unwrap()
}

fn client(who: &str, ca: &str, name: Option<&str>, addr: &Address) -> TlsClient {
    TlsClient::new(&TlsOptions { name: name.map(str::to_string), ..options(who, ca) }, addr).unwrap()
}

fn is_zero(b: &RamBlock) -> bool {
    (0..b.pages() as u64).all(|p| b.read_page(p * 4096).iter().all(|&x| x == 0))
}

fn source_config(address: &Address, channels: u8, tls: Option<TlsClient>) -> SourceConfig {
    SourceConfig { tls, ..common::source_config(address, [3; 16], channels) }
}

/// A destination with one 1 MiB block, configured for `channels`.
fn destination(tls: Option<TlsServer>, channels: u8) -> (Destination, Arc<RamBlock>, mpsc::Receiver<Event>) {
    let (dsink, drx) = sink();
    let dest = Destination::listen(&Address::parse("tcp:127.0.0.1:0").unwrap(), Duration::from_secs(2), tls, dsink).unwrap();
    let block = Arc::new(RamBlock::allocate("pc.ram", 1 << 20, 4096, false).unwrap());
    dest.configure(DestConfig {
        uuid: [3; 16],
        channels,
        geometry: Geometry::x86(),
        compression: Compression::None,
        blocks: vec![block.clone()],
        channel_timeout: Duration::from_secs(10),
        peer_timeout: None,
        integrity: false,
        resume_window: Duration::ZERO,
    })
    .unwrap();
    (dest, block, drx)
}

fn next_failure(rx: &mpsc::Receiver<Event>, within: Duration) -> Option<Error> {
    let deadline = Instant::now() + within;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Failed(e)) => return Some(e),
            Ok(Event::ControlClosed(Some(e))) => return Some(e),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// The destination's next rejection (a warning); `None` when the session fails first or
/// nothing is rejected within `within`.
fn next_rejection(rx: &mpsc::Receiver<Event>, within: Duration) -> Option<Error> {
    let deadline = Instant::now() + within;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Event::Warning(e)) => return Some(e),
            Ok(Event::Failed(e)) => panic!("a refused peer failed the destination: {e}"),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// A first control frame the destination admits (it looks only at the type; the orchestrator
/// judges the rest).
const HELLO: &[u8] = br#"{"type":"hello"}"#;

fn no_channel_admitted(rx: &mpsc::Receiver<Event>) -> bool {
    rx.try_iter().all(|e| !matches!(e, Event::ChannelUp { .. }))
}

#[test]
fn mutual_tls_moves_every_page_and_hides_them_on_the_wire() {
    let (dest, dst, drx) = destination(Some(server(&["CN=source,O=multifd tests"])), 4);
    // A recording proxy between the two: what an observer on the path sees.
    let (proxy, seen) = recording_proxy(dest.address());
    let src = Arc::new(RamBlock::allocate("pc.ram", 1 << 20, 4096, false).unwrap());
    fill(&src, 11, 0);
    let marker: Vec<u8> = src.read_page(4096 * 7)[..32].to_vec();

    // Control: handshake, then frames both ways.
    let (csink, crx) = sink();
    let control = Control::connect(&proxy, Duration::from_secs(5), Some(&client("source", "ca.pem", Some("localhost"), &proxy)), control_events(csink)).unwrap();
    control.send(HELLO).unwrap();
    loop {
        match drx.recv_timeout(Duration::from_secs(5)).expect("hello arrives") {
            Event::Control(f) => {
                assert_eq!(f, HELLO);
                break;
            }
            Event::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    dest.send_control(b"welcome").unwrap();
    loop {
        if let Event::Control(f) = crx.recv_timeout(Duration::from_secs(5)).expect("welcome arrives") {
            assert_eq!(f, b"welcome");
            break;
        }
    }

    let (ssink, srx) = sink();
    let failure = Failure::new(ssink);
    let source = Source::start(source_config(&proxy, 4, Some(client("source", "ca.pem", Some("localhost"), &proxy))), failure.clone()).unwrap();
    source.send(1, src.clone(), Selection::Whole).unwrap();
    source.sync(2).unwrap();
    loop {
        match srx.recv_timeout(Duration::from_secs(10)).expect("sync done") {
            Event::Done { id: 2, result } => {
                result.unwrap();
                break;
            }
            Event::Failed(e) => panic!("{e}; destination: {:?}", dest.failure().first()),
            _ => {}
        }
    }
    loop {
        if let Event::Synced { epoch: 1, .. } = drx.recv_timeout(Duration::from_secs(10)).expect("synced") {
            break;
        }
    }
    assert!((0..256u64).all(|p| src.read_page(p * 4096) == dst.read_page(p * 4096)), "pages differ");
    dest.finish().unwrap();
    source.close(false);
    control.close();
    dest.close();
    assert!(!failure.is_failed());
    let wire = seen.lock().unwrap().clone();
    assert!(wire.len() > 1 << 20, "the proxy saw {} bytes", wire.len());
    assert!(!wire.windows(marker.len()).any(|w| w == marker), "page bytes visible on the wire");
    assert!(!wire.windows(4).any(|w| w == [0x11, 0x22, 0x33, 0x44]), "multifd magic visible on the wire");
}

/// A TCP proxy to `to` that records every byte the source sends.
fn recording_proxy(to: &Address) -> (Address, Arc<Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = Address::parse(&format!("tcp:127.0.0.1:{}", l.local_addr().unwrap().port())).unwrap();
    let Address::Tcp { host, port } = to.clone() else { unreachable!() };
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut up) = c else { return };
            let mut down = TcpStream::connect((host.as_str(), port)).unwrap();
            let (mut up2, mut down2) = (up.try_clone().unwrap(), down.try_clone().unwrap());
            let rec = rec.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = up.read(&mut buf) {
                    if n == 0 || down.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                let _ = down.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut down2, &mut up2);
                let _ = up2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, seen)
}

/// One refusal: the control connection and, on a fresh destination, the data channels
/// connecting directly (as an attacker skipping control would). The source must fail with its
/// code within a few seconds; the destination rejects the connections (a warning with its
/// code, counted) and carries on unharmed, its block untouched.
fn refused(server_tls: Option<TlsServer>, client_tls: impl Fn(&Address) -> Option<TlsClient>, source_code: ErrorCode, dest_code: ErrorCode) {
    // Control connection.
    let (dest, block, drx) = destination(server_tls.clone(), 1);
    let (csink, crx) = sink();
    let started = Instant::now();
    let source_err = match Control::connect(dest.address(), Duration::from_secs(3), client_tls(dest.address()).as_ref(), control_events(csink)) {
        Err(e) => e,
        Ok(control) => {
            let _ = control.send(HELLO);
            let e = next_failure(&crx, Duration::from_secs(5)).expect("the source's control connection fails");
            control.close();
            e
        }
    };
    assert_eq!(source_err.code, source_code, "source (control): {source_err}");
    let dest_err = next_rejection(&drx, Duration::from_secs(5)).expect("the destination rejects the connection");
    assert_eq!(dest_err.code, dest_code, "destination (control): {dest_err}");
    assert!(dest_err.message.starts_with("rejected a connection from 127.0.0.1:"), "{dest_err}");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(no_channel_admitted(&drx));
    assert!(dest.failure().first().is_none(), "the destination is unharmed");
    assert_eq!(dest.rejected_connections(), 1);
    dest.close();
    assert!(is_zero(&block));

    // Data channels straight at a destination.
    let (dest, block, drx) = destination(server_tls, 2);
    let (ssink, srx) = sink();
    let failure = Failure::new(ssink);
    // More than the two sockets' buffers hold (a few MiB on loopback): a plaintext source never
    // reads its channels, so it learns of the refusal only from a write that the closed
    // connection rejects, which needs it to be still writing when the refusal arrives.
    let src = Arc::new(RamBlock::allocate("pc.ram", 64 << 20, 4096, false).unwrap());
    fill(&src, 5, 0);
    let source_err = match Source::start(source_config(dest.address(), 2, client_tls(dest.address())), failure.clone()) {
        Err(e) => e,
        Ok(source) => {
            let _ = source.send(1, src, Selection::Whole);
            let _ = source.sync(2);
            let e = next_failure(&srx, Duration::from_secs(5)).expect("the source's channels fail");
            source.close(true);
            e
        }
    };
    let dest_err = next_rejection(&drx, Duration::from_secs(5)).expect("the destination rejects the channels");
    assert_eq!(dest_err.code, dest_code, "destination (channels): {dest_err}");
    // A plaintext source does not learn of the refusal on a channel (it never reads there);
    // it sees its channel closed. Every TLS source gets the precise code.
    if source_code != ErrorCode::TlsRequired {
        assert_eq!(source_err.code, source_code, "source (channels): {source_err}");
    } else {
        assert!(matches!(source_err.code, ErrorCode::ConnectionClosed | ErrorCode::TlsRequired), "source (channels): {source_err}");
    }
    assert!(no_channel_admitted(&drx));
    assert!(dest.failure().first().is_none(), "the destination is unharmed");
    dest.close();
    assert!(is_zero(&block), "a refused peer wrote pages");
}

#[test]
fn a_source_that_does_not_trust_the_destinations_ca() {
    refused(Some(server(&[])), |a| Some(client("source", "other-ca.pem", Some("localhost"), a)), ErrorCode::TlsUntrusted, ErrorCode::TlsUntrusted);
}

#[test]
fn a_source_certificate_from_another_ca() {
    refused(Some(server(&[])), |a| Some(client("rogue", "ca.pem", Some("localhost"), a)), ErrorCode::TlsUntrusted, ErrorCode::TlsUntrusted);
}

#[test]
fn an_expired_source_certificate() {
    refused(Some(server(&[])), |a| Some(client("expired", "ca.pem", Some("localhost"), a)), ErrorCode::TlsExpired, ErrorCode::TlsExpired);
}

#[test]
fn a_destination_certificate_for_another_name() {
    refused(Some(server(&[])), |a| Some(client("source", "ca.pem", Some("elsewhere.test"), a)), ErrorCode::TlsNameMismatch, ErrorCode::TlsRejected);
}

#[test]
fn a_source_not_on_the_allow_list() {
    refused(Some(server(&["CN=source,O=multifd tests", "source.test"])), |a| Some(client("intruder", "ca.pem", Some("localhost"), a)), ErrorCode::TlsNotAllowed, ErrorCode::TlsNotAllowed);
}

#[test]
fn a_plaintext_source_at_a_tls_destination() {
    refused(Some(server(&[])), |_| None, ErrorCode::TlsRequired, ErrorCode::TlsRequired);
}

#[test]
fn a_tls_source_at_a_plaintext_destination() {
    refused(None, |a| Some(client("source", "ca.pem", Some("localhost"), a)), ErrorCode::TlsUnavailable, ErrorCode::TlsUnavailable);
}

#[test]
fn allow_list_accepts_an_alternative_name() {
    let (dest, _block, drx) = destination(Some(server(&["source.test"])), 1);
    let (csink, _crx) = sink();
    let control = Control::connect(dest.address(), Duration::from_secs(3), Some(&client("source", "ca.pem", Some("127.0.0.1"), dest.address())), control_events(csink)).unwrap();
    control.send(HELLO).unwrap();
    loop {
        match drx.recv_timeout(Duration::from_secs(5)).expect("frame") {
            Event::Control(_) => break,
            Event::Failed(e) => panic!("{e}"),
            _ => {}
        }
    }
    control.close();
    dest.close();
}

#[test]
fn a_client_that_stalls_mid_handshake_is_cut_off() {
    let (dest, block, drx) = destination(Some(server(&[])), 1);
    let Address::Tcp { port, .. } = dest.address().clone() else { unreachable!() };
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // The first bytes of a ClientHello record, then nothing.
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    let started = Instant::now();
    let e = next_rejection(&drx, Duration::from_secs(6)).expect("the destination gives up on it");
    assert_eq!(e.code, ErrorCode::Timeout, "{e}");
    assert!(e.message.contains("TLS handshake"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?} with a 2 s classify timeout", started.elapsed());
    assert!(dest.failure().first().is_none(), "the destination is unharmed");
    dest.close();
    assert!(is_zero(&block));
}

#[test]
fn a_server_that_stalls_mid_handshake_is_cut_off() {
    // Accepts and reads the ClientHello, never answers.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = Address::parse(&format!("tcp:127.0.0.1:{}", l.local_addr().unwrap().port())).unwrap();
    let (done, until_done) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = [0u8; 4096];
        let _ = c.read(&mut buf);
        let _ = until_done.recv_timeout(Duration::from_secs(10)); // hold the connection open
    });
    let started = Instant::now();
    let (csink, _crx) = sink();
    let e = Control::connect(&addr, Duration::from_millis(1500), Some(&client("source", "ca.pem", Some("localhost"), &addr)), control_events(csink)).err().expect("connect fails");
    assert_eq!(e.code, ErrorCode::Timeout, "{e}");
    assert!(e.message.contains("TLS handshake"), "{e}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(3), "took {took:?} with a 1.5 s timeout");
    done.send(()).unwrap();
    holder.join().unwrap();
}

#[test]
fn zero_copy_with_tls_is_refused() {
    let addr = Address::parse("tcp:127.0.0.1:1").unwrap();
    let mut cfg = source_config(&addr, 1, Some(client("source", "ca.pem", None, &addr)));
    cfg.zero_copy = true;
    let (ssink, _rx) = sink();
    let e = Source::start(cfg, Failure::new(ssink)).err().expect("refused");
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.message.contains("TLS"), "{e}");
}

#[test]
fn a_key_that_does_not_match_its_certificate() {
    let opts = TlsOptions { key: pem("intruder.key"), ..options("dest", "ca.pem") };
    assert_eq!(TlsServer::new(&opts).unwrap_err().code, ErrorCode::TlsConfig);
    let addr = Address::parse("tcp:127.0.0.1:1").unwrap();
    assert_eq!(TlsClient::new(&opts, &addr).unwrap_err().code, ErrorCode::TlsConfig);
}

#[test]
fn identities_read_from_a_real_certificate() {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(&pem("source.pem")).unwrap();
    let id = multifd_core::tls::Identity::from_der(&der).unwrap();
    assert_eq!(id.subject, "CN=source,O=multifd tests");
    assert_eq!(id.common_name.as_deref(), Some("source"));
    assert_eq!(id.alt_names, vec!["source.test".to_string()]);
    let der = CertificateDer::from_pem_slice(&pem("dest.pem")).unwrap();
    let id = multifd_core::tls::Identity::from_der(&der).unwrap();
    assert_eq!(id.alt_names, vec!["localhost".to_string(), "dest.test".into(), "127.0.0.1".into()]);
}

#[test]
fn closing_a_source_session_does_not_wait_for_a_stalled_connect() {
    // A listener that completes TCP handshakes (kernel backlog) but never answers TLS: the
    // control connect stalls in its TLS handshake until the connect timeout.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = Address::parse(&format!("tcp:{}", silent.local_addr().unwrap())).unwrap();
    let (events, rx) = sink();
    let tls = client("source", "ca.pem", Some("localhost"), &addr);
    let session = multifd_core::lifecycle::SourceSession::connect(addr, Duration::from_secs(4), Some(tls), events).unwrap();
    let started = std::time::Instant::now();
    session.close(true);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "close waited {took:?} for a connect in flight");
    // The connect ends on its own within its timeout and reports nothing as connected.
    drop(session);
    let connected = rx.recv_timeout(Duration::from_secs(6)).into_iter().any(|e| matches!(e, Event::ControlConnected));
    assert!(!connected);
    drop(silent);
}
