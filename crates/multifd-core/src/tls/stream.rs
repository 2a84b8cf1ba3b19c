//! One TLS session over a blocking socket, shared by the threads that use the connection.
//!
//! rustls runs the handshake (`handshake.rs`); the records after it are ours (`record.rs`),
//! sealed and opened in place in two private buffers, one per direction, each behind its own
//! mutex: a reader waiting for an idle peer never blocks a writer on another thread (the
//! control connection writes from JavaScript while its reader waits).
//!
//! Copies of the plaintext: a received record is read from the socket into the inbox (the
//! kernel's copy), decrypted where it lies, and copied once from there to wherever the reader
//! puts it (block pages, see `crate::memory`). A sent record's plaintext is copied once into
//! the send buffer, sealed where it lies, and sixteen records leave in one `send`. Block
//! memory is never handed to the cipher: it may change while it is read (it is a live VM's
//! RAM, and no Rust reference may cover it), so the one copy each way is the floor.
//!
//! Key updates (TLS 1.3): a peer's KeyUpdate renews our receiving key where it ends its record,
//! and when it asks for ours, our next write starts with one; we renew our sending key
//! ourselves before the cipher suite's confidentiality limit (2^24 records for AES-GCM).

use std::io;
use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls::AlertDescription;

use super::handshake::{self, Established, Kernel};
use super::record::{ALERT, APPLICATION_DATA, Cipher, HANDSHAKE, MAX_OPENED, MAX_PLAINTEXT, MAX_SEALED, Version};
use super::{TlsClient, TlsServer, tls_error};
use crate::error::{Error, ErrorCode, Result, fail};
use crate::error::os_error;
use crate::io::wait_readable;

/// Bytes read from the socket per system call at most (about sixteen full records).
const INBOX_SIZE: usize = 256 << 10;
/// Records sealed before one `send` sends them (16 x 16 KiB of plaintext per system call).
const RECORDS_PER_WRITE: usize = 16;
/// How many records before the cipher suite's confidentiality limit our sending key is renewed.
const REKEY_MARGIN: u64 = 1 << 16;

/// TLS 1.3 handshake message types met after the handshake.
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// Room our KeyUpdate record takes (5-byte message, content type, tag, header; 64 is ample).
const KEY_UPDATE_SEALED: usize = 64;

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

/// Bytes read from the socket and not consumed yet.
pub(super) struct Inbox {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    pub(super) eof: bool,
}

impl Inbox {
    fn new(prefix: &[u8]) -> Inbox {
        let mut buf = vec![0u8; INBOX_SIZE.max(2 * MAX_OPENED)].into_boxed_slice();
        buf[..prefix.len()].copy_from_slice(prefix);
        Inbox { buf, start: 0, end: prefix.len(), eof: false }
    }

    pub(super) fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(super) fn pending_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    pub(super) fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
    }

    /// Moves what is pending to the front and reads more after it; false when the timeout
    /// passed first.
    pub(super) fn fill(&mut self, fd: RawFd, timeout: Option<Duration>) -> Result<bool> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.end == self.buf.len() {
            fail!(TlsHandshake, "a TLS handshake message larger than {} bytes", self.buf.len());
        }
        // Streaming, the socket usually holds more already: try before paying for a poll.
        let n = match raw_read(fd, &mut self.buf[self.end..], libc::MSG_DONTWAIT) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if !wait_readable(fd, timeout)? {
                    return Ok(false);
                }
                raw_read(fd, &mut self.buf[self.end..], 0)
            }
            read => read,
        };
        let n = n.map_err(|e| os_error("read from connection", e))?;
        self.end += n;
        self.eof = n == 0;
        Ok(true)
    }
}

/// The receiving direction: the inbox, its key, and the plaintext not handed out yet.
struct Rx {
    inbox: Inbox,
    cipher: Cipher,
    /// Plaintext of the last application-data record, in the inbox, not handed out yet.
    plain: Range<usize>,
    /// Plaintext rustls decrypted at the end of the handshake, handed out first.
    early: Vec<u8>,
    early_at: usize,
    /// The peer sent close_notify.
    closed: bool,
}

impl Rx {
    fn plaintext(&self) -> Option<&[u8]> {
        if self.early_at < self.early.len() {
            return Some(&self.early[self.early_at..]);
        }
        (!self.plain.is_empty()).then(|| &self.inbox.buf[self.plain.clone()])
    }

    fn consume_plaintext(&mut self, n: usize) {
        if self.early_at < self.early.len() {
            self.early_at += n;
            if self.early_at == self.early.len() {
                self.early = Vec::new();
                self.early_at = 0;
            }
        } else {
            self.plain.start += n;
        }
    }
}

/// The sending direction: the buffer records are sealed in, and their key.
struct Tx {
    buf: Box<[u8]>,
    cipher: Cipher,
    /// Records one key may seal before it is renewed.
    rekey_after: u64,
}

/// What reading one record brought.
enum Step {
    Record,
    Eof,
    Idle,
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

/// A TLS session after its handshake: one record layer per direction.
pub struct TlsStream {
    rx: Mutex<Rx>,
    tx: Mutex<Tx>,
    /// Renews the keys (TLS 1.3 key updates); either direction takes it briefly.
    kernel: Mutex<Kernel>,
    /// Our KeyUpdate goes before our next record: the peer asked for one (RFC 8446 4.6.3, set
    /// by the reader) or our key reached its record limit.
    key_update_due: AtomicBool,
    version: Version,
    info: TlsInfo,
    /// "source" or "destination", for messages.
    peer: &'static str,
}

impl TlsStream {
    /// Runs the client handshake on `fd` (the source side) before `deadline`.
    pub(crate) fn client(fd: RawFd, client: &TlsClient, deadline: Instant) -> Result<TlsStream> {
        let peer = "destination";
        let mut inbox = Inbox::new(&[]);
        let done = handshake::run(fd, client.connection()?, &mut inbox, deadline, peer, None)?;
        let stream = Self::established(done, inbox, peer)?;
        if stream.version == Version::Tls13 {
            stream.await_verdict(fd, deadline)?;
        }
        Ok(stream)
    }

    /// Runs the server handshake on `fd` (the destination side); `prefix` holds the bytes the
    /// acceptor already read to tell TLS from plaintext.
    pub(crate) fn server(fd: RawFd, server: &TlsServer, prefix: &[u8], deadline: Instant) -> Result<TlsStream> {
        let conn = server.connection()?;
        server.take_refusal();
        let mut inbox = Inbox::new(prefix);
        let done = handshake::run(fd, conn, &mut inbox, deadline, "source", Some(server))?;
        Self::established(done, inbox, "source")
    }

    fn established(done: Established, inbox: Inbox, peer: &'static str) -> Result<TlsStream> {
        let Established { kernel, secrets, version, info, early } = done;
        let key = |e: rustls::Error| Error::new(ErrorCode::TlsHandshake, format!("TLS with the {peer}: {e}"));
        let rekey_after = kernel.confidentiality_limit().saturating_sub(REKEY_MARGIN);
        let tx = Tx { buf: vec![0u8; RECORDS_PER_WRITE * MAX_SEALED + KEY_UPDATE_SEALED].into_boxed_slice(), cipher: Cipher::new(version, secrets.tx).map_err(key)?, rekey_after };
        let rx = Rx { inbox, cipher: Cipher::new(version, secrets.rx).map_err(key)?, plain: 0..0, early, early_at: 0, closed: false };
        Ok(TlsStream { rx: Mutex::new(rx), tx: Mutex::new(tx), kernel: Mutex::new(kernel), key_update_due: AtomicBool::new(false), version, info, peer })
    }

    /// TLS 1.3 client: the handshake ends on our side before the destination has checked our
    /// certificate. Our destination answers with a session ticket once it has, or with an
    /// alert; waiting for that first record turns a refusal into an error here rather than a
    /// reset later.
    fn await_verdict(&self, fd: RawFd, deadline: Instant) -> Result<()> {
        let peer = self.peer;
        let mut rx = self.rx.lock().unwrap();
        if rx.plaintext().is_some() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match self.step(&mut rx, fd, Some(left))? {
            Step::Record => Ok(()),
            Step::Idle => fail!(Timeout, "the TLS handshake with the {peer} did not finish in time (the {peer} stopped answering)"),
            Step::Eof => fail!(TlsHandshake, "the {peer} closed the connection right after the TLS handshake"),
        }
    }

    /// What was negotiated, and who the peer's certificate says it is (for logs and summaries).
    pub fn info(&self) -> TlsInfo {
        self.info.clone()
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

    /// Hands decrypted plaintext to `take` where it was decrypted (one record at a time, never
    /// empty), waiting at most `timeout` for the socket; `take` copies what it wants out and
    /// returns how many bytes it took (at least one). This is the receive path's only copy of
    /// the plaintext: from the inbox, where the record was opened in place, to wherever `take`
    /// puts it.
    pub(crate) fn read_with(&self, fd: RawFd, timeout: Option<Duration>, mut take: impl FnMut(&[u8]) -> usize) -> Result<Got> {
        let mut rx = self.rx.lock().unwrap();
        loop {
            if let Some(plain) = rx.plaintext() {
                let n = take(plain);
                debug_assert!(n > 0 && n <= plain.len());
                rx.consume_plaintext(n);
                return Ok(Got::Data(n));
            }
            match self.step(&mut rx, fd, timeout)? {
                Step::Record => {}
                Step::Eof => return Ok(Got::Eof),
                Step::Idle => return Ok(Got::Idle),
            }
        }
    }

    /// Opens the next record, reading from the socket when the inbox holds none whole.
    fn step(&self, rx: &mut Rx, fd: RawFd, timeout: Option<Duration>) -> Result<Step> {
        let fail = |e: rustls::Error| tls_error(&e, self.peer);
        loop {
            if rx.closed {
                return Ok(Step::Eof);
            }
            let base = rx.inbox.start;
            let Some(opened) = rx.cipher.open(rx.inbox.pending_mut()).map_err(fail)? else {
                // The peer closed (with or without close_notify, even mid-record).
                if rx.inbox.eof {
                    return Ok(Step::Eof);
                }
                if !rx.inbox.fill(fd, timeout)? {
                    return Ok(Step::Idle);
                }
                continue;
            };
            rx.inbox.consume(opened.len);
            let plain = base + opened.plain.start..base + opened.plain.end;
            match opened.typ {
                APPLICATION_DATA => rx.plain = plain,
                HANDSHAKE => self.post_handshake(rx, plain)?,
                ALERT => match rx.inbox.buf[plain] {
                    [_, 0] => rx.closed = true, // close_notify
                    [_, desc] => return Err(fail(rustls::Error::AlertReceived(AlertDescription::from(desc)))),
                    _ => return Err(fail(rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooShort))),
                },
                _ => return Err(fail(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType))),
            }
            return Ok(Step::Record);
        }
    }

    /// Handshake messages after the handshake: session tickets and key updates.
    fn post_handshake(&self, rx: &mut Rx, plain: Range<usize>) -> Result<()> {
        let fail = |e: rustls::Error| tls_error(&e, self.peer);
        let mut messages: &[u8] = &rx.inbox.buf[plain];
        let mut new_rx_key = false;
        while !messages.is_empty() {
            let &[typ, a, b, c, ref rest @ ..] = messages else {
                return Err(fail(rustls::Error::InvalidMessage(rustls::InvalidMessage::MessageTooShort)));
            };
            // Post-handshake messages are a few bytes; one split across records is refused.
            let Some((body, rest)) = rest.split_at_checked(u32::from_be_bytes([0, a, b, c]) as usize) else {
                return Err(fail(rustls::Error::General("a post-handshake message split across records".into())));
            };
            messages = rest;
            match (typ, body) {
                (NEW_SESSION_TICKET, _) => self.kernel.lock().unwrap().new_session_ticket(body).map_err(fail)?,
                // A key update must end its record: what follows is under the new key.
                (KEY_UPDATE, [request @ (0 | 1)]) if messages.is_empty() => {
                    new_rx_key = true;
                    if *request == 1 {
                        self.key_update_due.store(true, Ordering::Release);
                    }
                }
                (KEY_UPDATE, _) => return Err(fail(rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::KeyEpochWithPendingFragment))),
                _ => return Err(fail(rustls::Error::InappropriateHandshakeMessage { expect_types: vec![rustls::HandshakeType::KeyUpdate], got_type: rustls::HandshakeType::from(typ) })),
            }
        }
        if new_rx_key {
            let next = self.kernel.lock().unwrap().update_rx_secret().map_err(fail)?;
            rx.cipher = Cipher::new(self.version, next).map_err(fail)?;
        }
        Ok(())
    }

    /// Encrypts and sends every byte of `bufs`.
    pub(crate) fn write_all(&self, fd: RawFd, bufs: &[&[u8]]) -> Result<()> {
        let mut pending = bufs.iter().copied();
        let mut part: &[u8] = &[];
        self.write_from(fd, |out| {
            let mut filled = 0;
            while filled < out.len() {
                if part.is_empty() {
                    match pending.next() {
                        Some(next) => part = next,
                        None => break,
                    }
                    continue;
                }
                let n = part.len().min(out.len() - filled);
                out[filled..filled + n].copy_from_slice(&part[..n]);
                part = &part[n..];
                filled += n;
            }
            filled
        })
    }

    /// Encrypts and sends the bytes `fill` puts into the record plaintext it is handed (up to
    /// 16 KiB at a time), record after record until it puts none, all under one hold of the
    /// sending lock (so no other write lands in between). Each record is sealed where `fill`
    /// put its plaintext; several leave in one `write`.
    pub(crate) fn write_from(&self, fd: RawFd, mut fill: impl FnMut(&mut [u8]) -> usize) -> Result<()> {
        let fail = |e: rustls::Error| tls_error(&e, self.peer);
        let mut guard = self.tx.lock().unwrap();
        let tx = &mut *guard;
        let mut used = 0;
        loop {
            // Room for a key update, then one more record.
            if used + KEY_UPDATE_SEALED + MAX_SEALED > tx.buf.len() {
                crate::io::write_all_flags(fd, &tx.buf[..used], 0)?;
                used = 0;
            }
            if self.key_update_due.load(Ordering::Relaxed) && self.key_update_due.swap(false, Ordering::AcqRel) {
                used = self.key_update(tx, used)?;
            }
            let at = used + tx.cipher.plaintext_offset();
            let n = fill(&mut tx.buf[at..at + MAX_PLAINTEXT]);
            if n == 0 {
                break;
            }
            used += tx.cipher.seal(APPLICATION_DATA, &mut tx.buf[used..], n).map_err(fail)?;
            if tx.cipher.seq() >= tx.rekey_after {
                self.key_update_due.store(true, Ordering::Release);
            }
        }
        if used > 0 {
            crate::io::write_all_flags(fd, &tx.buf[..used], 0)?;
        }
        Ok(())
    }

    /// Records sealed under our current sending key.
    #[cfg(test)]
    pub(super) fn sent_under_current_key(&self) -> u64 {
        self.tx.lock().unwrap().cipher.seq()
    }

    /// Renews our sending key every `records` records (tests reach the limit this way).
    #[cfg(test)]
    pub(super) fn set_rekey_after(&self, records: u64) {
        let mut tx = self.tx.lock().unwrap();
        tx.rekey_after = records;
    }

    /// Seals our KeyUpdate (update_not_requested) at `used` under the current key, then
    /// renews the key; returns where the next record goes.
    fn key_update(&self, tx: &mut Tx, used: usize) -> Result<usize> {
        if self.version != Version::Tls13 {
            fail!(TlsHandshake, "the TLS 1.2 session with the {} reached its key's record limit (TLS 1.3 renews keys)", self.peer);
        }
        let fail = |e: rustls::Error| tls_error(&e, self.peer);
        let at = used + tx.cipher.plaintext_offset();
        tx.buf[at..at + 5].copy_from_slice(&[KEY_UPDATE, 0, 0, 1, 0]);
        let n = tx.cipher.seal(HANDSHAKE, &mut tx.buf[used..], 5).map_err(fail)?;
        let next = self.kernel.lock().unwrap().update_tx_secret().map_err(fail)?;
        tx.cipher = Cipher::new(Version::Tls13, next).map_err(fail)?;
        Ok(used + n)
    }
}

/// `recv(2)` into `buf` with `flags`.
fn raw_read(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    loop {
        // SAFETY: buf is an exclusively borrowed slice of the given length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

