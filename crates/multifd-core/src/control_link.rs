//! The source's control connection, which survives a break mid-session.
//!
//! Frames from the destination are passed on to the orchestrator. Once the channels have
//! started, a control connection that breaks (a reset, a timeout, or an end before the
//! destination said `completed` or `error`) is redialled up to `channel_retries` times, 50 ms
//! before the first and doubling up to 2 s between, each a fresh connection (and TLS
//! handshake) that identifies itself with `reconnect {session, acked}`. The destination's answer,
//! `reconnected {epoch, completed}`, acknowledges the syncs whose `synced` was lost with the old
//! connection (each is delivered once), and a `complete`, `cancel` or `error` this side sent
//! and the destination may have missed is sent again (the destination handles repeats). A
//! source out of retries ends the control connection with the original cause.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::control::{Control, Inbound, InboundSink};
use crate::control_messages::ControlMessage;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::hex::Hex;
use crate::protocol::synced_frame;
use crate::session::{Event, EventSink, Failure, Recovery};
use crate::tls::{TlsClient, TlsInfo};
use crate::transport::Address;

/// The wait before the first redial; it doubles after each, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the destination has said so far.
#[derive(Default)]
struct Heard {
    /// The highest sync epoch acknowledged (by `synced`, or by a `reconnected` answer).
    epoch: u64,
    /// `completed` or `error`: the destination is done, an end of the connection is expected.
    ended: bool,
    /// A reconnect happened: a `synced` the answer already covered is dropped, not repeated.
    reconnected: bool,
}

/// The source's control connection and what it needs to replace itself.
pub struct SourceControl {
    address: Address,
    timeout: Duration,
    tls: Option<TlsClient>,
    failure: Arc<Failure>,
    current: Mutex<Option<Arc<Control>>>,
    /// Which connection is current: an older one's end is not news.
    generation: AtomicU64,
    /// Set when the channels start: the session's UUID and the redials allowed per break.
    resumable: Mutex<Option<([u8; 16], u32)>>,
    heard: Mutex<Heard>,
    /// The last `complete`, `cancel` or `error` this side sent, to send again after a reconnect.
    terminal: Mutex<Option<(String, Vec<u8>)>>,
    reconnecting: AtomicBool,
    /// Why the current connection is being dropped on purpose (see [`SourceControl::drop_current`]).
    dropped: Mutex<Option<Error>>,
    closed: Mutex<bool>,
    woken: Condvar,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl SourceControl {
    pub fn new(address: Address, timeout: Duration, tls: Option<TlsClient>, failure: Arc<Failure>) -> Arc<SourceControl> {
        Arc::new(SourceControl {
            address,
            timeout,
            tls,
            failure,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            resumable: Mutex::new(None),
            heard: Mutex::new(Heard::default()),
            terminal: Mutex::new(None),
            reconnecting: AtomicBool::new(false),
            dropped: Mutex::new(None),
            closed: Mutex::new(false),
            woken: Condvar::new(),
            worker: Mutex::new(None),
        })
    }

    fn events(&self) -> &EventSink {
        self.failure.events()
    }

    /// Opens the first control connection (blocking; the session runs this on a thread of its
    /// own). False when the session closed meanwhile (the connection is closed again).
    pub fn connect(self: &Arc<Self>) -> Result<bool> {
        let control = Control::connect(&self.address, self.timeout, self.tls.as_ref(), self.sink(0))?;
        Ok(self.install(control))
    }

    /// Makes `control` the current connection, unless the session closed.
    fn install(&self, control: Arc<Control>) -> bool {
        let closed = self.closed.lock().unwrap();
        if *closed {
            drop(closed);
            control.close();
            return false;
        }
        let old = self.current.lock().unwrap().replace(control);
        drop(closed);
        drop(old); // closes the broken connection and joins its (finished) reader
        true
    }

    /// From now on a break is repaired: the channels are up for session `uuid`.
    pub fn resumable(&self, uuid: [u8; 16], retries: u32) {
        *self.resumable.lock().unwrap() = Some((uuid, retries));
    }

    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.current.lock().unwrap().as_ref().and_then(|c| c.conn().tls().map(|t| t.info()))
    }

    /// Sends a frame. While the connection is broken and will be redialled, a frame that cannot
    /// be written is not an error: a `complete`, `cancel` or `error` is sent again once
    /// reconnected, a `ping` or `round` is dropped.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let kind = ControlMessage::decode(frame).map(|m| m.kind()).unwrap_or("");
        if matches!(kind, "complete" | "cancel" | "error") {
            *self.terminal.lock().unwrap() = Some((kind.to_owned(), frame.to_vec()));
        }
        let current = self.current.lock().unwrap().clone();
        let Some(c) = current else { fail!(State, "the control connection is closed") };
        match c.send(frame) {
            Err(_) if self.retries() > 0 => Ok(()),
            sent => sent,
        }
    }

    /// Drops the current connection because of `cause` (the orchestrator heard nothing on it for
    /// `peerTimeoutMs`: a hung path), so that it is redialled like a broken one. False when no
    /// redial may follow (before the channels start, with no retries, once failed or closed);
    /// true at once when a redial is already under way.
    pub fn drop_current(&self, cause: Error) -> bool {
        if self.retries() == 0 {
            return false;
        }
        if self.reconnecting.load(Ordering::Acquire) {
            return true;
        }
        let Some(current) = self.current.lock().unwrap().clone() else { return false };
        *self.dropped.lock().unwrap() = Some(cause);
        current.conn().shutdown();
        true
    }

    /// Redials allowed now: 0 before the channels start, once failed or closed.
    fn retries(&self) -> u32 {
        if self.failure.is_failed() || *self.closed.lock().unwrap() {
            return 0;
        }
        self.resumable.lock().unwrap().map_or(0, |(_, r)| r)
    }

    /// The reader's sink for connection `generation`.
    fn sink(self: &Arc<Self>, generation: u64) -> InboundSink {
        let me = Arc::downgrade(self);
        Arc::new(move |i| {
            let Some(me) = me.upgrade() else { return };
            match i {
                Inbound::Frame(f) => me.frame(f),
                Inbound::Closed(end) => me.ended(generation, end),
            }
        })
    }

    fn frame(&self, frame: Vec<u8>) {
        match ControlMessage::decode(&frame) {
            Ok(ControlMessage::Synced { epoch, .. }) => {
                let mut h = self.heard.lock().unwrap();
                if h.reconnected && epoch <= h.epoch {
                    return; // already acknowledged by a reconnect's answer
                }
                h.epoch = h.epoch.max(epoch);
            }
            Ok(ControlMessage::Completed | ControlMessage::Error { .. }) => self.heard.lock().unwrap().ended = true,
            _ => {}
        }
        (self.events())(Event::Control(frame));
    }

    /// Connection `generation` ended: repaired when it may be, otherwise reported.
    fn ended(self: &Arc<Self>, generation: u64, end: Option<Error>) {
        if generation != self.generation.load(Ordering::Acquire) || self.reconnecting.load(Ordering::Acquire) {
            return; // a replaced connection, or one a reconnect in progress gave up on
        }
        let end = self.dropped.lock().unwrap().take().or(end);
        // A clean end after the destination finished, or after this side cancelled or failed
        // (the destination closes on those), is the expected end.
        let expected = self.heard.lock().unwrap().ended || (end.is_none() && self.terminal.lock().unwrap().as_ref().is_some_and(|(k, _)| k != "complete"));
        if expected || self.retries() == 0 {
            return (self.events())(Event::ControlClosed(end));
        }
        let cause = end.unwrap_or_else(|| Error::new(ErrorCode::ConnectionClosed, "the destination closed the control connection before completing"));
        self.reconnecting.store(true, Ordering::Release);
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("multifd/reconnect".into()).spawn(move || me.reconnect(cause));
        match spawned {
            Ok(t) => {
                if let Some(old) = self.worker.lock().unwrap().replace(t) {
                    let _ = old.join(); // the previous reconnect, finished
                }
            }
            Err(e) => {
                self.reconnecting.store(false, Ordering::Release);
                self.failure.fail(Error::new(ErrorCode::Io, format!("spawn a reconnect thread: {e}")));
            }
        }
    }

    /// Waits `d`, or until the session closes; false when it closed.
    fn pause(&self, d: Duration) -> bool {
        let closed = self.closed.lock().unwrap();
        let (closed, _) = self.woken.wait_timeout_while(closed, d, |c| !*c).unwrap();
        !*closed
    }

    fn reconnect(self: Arc<Self>, cause: Error) {
        let started = Instant::now();
        let Some((uuid, _)) = *self.resumable.lock().unwrap() else { return };
        let mut wait = FIRST_BACKOFF;
        let mut attempts = 0;
        let mut last: Option<Error> = None;
        while attempts < self.retries() {
            attempts += 1;
            if !self.pause(wait) {
                return;
            }
            wait = (wait * 2).min(MAX_BACKOFF);
            let acked = self.heard.lock().unwrap().epoch;
            let hello = ControlMessage::Reconnect { session: Hex(&uuid).to_string(), acked }.encode();
            let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
            let answer = Control::reconnect(&self.address, self.timeout, self.tls.as_ref(), &hello, self.sink(generation)).and_then(|(control, answer)| match ControlMessage::decode(&answer) {
                Ok(ControlMessage::Reconnected { epoch, completed }) => Ok((control, epoch, completed)),
                Ok(other) => {
                    control.close();
                    fail!(Protocol, "the destination answered a control reconnect with {}", other.kind())
                }
                Err(e) => {
                    control.close();
                    Err(e)
                }
            });
            match answer {
                Ok((control, epoch, completed)) => return self.resume(control, epoch, completed, cause, started),
                Err(e) => last = Some(e),
            }
        }
        self.reconnecting.store(false, Ordering::Release);
        if self.failure.is_failed() || *self.closed.lock().unwrap() {
            return;
        }
        let tried = last.map_or_else(String::new, |e| format!("; {attempts} reconnect(s) failed, the last with {}: {}", e.code.as_str(), e.message));
        (self.events())(Event::ControlClosed(Some(Error::new(cause.code, format!("{}{tried}", cause.message)))));
    }

    /// The replacement is up: acknowledge what the old connection lost, send again what the
    /// destination may have missed, and report the repair.
    fn resume(&self, control: Arc<Control>, epoch: u64, completed: bool, cause: Error, started: Instant) {
        if !self.install(control.clone()) {
            self.reconnecting.store(false, Ordering::Release);
            return;
        }
        let events = self.events().clone();
        {
            let mut h = self.heard.lock().unwrap();
            for e in h.epoch + 1..=epoch {
                events(Event::Control(synced_frame(e, 0)));
            }
            h.epoch = h.epoch.max(epoch);
            h.reconnected = true;
            if completed && !h.ended {
                h.ended = true;
                events(Event::Control(ControlMessage::Completed.encode()));
            }
        }
        let terminal = self.terminal.lock().unwrap().clone();
        if let Some((kind, frame)) = terminal.filter(|(k, _)| !(completed && k == "complete"))
            && let Err(e) = control.send(&frame)
        {
            self.failure.fail(e.context(format!("sending {kind} again after a control reconnect")));
        }
        self.reconnecting.store(false, Ordering::Release);
        events(Event::Recovered(Recovery { connection: None, cause, pages_resent: 0, took: started.elapsed() }));
    }

    /// Closes the connection; a reconnect in progress stops at its next step. Idempotent.
    pub fn close(&self) {
        *self.closed.lock().unwrap() = true;
        self.woken.notify_all();
        let current = self.current.lock().unwrap().take();
        if let Some(c) = current {
            c.close();
        }
        let mut worker = self.worker.lock().unwrap();
        if worker.as_ref().is_some_and(|w| w.is_finished()) {
            let _ = worker.take().map(JoinHandle::join);
        }
    }
}
