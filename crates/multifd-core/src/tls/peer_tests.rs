//! Our record layer (`record.rs`, `stream.rs`) against rustls's own, an independent
//! implementation of the same records: TLS 1.3 with key updates either side starts, TLS 1.2
//! with AES-GCM and ChaCha20-Poly1305, both roles; and the steady-state data path allocating
//! nothing per record.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection, StreamOwned, SupportedProtocolVersion};

use super::stream::{Got, TlsStream};
use super::{Dialed, TlsClient, TlsOptions, TlsServer, load_chain, load_key, load_roots};

const T: Duration = Duration::from_secs(10);

/// Counts the heap allocations each thread makes.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn count() {
    // A thread being torn down has no counter any more; its allocations are not counted.
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only a
// const-initialised thread-local `Cell`, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded from the caller.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded from the caller.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: forwarded from the caller.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// A fresh test PKI from `scripts/test-certs.sh` (openssl), made once per process.
fn pki() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("multifd-tls-unit-{}", std::process::id()));
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/test-certs.sh");
        let ok = std::process::Command::new("bash").arg(script).arg(&dir).status().expect("run test-certs.sh").success();
        assert!(ok, "test-certs.sh failed (is openssl installed?)");
        dir
    })
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(pki().join(name)).unwrap()
}

fn options(who: &str) -> TlsOptions {
    TlsOptions { cert: pem(&format!("{who}.pem")), key: pem(&format!("{who}.key")), ca: pem("ca.pem"), name: Some("localhost".into()), allow: vec![] }
}

struct Localhost;

impl Dialed for Localhost {
    fn host(&self) -> Option<&str> {
        Some("localhost")
    }
}

/// A provider with only `suite` (ours, all of ring's in our order, when `None`).
fn only(suite: Option<rustls::CipherSuite>) -> Arc<CryptoProvider> {
    let mut p = (*super::provider()).clone();
    if let Some(suite) = suite {
        p.cipher_suites.retain(|s| s.suite() == suite);
    }
    Arc::new(p)
}

/// rustls's own client, with the source's certificate.
fn rustls_client(versions: &[&'static SupportedProtocolVersion], suite: Option<rustls::CipherSuite>) -> ClientConnection {
    let config = ClientConfig::builder_with_provider(only(suite))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(load_roots(&pem("ca.pem")).unwrap())
        .with_client_auth_cert(load_chain(&pem("source.pem")).unwrap(), load_key(&pem("source.key")).unwrap())
        .unwrap();
    ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
}

/// rustls's own server, with the destination's certificate, requiring a client certificate.
fn rustls_server(versions: &[&'static SupportedProtocolVersion]) -> ServerConnection {
    let provider = only(None);
    let verifier = WebPkiClientVerifier::builder_with_provider(load_roots(&pem("ca.pem")).unwrap(), provider.clone()).build().unwrap();
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_chain(&pem("dest.pem")).unwrap(), load_key(&pem("dest.key")).unwrap())
        .unwrap();
    ServerConnection::new(Arc::new(config)).unwrap()
}

fn socket_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(T)).unwrap();
        s.set_write_timeout(Some(T)).unwrap();
    }
    (a, b)
}

fn random(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads exactly `len` plaintext bytes through our stream.
fn read_exact(s: &TlsStream, fd: i32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match s.read_some(fd, &mut out[done..], Some(T)).unwrap() {
            Got::Data(n) => done += n,
            other => panic!("{other:?} after {done} of {len} bytes"),
        }
    }
    out
}

/// Odd sizes, so records end mid-write and writes end mid-record.
const SIZES: [usize; 4] = [1, 16383, 16385, (3 << 20) + 77];

#[test]
fn tls13_with_rustls_both_ways_across_key_updates_either_side_starts() {
    let (ours, theirs) = socket_pair();
    let server = TlsServer::new(&options("dest")).unwrap();
    let data: Vec<Vec<u8>> = SIZES.iter().enumerate().map(|(i, &n)| random(n, 7 + i as u64)).collect();
    std::thread::scope(|s| {
        let data = &data;
        let peer = s.spawn(move || {
            let mut tls = StreamOwned::new(rustls_client(&[&rustls::version::TLS13], None), theirs);
            for chunk in data {
                tls.write_all(chunk).unwrap();
                // update_requested: we must renew ours too before our next record.
                tls.conn.refresh_traffic_keys().unwrap();
            }
            tls.flush().unwrap();
            for chunk in data {
                let mut back = vec![0u8; chunk.len()];
                tls.read_exact(&mut back).unwrap();
                assert!(back == *chunk, "rustls read back what we sent, across our key updates");
            }
            tls.conn.send_close_notify();
            tls.flush().unwrap();
        });
        let fd = ours.as_raw_fd();
        let stream = TlsStream::server(fd, &server, &[], Instant::now() + T).unwrap();
        assert_eq!(stream.info().protocol, "TLS 1.3");
        assert_eq!(stream.info().cipher_suite, "TLS13_AES_128_GCM_SHA256");
        for chunk in data {
            assert!(read_exact(&stream, fd, chunk.len()) == *chunk, "we read what rustls sent, across its key updates");
        }
        // Our own key updates every three records, on top of the one rustls asked for.
        stream.set_rekey_after(3);
        for chunk in data {
            stream.write_all(fd, &[chunk]).unwrap();
        }
        assert_eq!(stream.read_some(fd, &mut [0u8; 1], Some(T)).unwrap(), Got::Eof, "close_notify ends the stream");
        peer.join().unwrap();
    });
}

#[test]
fn tls12_with_rustls_aes_gcm_and_chacha20() {
    for (suite, name) in [
        (rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
        (rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"),
        (rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"),
    ] {
        let (ours, theirs) = socket_pair();
        let server = TlsServer::new(&options("dest")).unwrap();
        let data = random((1 << 20) + 5, 99);
        std::thread::scope(|s| {
            let data = &data;
            let peer = s.spawn(move || {
                let mut tls = StreamOwned::new(rustls_client(&[&rustls::version::TLS12], Some(suite)), theirs);
                tls.write_all(data).unwrap();
                let mut back = vec![0u8; data.len()];
                tls.read_exact(&mut back).unwrap();
                assert!(back == *data, "{name}: rustls read back what we sent");
            });
            let fd = ours.as_raw_fd();
            let stream = TlsStream::server(fd, &server, &[], Instant::now() + T).unwrap();
            assert_eq!((stream.info().protocol.as_str(), stream.info().cipher_suite.as_str()), ("TLS 1.2", name));
            assert!(read_exact(&stream, fd, data.len()) == *data, "{name}: we read what rustls sent");
            stream.write_all(fd, &[data]).unwrap();
            peer.join().unwrap();
        });
    }
}

#[test]
fn our_client_with_a_rustls_server() {
    let (ours, theirs) = socket_pair();
    let client = TlsClient::new(&options("source"), &Localhost).unwrap();
    let data = random((2 << 20) + 3, 5);
    std::thread::scope(|s| {
        let data = &data;
        let peer = s.spawn(move || {
            let mut tls = StreamOwned::new(rustls_server(&[&rustls::version::TLS13]), theirs);
            let mut got = vec![0u8; data.len()];
            tls.read_exact(&mut got).unwrap();
            assert!(got == *data, "rustls read what we sent");
            tls.conn.refresh_traffic_keys().unwrap();
            tls.write_all(data).unwrap();
            tls.flush().unwrap();
            // Our answer to its key update comes before our next record.
            let mut one = [0u8; 1];
            tls.read_exact(&mut one).unwrap();
            assert_eq!(one, [42]);
        });
        let fd = ours.as_raw_fd();
        let stream = TlsStream::client(fd, &client, Instant::now() + T).unwrap();
        stream.write_all(fd, &[data]).unwrap();
        assert!(read_exact(&stream, fd, data.len()) == *data, "we read what rustls sent");
        stream.write_all(fd, &[&[42]]).unwrap();
        assert_eq!(stream.sent_under_current_key(), 1, "the server's key update renewed our key before the record after it");
        peer.join().unwrap();
    });
}

#[test]
fn the_data_path_allocates_nothing_per_record() {
    let (a, b) = socket_pair();
    let server = TlsServer::new(&options("dest")).unwrap();
    let client = TlsClient::new(&options("source"), &Localhost).unwrap();
    let data = random(8 << 20, 3);
    std::thread::scope(|s| {
        let data = &data;
        let sender = s.spawn(move || {
            let fd = a.as_raw_fd();
            let stream = TlsStream::client(fd, &client, Instant::now() + T).unwrap();
            stream.write_all(fd, &[b"warm"]).unwrap();
            let before = allocations();
            stream.write_all(fd, &[data]).unwrap();
            let sent = allocations() - before;
            assert_eq!(read_exact(&stream, fd, 2), b"ok");
            sent
        });
        let fd = b.as_raw_fd();
        let stream = TlsStream::server(fd, &server, &[], Instant::now() + T).unwrap();
        assert_eq!(read_exact(&stream, fd, 4), b"warm");
        let mut got = vec![0u8; data.len()];
        let before = allocations();
        let mut done = 0;
        while done < got.len() {
            match stream.read_some(fd, &mut got[done..], Some(T)).unwrap() {
                Got::Data(n) => done += n,
                other => panic!("{other:?} after {done} bytes"),
            }
        }
        let received = allocations() - before;
        stream.write_all(fd, &[b"ok"]).unwrap();
        assert!(got == *data);
        let sent = sender.join().unwrap();
        // 8 MiB is 512 records each way.
        assert_eq!((sent, received), (0, 0), "heap allocations sending and receiving 8 MiB");
    });
}

/// A client whose Finished, first record and key-update request reach us in one read: rustls
/// must hand over after the Finished, before it opens the records that follow (were it to
/// process the key update, it would renew our sending key and drop the answer it queued).
#[test]
fn a_key_update_arriving_with_the_clients_finished() {
    let (ours, mut theirs) = socket_pair();
    let server = TlsServer::new(&options("dest")).unwrap();
    std::thread::scope(|s| {
        let peer = s.spawn(move || {
            let mut conn = rustls_client(&[&rustls::version::TLS13], None);
            // Drive the handshake by hand, holding back the client's last flight.
            while conn.is_handshaking() {
                while conn.wants_write() {
                    conn.write_tls(&mut theirs).unwrap();
                }
                if !conn.is_handshaking() {
                    break;
                }
                conn.read_tls(&mut theirs).unwrap();
                conn.process_new_packets().unwrap();
            }
            conn.writer().write_all(b"first").unwrap();
            conn.refresh_traffic_keys().unwrap();
            let mut flight = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut flight).unwrap();
            }
            theirs.write_all(&flight).unwrap();
            let mut tls = StreamOwned::new(conn, theirs);
            let mut reply = [0u8; 5];
            tls.read_exact(&mut reply).unwrap();
            assert_eq!(&reply, b"reply");
        });
        let fd = ours.as_raw_fd();
        let stream = TlsStream::server(fd, &server, &[], Instant::now() + T).unwrap();
        assert_eq!(read_exact(&stream, fd, 5), b"first");
        stream.write_all(fd, &[b"reply"]).unwrap();
        peer.join().unwrap();
    });
}

/// OpenSSL's `s_server -rev` (a third implementation, which like GnuTLS numbers TLS 1.2
/// AES-GCM explicit nonces its own way, where rustls derives them from the IV) requiring our
/// client certificate: what we send comes back reversed line by line, over TLS 1.2 AES-GCM and
/// TLS 1.3 (whose session tickets arrive after the handshake).
#[test]
fn our_client_with_an_openssl_server() {
    use std::io::BufRead;
    use std::net::TcpStream;
    use std::process::{Command, Stdio};
    let client = TlsClient::new(&options("source"), &Localhost).unwrap();
    for (version, cipher, protocol) in [("-tls1_2", "ECDHE-ECDSA-AES128-GCM-SHA256", "TLS 1.2"), ("-tls1_2", "ECDHE-ECDSA-AES256-GCM-SHA384", "TLS 1.2"), ("-tls1_3", "DEFAULT", "TLS 1.3")] {
        let dir = pki();
        // `timeout` bounds the server's life whatever happens here.
        let mut server = Command::new("timeout")
            .args(["20", "openssl", "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-rev", "-Verify", "1", version, "-cipher", cipher])
            .arg("-cert").arg(dir.join("dest.pem")).arg("-key").arg(dir.join("dest.key")).arg("-CAfile").arg(dir.join("ca.pem"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run openssl s_server");
        let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
        let port = loop {
            let line = lines.next().expect("openssl s_server printed its port").unwrap();
            if let Some(addr) = line.strip_prefix("ACCEPT ") {
                break addr.rsplit_once(':').unwrap().1.parse::<u16>().unwrap();
            }
        };
        let socket = TcpStream::connect(("127.0.0.1", port)).unwrap();
        socket.set_read_timeout(Some(T)).unwrap();
        socket.set_write_timeout(Some(T)).unwrap();
        let fd = socket.as_raw_fd();
        let stream = TlsStream::client(fd, &client, Instant::now() + T).unwrap();
        assert_eq!(stream.info().protocol, protocol);
        // Eight 5000-byte lines in one write: three records out, eight back.
        let text: Vec<u8> = (0..8).flat_map(|l| random(4999, 11 + l).into_iter().map(|b| b'a' + b % 26).chain([b'\n'])).collect();
        stream.write_all(fd, &[&text]).unwrap();
        let back = read_exact(&stream, fd, text.len());
        let expected: Vec<u8> = text.split_inclusive(|&b| b == b'\n').flat_map(|line| line[..line.len() - 1].iter().rev().copied().chain([b'\n'])).collect();
        assert!(back == expected, "{protocol} {cipher}: OpenSSL sent back our lines reversed");
        drop(socket);
        let _ = server.kill();
        server.wait().unwrap();
    }
}

/// TLS 1.2: a server's first record can follow its Finished in the same read, and rustls
/// opens it before the handshake hands over; it is read first, not lost.
#[test]
fn our_tls12_client_reads_what_came_with_the_servers_finished() {
    let (ours, theirs) = socket_pair();
    let client = TlsClient::new(&options("source"), &Localhost).unwrap();
    std::thread::scope(|s| {
        let peer = s.spawn(move || {
            let mut tls = StreamOwned::new(rustls_server(&[&rustls::version::TLS12]), theirs);
            // Queued before the handshake: rustls sends it right behind its Finished.
            tls.conn.writer().write_all(b"first words").unwrap();
            let mut reply = [0u8; 2];
            tls.read_exact(&mut reply).unwrap();
            assert_eq!(&reply, b"ok");
        });
        let fd = ours.as_raw_fd();
        let stream = TlsStream::client(fd, &client, Instant::now() + T).unwrap();
        assert_eq!(stream.info().protocol, "TLS 1.2");
        assert_eq!(read_exact(&stream, fd, 11), b"first words");
        stream.write_all(fd, &[b"ok"]).unwrap();
        peer.join().unwrap();
    });
}

/// A client whose ClientHello is followed, in the same read, by a record of no known content
/// type: the handshake fails with `ERR_MULTIFD_TLS_HANDSHAKE`, one record (the alert; TLS 1.3
/// already encrypts it) goes back, and nothing panics (rustls asserts it is never made to send a second fatal alert, which
/// asking it for the queued alert with the bad bytes still pending used to do).
#[test]
fn a_malformed_record_after_the_client_hello_fails_the_handshake_with_one_alert() {
    let (ours, mut theirs) = socket_pair();
    let server = TlsServer::new(&options("dest")).unwrap();
    let mut conn = rustls_client(&[&rustls::version::TLS13], None);
    let mut flight = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut flight).unwrap();
    }
    flight.extend_from_slice(&[0x63, 3, 3, 0, 4, 1, 2, 3, 4]);
    theirs.write_all(&flight).unwrap();
    let err = TlsStream::server(ours.as_raw_fd(), &server, &[], Instant::now() + T).err().expect("the handshake must fail");
    assert_eq!(err.code, crate::error::ErrorCode::TlsHandshake, "{err}");
    drop(ours);
    let mut answer = Vec::new();
    theirs.read_to_end(&mut answer).unwrap();
    let mut records = 0;
    let mut at = 0;
    while at + 5 <= answer.len() {
        at += 5 + usize::from(u16::from_be_bytes([answer[at + 3], answer[at + 4]]));
        records += 1;
    }
    assert_eq!((records, at), (1, answer.len()), "{} bytes back: {answer:02x?}", answer.len());
}
