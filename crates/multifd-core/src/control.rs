//! The control connection's byte layer: a 4-byte magic, then length-prefixed frames. What the
//! frames say is [`crate::control_messages`]; when each is sent is decided by the orchestrator
//! (TypeScript); docs/PROTOCOL.md describes both layers.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result, fail};
use crate::tls::TlsClient;
use crate::transport::{Address, Conn};

pub use crate::wire::CONTROL_MAGIC;
/// Largest control frame accepted; control messages are small.
pub const MAX_FRAME: u32 = 1 << 20;
/// How long a control write may block before the peer is considered gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the reader thread hands its owner: a frame, then once the end of the connection
/// (`Closed(None)` for a clean end).
pub enum Inbound {
    Frame(Vec<u8>),
    Closed(Option<Error>),
}

/// Where the reader thread delivers. Frames come in order, `Closed` last.
pub type InboundSink = Arc<dyn Fn(Inbound) + Send + Sync>;

/// A control connection with its reader thread.
pub struct Control {
    conn: Arc<Conn>,
    write: Mutex<()>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Control {
    /// Source side: connects (with `tls`, completes the handshake) and announces itself with
    /// the control magic.
    pub fn connect(addr: &Address, timeout: Duration, tls: Option<&TlsClient>, events: InboundSink) -> Result<Arc<Control>> {
        let conn = Conn::connect_secure(addr, timeout, tls)?;
        conn.write_all(&[&CONTROL_MAGIC.to_be_bytes()])?;
        Ok(Self::start(conn, None, events))
    }

    /// Source side, replacing a broken control connection: connects (with `tls`, a fresh
    /// handshake with the same checks), announces itself with the magic and `first` (the
    /// `reconnect` frame), and waits up to `timeout` for the destination's answer, which is
    /// returned rather than delivered; the reader then delivers what follows.
    pub fn reconnect(addr: &Address, timeout: Duration, tls: Option<&TlsClient>, first: &[u8], events: InboundSink) -> Result<(Arc<Control>, Vec<u8>)> {
        let conn = Conn::connect_secure(addr, timeout, tls)?;
        conn.set_write_timeout(Some(timeout))?;
        conn.write_all(&[&CONTROL_MAGIC.to_be_bytes(), &(first.len() as u32).to_be_bytes(), first])?;
        conn.set_read_timeout(Some(timeout))?;
        let Some(answer) = read_frame(&conn)? else {
            fail!(ConnectionClosed, "the destination closed the new control connection without answering its reconnect");
        };
        conn.set_read_timeout(None)?;
        Ok((Self::start(conn, None, events), answer))
    }

    /// Destination side: the acceptor already consumed the magic and the first frame (by which
    /// the connection identified itself), which the reader delivers before any other.
    /// `None` for a replacement, whose first frame (`reconnect`) the destination answered itself.
    pub fn accepted(conn: Conn, first: Option<Vec<u8>>, events: InboundSink) -> Arc<Control> {
        Self::start(conn, first, events)
    }

    fn start(conn: Conn, first: Option<Vec<u8>>, events: InboundSink) -> Arc<Control> {
        let _ = conn.set_write_timeout(Some(WRITE_TIMEOUT));
        let conn = Arc::new(conn);
        let reader_conn = conn.clone();
        let reader = std::thread::Builder::new()
            .name("multifd/control".into())
            .spawn(move || {
                if let Some(frame) = first {
                    events(Inbound::Frame(frame));
                }
                let end = loop {
                    match read_frame(&reader_conn) {
                        Ok(Some(frame)) => events(Inbound::Frame(frame)),
                        Ok(None) => break None,
                        Err(e) => break Some(e),
                    }
                };
                events(Inbound::Closed(end));
            })
            .expect("spawn control reader");
        Arc::new(Control { conn, write: Mutex::new(()), reader: Mutex::new(Some(reader)) })
    }

    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    pub fn send(&self, frame: &[u8]) -> Result<()> {
        if frame.len() > MAX_FRAME as usize {
            fail!(InvalidArgument, "control frame of {} bytes is above the {MAX_FRAME}-byte limit", frame.len());
        }
        let _guard = self.write.lock().unwrap();
        self.conn.write_all(&[&(frame.len() as u32).to_be_bytes(), frame])
    }

    /// Shuts the connection down and joins the reader.
    pub fn close(&self) {
        self.conn.shutdown();
        if let Some(r) = self.reader.lock().unwrap().take() {
            let _ = r.join();
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads one frame; `None` when the peer closed before its first byte.
pub(crate) fn read_frame(conn: &Conn) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    if !conn.read_exact(&mut len)? {
        return Ok(None);
    }
    if conn.tls().is_none() && matches!(len, [0x15 | 0x16, 0x03, ..]) {
        fail!(TlsRequired, "the destination answered with a TLS record: it requires TLS, and this source has no TLS configured");
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_FRAME {
        fail!(Protocol, "control frame of {len} bytes is above the {MAX_FRAME}-byte limit");
    }
    let mut frame = vec![0u8; len as usize];
    if len > 0 && !conn.read_exact(&mut frame)? {
        fail!(ConnectionClosed, "control connection closed inside a frame");
    }
    Ok(Some(frame))
}
