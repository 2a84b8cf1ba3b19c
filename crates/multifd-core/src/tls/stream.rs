//! One TLS session over a blocking socket, shared by the threads that use the connection.
//!
//! The session state sits behind a mutex. Reads never block while holding it: the reading
//! thread polls the socket first and feeds what arrived, so a writer on another thread (the
//! control connection writes from JavaScript while its reader waits) is never stuck behind an
//! idle peer. Writes encrypt and send under the lock, which keeps records in sequence order.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustls::Connection;

use super::{TlsClient, TlsServer, tls_error};
use crate::error::{Error, ErrorCode, Result, fail};
use crate::error::os_error;
use crate::io::wait_readable;

/// Bytes read from the socket per system call; rustls takes them 4 KiB at a time.
const INBOX_SIZE: usize = 256 << 10;
/// Encrypted bytes rustls may hold before they are written (a writev of four records). Kept
/// under glibc's default trim threshold (128 KiB): a larger backlog of per-record allocations,
/// freed together after every write, made the allocator hand its pages back and fault them in
/// again on every packet (measured: +200 k page faults and -30% throughput per GiB with 1 MiB).
const SEND_BUFFER: usize = 64 << 10;

/// What a plaintext destination answers to a TLS ClientHello before closing: the control
/// magic "MFDC", which no TLS record starts with, so the source can say what went wrong.
pub(crate) const PLAINTEXT_REFUSAL: [u8; 4] = crate::wire::CONTROL_MAGIC.to_be_bytes();
/// What a TLS destination answers to a plaintext peer: a TLS fatal `handshake_failure` alert
/// record, which a plaintext reader recognises as TLS.
const TLS_REFUSAL: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40];

/// Whether a connection's first bytes are a TLS handshake record (a ClientHello).
pub(crate) fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [0x16, 0x03, ..])
}

/// Best-effort answer to a TLS client at a destination without TLS.
pub(crate) fn refuse_tls_peer(fd: RawFd) {
    let _ = crate::io::write_all(fd, &[&PLAINTEXT_REFUSAL]);
}

/// Best-effort answer to a plaintext peer at a destination that requires TLS.
pub(crate) fn refuse_plaintext_peer(fd: RawFd) {
    let _ = crate::io::write_all(fd, &[&TLS_REFUSAL]);
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    Data(usize),
    /// The peer closed the connection (with or without close_notify).
    Eof,
    /// The read timeout passed with nothing to read.
    Idle,
}

/// Raw bytes read from the socket that rustls has not taken yet.
struct Inbox {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
}

impl Inbox {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads from the socket into the (empty) inbox; false when the timeout passed first.
    fn fill(&mut self, fd: RawFd, timeout: Option<Duration>) -> Result<bool> {
        debug_assert!(self.pending().is_empty());
        if !wait_readable(fd, timeout)? {
            return Ok(false);
        }
        (self.start, self.end) = (0, 0);
        let n = raw_read(fd, &mut self.buf).map_err(|e| os_error("read from connection", e))?;
        self.end = n;
        self.eof = n == 0;
        Ok(true)
    }

    /// Hands rustls what it will take and processes it.
    fn feed(&mut self, conn: &mut Connection) -> std::result::Result<(), FeedError> {
        let mut pending = if self.eof { &[][..] } else { &self.buf[self.start..self.end] };
        let before = pending.len();
        conn.read_tls(&mut pending).map_err(FeedError::Io)?;
        self.start += before - pending.len();
        conn.process_new_packets().map(|_| ()).map_err(FeedError::Tls)
    }
}

enum FeedError {
    Io(io::Error),
    Tls(rustls::Error),
}

/// A TLS session as negotiated.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// `TLS 1.3` or `TLS 1.2`.
    pub protocol: String,
    /// e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher_suite: String,
    /// The identity in the peer's (verified) certificate.
    pub peer: Option<super::Identity>,
}

/// A TLS session: its rustls state and the bytes read ahead of it.
pub struct TlsStream {
    state: Mutex<Connection>,
    inbox: Mutex<Inbox>,
    /// "source" or "destination", for messages.
    peer: &'static str,
}

impl TlsStream {
    /// Runs the client handshake on `fd` (the source side) before `deadline`.
    pub(crate) fn client(fd: RawFd, client: &TlsClient, deadline: Instant) -> Result<TlsStream> {
        let conn = Connection::from(client.connection()?);
        Self::handshake(fd, conn, &[], deadline, "destination", None)
    }

    /// Runs the server handshake on `fd` (the destination side); `prefix` holds the bytes the
    /// acceptor already read to tell TLS from plaintext.
    pub(crate) fn server(fd: RawFd, server: &TlsServer, prefix: &[u8], deadline: Instant) -> Result<TlsStream> {
        let conn = Connection::from(server.connection()?);
        server.take_refusal();
        Self::handshake(fd, conn, prefix, deadline, "source", Some(server))
    }

    fn handshake(fd: RawFd, mut conn: Connection, prefix: &[u8], deadline: Instant, peer: &'static str, server: Option<&TlsServer>) -> Result<TlsStream> {
        conn.set_buffer_limit(Some(SEND_BUFFER));
        let mut inbox = Inbox { buf: vec![0u8; INBOX_SIZE].into_boxed_slice(), start: 0, end: prefix.len(), eof: false };
        inbox.buf[..prefix.len()].copy_from_slice(prefix);
        let mut first_read = server.is_none();
        let timeout = || Error::new(ErrorCode::Timeout, format!("the TLS handshake with the {peer} did not finish in time (the {peer} stopped answering)"));
        while conn.is_handshaking() {
            flush(&mut conn, fd).map_err(|e| e.context(format!("TLS handshake with the {peer}")))?;
            if inbox.pending().is_empty() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || !inbox.fill(fd, Some(left))? {
                    return Err(timeout());
                }
                if inbox.eof {
                    fail!(TlsHandshake, "the {peer} closed the connection during the TLS handshake");
                }
                if std::mem::take(&mut first_read) && inbox.pending().starts_with(&PLAINTEXT_REFUSAL) {
                    fail!(TlsUnavailable, "the {peer} does not use TLS (it answered in plaintext); configure TLS on both sides or on neither");
                }
            }
            if let Err(e) = inbox.feed(&mut conn) {
                // Tell the peer why (rustls queued an alert), then report it here.
                let _ = flush(&mut conn, fd);
                return Err(match e {
                    FeedError::Io(e) => Error::new(ErrorCode::TlsHandshake, format!("TLS handshake with the {peer}: {e}")),
                    FeedError::Tls(e) => {
                        let mut err = tls_error(&e, peer);
                        if let Some(who) = server.and_then(TlsServer::take_refusal) {
                            err.message = format!("{}: {who}", err.message);
                        }
                        err
                    }
                });
            }
        }
        flush(&mut conn, fd).map_err(|e| e.context(format!("TLS handshake with the {peer}")))?;
        if server.is_none() && conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
            await_verdict(fd, &mut conn, &mut inbox, deadline, peer).map_err(|e| if e.code == ErrorCode::Timeout { timeout() } else { e })?;
        }
        Ok(TlsStream { state: Mutex::new(conn), inbox: Mutex::new(inbox), peer })
    }

    /// What was negotiated, and who the peer's certificate says it is (for logs and summaries).
    pub fn info(&self) -> TlsInfo {
        let state = self.state.lock().unwrap();
        TlsInfo {
            protocol: state.protocol_version().map_or_else(|| "unknown".into(), |v| v.as_str().unwrap_or("unknown").replace("TLSv1_", "TLS 1.")),
            cipher_suite: state.negotiated_cipher_suite().map_or_else(|| "unknown".into(), |s| s.suite().as_str().unwrap_or("unknown").to_string()),
            peer: state.peer_certificates().and_then(|c| c.first()).and_then(|c| super::Identity::from_der(c).ok()),
        }
    }

    /// Reads some plaintext into `out`, waiting at most `timeout` for the socket.
    pub(crate) fn read_some(&self, fd: RawFd, out: &mut [u8], timeout: Option<Duration>) -> Result<Got> {
        if out.is_empty() {
            return Ok(Got::Data(0));
        }
        self.read_with(fd, timeout, |plain| {
            let n = plain.len().min(out.len());
            out[..n].copy_from_slice(&plain[..n]);
            n
        })
    }

    /// Hands decrypted plaintext to `take` where rustls holds it (one record at a time, never
    /// empty), waiting at most `timeout` for the socket; `take` copies what it wants out and
    /// returns how many bytes it took (at least one). This is the receive path's only copy of
    /// the plaintext: straight from rustls's record buffer to wherever `take` puts it.
    pub(crate) fn read_with(&self, fd: RawFd, timeout: Option<Duration>, mut take: impl FnMut(&[u8]) -> usize) -> Result<Got> {
        let mut inbox = self.inbox.lock().unwrap();
        loop {
            {
                let mut state = self.state.lock().unwrap();
                let mut reader = state.reader();
                match io::BufRead::fill_buf(&mut reader) {
                    Ok([]) => return Ok(Got::Eof), // close_notify
                    Ok(plain) => {
                        let n = take(plain);
                        debug_assert!(n > 0 && n <= plain.len());
                        io::BufRead::consume(&mut reader, n);
                        return Ok(Got::Data(n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Got::Eof),
                    Err(e) => return Err(os_error("read TLS plaintext", e)),
                }
                if !inbox.pending().is_empty() || inbox.eof {
                    if let Err(e) = inbox.feed(&mut state) {
                        return Err(match e {
                            FeedError::Io(e) => os_error("read TLS record", e),
                            FeedError::Tls(e) => tls_error(&e, self.peer),
                        });
                    }
                    continue;
                }
            }
            if !inbox.fill(fd, timeout)? {
                return Ok(Got::Idle);
            }
        }
    }

    /// Encrypts and sends every byte of `bufs`.
    pub(crate) fn write_all(&self, fd: RawFd, mut bufs: &mut [IoSlice<'_>]) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        while !bufs.is_empty() {
            let n = state.writer().write_vectored_all(bufs).map_err(|e| os_error("encrypt for TLS", e))?;
            IoSlice::advance_slices(&mut bufs, n);
            flush(&mut state, fd)?;
        }
        Ok(())
    }
}

impl TlsStream {
    /// Encrypts and sends the bytes `fill` puts into `buf`, chunk after chunk until it puts
    /// none, all under one hold of the session lock (so no other write lands in between).
    pub(crate) fn write_from(&self, fd: RawFd, buf: &mut [u8], mut fill: impl FnMut(&mut [u8]) -> usize) -> Result<()> {
        let mut state = self.state.lock().unwrap();
        loop {
            let n = fill(buf);
            if n == 0 {
                return Ok(());
            }
            let mut bufs = &mut [IoSlice::new(&buf[..n])][..];
            while !bufs.is_empty() {
                let w = state.writer().write_vectored_all(bufs).map_err(|e| os_error("encrypt for TLS", e))?;
                IoSlice::advance_slices(&mut bufs, w);
                flush(&mut state, fd)?;
            }
        }
    }
}

trait WriteVectoredAll {
    fn write_vectored_all(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl WriteVectoredAll for rustls::Writer<'_> {
    /// One `write_vectored`, which rustls turns into full-size records across the slices.
    fn write_vectored_all(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = io::Write::write_vectored(self, bufs)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "TLS send buffer took nothing"));
        }
        Ok(n)
    }
}

/// TLS 1.3 client: the handshake ends on our side before the destination has checked our
/// certificate. Our destination answers with a session ticket once it has, or with an alert;
/// waiting for that first record turns a refusal into an error here rather than a reset later.
fn await_verdict(fd: RawFd, conn: &mut Connection, inbox: &mut Inbox, deadline: Instant, peer: &str) -> Result<()> {
    loop {
        if inbox.pending().is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !inbox.fill(fd, Some(left))? {
                fail!(Timeout, "no answer from the {peer} after the TLS handshake");
            }
            if inbox.eof {
                fail!(TlsHandshake, "the {peer} closed the connection right after the TLS handshake");
            }
        }
        match inbox.feed(conn) {
            Ok(()) if inbox.pending().is_empty() => return Ok(()),
            Ok(()) => {}
            Err(FeedError::Io(e)) => fail!(TlsHandshake, "TLS with the {peer}: {e}"),
            Err(FeedError::Tls(e)) => return Err(tls_error(&e, peer)),
        }
    }
}

/// Writes every pending record.
fn flush(conn: &mut Connection, fd: RawFd) -> Result<()> {
    while conn.wants_write() {
        conn.write_tls(&mut FdWriter(fd)).map_err(|e| os_error("write to connection", e))?;
    }
    Ok(())
}

/// `io::Write` on a raw socket, vectored.
struct FdWriter(RawFd);

impl io::Write for FdWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        loop {
            // SAFETY: IoSlice is ABI-compatible with iovec; the slices are alive for this call.
            let n = unsafe { libc::writev(self.0, bufs.as_ptr().cast(), bufs.len().min(1024) as libc::c_int) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn raw_read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is an exclusively borrowed slice of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

