//! A source session's lifecycle: the control connection, the channels, the sequencing rules
//! of the control protocol ([`crate::protocol`]) and teardown. The orchestrator (TypeScript,
//! through the binding) decides *when* (hello, sync, complete, cancel); this type owns the
//! connections and threads, so `cargo test` drives the whole lifecycle without JavaScript.
//!
//! Connecting never blocks the caller: the control connection and the channels are opened on
//! threads of their own and announced with `Event::ControlConnected` / `Event::ChannelsReady`
//! (or `Event::Failed`). Closing never waits for the network either: a connect still in flight
//! ends on its own thread (within its connect timeout) and closes what it opened.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::block::RamBlock;
use crate::control_link::SourceControl;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::protocol::SourceLedger;
use crate::session::{Counters, Event, EventSink, Failure};
use crate::source::{Selection, Source, SourceConfig};
use crate::tls::{TlsClient, TlsInfo};
use crate::transport::Address;

/// A slot filled by a background connect, unless the session closed first.
struct Slot<T> {
    value: Mutex<Option<T>>,
}

/// One source session: the control connection, then the channels, then pages and syncs.
pub struct SourceSession {
    address: Address,
    tls: Option<TlsClient>,
    failure: Arc<Failure>,
    closed: Arc<AtomicBool>,
    /// The control connection, repaired when it breaks once the channels are up.
    control: Arc<SourceControl>,
    source: Arc<Slot<Source>>,
    ledger: Mutex<SourceLedger>,
    /// Connect threads (control, then channels); joined by `close` once finished, never waited for.
    connecting: Mutex<Vec<JoinHandle<()>>>,
}

impl SourceSession {
    /// Starts opening the control connection (with `tls`, after a mutual TLS handshake, which
    /// the channels repeat): `Event::ControlConnected` follows, or `Event::Failed`.
    pub fn connect(address: Address, connect_timeout: Duration, tls: Option<TlsClient>, events: EventSink) -> Result<SourceSession> {
        let failure = Failure::new(events);
        let session = SourceSession {
            control: SourceControl::new(address.clone(), connect_timeout, tls.clone(), failure.clone()),
            address,
            tls,
            failure,
            closed: Arc::new(AtomicBool::new(false)),
            source: Arc::new(Slot { value: Mutex::new(None) }),
            ledger: Mutex::new(SourceLedger::default()),
            connecting: Mutex::new(Vec::new()),
        };
        let (control, failure) = (session.control.clone(), session.failure.clone());
        let worker = std::thread::Builder::new()
            .name("multifd/connect".into())
            .spawn(move || match control.connect() {
                Ok(true) => (failure.events())(Event::ControlConnected),
                Ok(false) => {} // closed meanwhile
                Err(e) => {
                    failure.fail(e);
                }
            })
            .map_err(|e| Error::new(ErrorCode::Io, format!("spawn a connect thread: {e}")))?;
        session.connecting.lock().unwrap().push(worker);
        Ok(session)
    }

    /// Runs `work` on its own thread: its value goes into `slot` and `ready` is emitted, or its
    /// error fails the session. A value that arrives after `close` is dropped (closed) at once.
    fn in_background<T: Send + 'static>(&self, slot: &Arc<Slot<T>>, ready: Event, work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<JoinHandle<()>> {
        let (failure, slot, closed) = (self.failure.clone(), slot.clone(), self.closed.clone());
        std::thread::Builder::new()
            .name("multifd/connect".into())
            .spawn(move || match work() {
                Ok(v) => {
                    let mut value = slot.value.lock().unwrap();
                    if closed.load(Ordering::Acquire) {
                        drop(value);
                        drop(v);
                        return;
                    }
                    *value = Some(v);
                    drop(value);
                    (failure.events())(ready);
                }
                Err(e) => {
                    failure.fail(e);
                }
            })
            .map_err(|e| Error::new(ErrorCode::Io, format!("spawn a connect thread: {e}")))
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    pub fn tls(&self) -> Option<&TlsClient> {
        self.tls.as_ref()
    }

    pub fn failure(&self) -> &Arc<Failure> {
        &self.failure
    }

    /// The control connection's TLS session, once connected with TLS.
    pub fn tls_info(&self) -> Option<TlsInfo> {
        self.control.tls_info()
    }

    /// Sends a control frame the orchestrator encoded (hello, round, cancel, error, ping).
    pub fn send_control(&self, frame: &[u8]) -> Result<()> {
        self.control.send(frame)
    }

    /// Drops the control connection to redial it, because of `cause` (nothing heard on it for
    /// `peerTimeoutMs`). False when it will not be redialled (the caller fails instead).
    pub fn drop_control(&self, cause: Error) -> bool {
        self.control.drop_current(cause)
    }

    /// Sends `complete`, which names `epoch`: the last sync sent, acknowledged.
    pub fn send_complete(&self, epoch: u64, frame: &[u8]) -> Result<()> {
        let internal = self.internal_syncs();
        {
            let mut ledger = self.ledger.lock().unwrap();
            ledger.count_internal(internal);
            ledger.complete_sent(epoch)?;
        }
        if let Some(s) = self.source.value.lock().unwrap().as_ref() {
            s.completing();
        }
        self.send_control(frame)
    }

    /// The destination acknowledged sync `epoch`. Anything but a sync this source sent and not
    /// acknowledged before fails the session with `ERR_MULTIFD_OUT_OF_SEQUENCE`.
    ///
    /// Returns the epoch up to which every page queued is delivered: `epoch`, or an earlier one
    /// while the pages of a given-up channel are still on their way (see [`Source::acked`]).
    pub fn synced(&self, epoch: u64) -> Result<u64> {
        let internal = self.internal_syncs();
        let checked = {
            let mut ledger = self.ledger.lock().unwrap();
            ledger.count_internal(internal);
            ledger.synced(epoch)
        };
        match checked {
            // Delivered: no channel has to send any of it again.
            Ok(()) => Ok(self.source.value.lock().unwrap().as_ref().map_or(epoch, |s| s.acked(epoch))),
            Err(e) => {
                self.failure.fail(e.clone());
                Err(e)
            }
        }
    }

    /// Syncs the channels queued themselves (never under the ledger's lock: `sync` takes the
    /// ledger's, then the source's).
    fn internal_syncs(&self) -> u64 {
        self.source.value.lock().unwrap().as_ref().map_or(0, Source::internal_syncs)
    }

    /// The destination reported completion: accepted only after this source sent `complete`
    /// (otherwise the session fails with `ERR_MULTIFD_OUT_OF_SEQUENCE`).
    pub fn completed(&self) -> Result<()> {
        let checked = self.ledger.lock().unwrap().completed();
        checked.inspect_err(|e| {
            self.failure.fail(e.clone());
        })
    }

    /// Starts connecting the multifd channels in the background, all at once (each
    /// authenticated with TLS when configured, each sending its init packet):
    /// `Event::ChannelsReady` follows, or `Event::Failed`. `config` names this session's
    /// address and TLS ([`address`](Self::address), [`tls`](Self::tls)).
    pub fn start_channels(&self, config: SourceConfig) -> Result<()> {
        let mut connecting = self.connecting.lock().unwrap();
        if connecting.len() > 1 || self.source.value.lock().unwrap().is_some() {
            fail!(State, "channels are already started");
        }
        // From here on a broken control connection is redialled rather than fatal.
        self.control.resumable(config.uuid, config.channel_retries);
        let failure = self.failure.clone();
        connecting.push(self.in_background(&self.source, Event::ChannelsReady, move || Source::start(config, failure))?);
        Ok(())
    }

    fn with_source<T>(&self, f: impl FnOnce(&Source) -> Result<T>) -> Result<T> {
        match self.source.value.lock().unwrap().as_ref() {
            Some(s) => f(s),
            None => fail!(State, "channels are not started"),
        }
    }

    /// Queues pages of `block`; `Event::Done { id }` follows.
    pub fn send(&self, id: u32, block: Arc<RamBlock>, selection: Selection) -> Result<()> {
        self.with_source(|s| s.send(id, block, selection))
    }

    /// Queues a SYNC on every channel; `Event::Done { id }` follows once every channel wrote
    /// it. Returns the epoch whose acknowledgement (`synced`) the destination now owes.
    pub fn sync(&self, id: u32) -> Result<u64> {
        let mut ledger = self.ledger.lock().unwrap();
        self.with_source(|s| s.sync(id))?;
        Ok(ledger.sync_requested())
    }

    pub fn stats(&self) -> Vec<Counters> {
        self.source.value.lock().unwrap().as_ref().map(|s| s.stats()).unwrap_or_default()
    }

    /// With integrity, the page digests taken as pages were sent ([`Source::page_digests`]).
    pub fn page_digests(&self) -> Option<Arc<crate::integrity::SessionDigests>> {
        self.source.value.lock().unwrap().as_ref().and_then(|s| s.page_digests())
    }

    /// Bytes the channels wrote that the destination has not taken yet (see
    /// [`Source::unsent_bytes`]); 0 before the channels are up and after close.
    pub fn unsent_bytes(&self) -> u64 {
        self.source.value.lock().unwrap().as_ref().map_or(0, |s| s.unsent_bytes())
    }

    pub fn set_max_bandwidth(&self, rate: Option<u64>) -> Result<()> {
        self.with_source(|s| s.set_max_bandwidth(rate))
    }

    pub fn throttled(&self) -> Duration {
        self.source.value.lock().unwrap().as_ref().map_or(Duration::ZERO, |s| s.throttled())
    }

    /// Stops queuing new pages (pending sends and syncs end with `ERR_MULTIFD_CANCELLED`); the
    /// packets being written finish, so every channel stays at a packet boundary.
    pub fn stop_queuing(&self) {
        if let Some(s) = self.source.value.lock().unwrap().as_ref() {
            s.stop_queuing();
        }
    }

    /// Fails the session with `err` (first error wins): channels are shut down at once.
    pub fn fail(&self, err: Error) -> bool {
        self.failure.fail(err)
    }

    /// Closes every connection and joins every channel thread. With `abort`, sockets are shut
    /// down first; otherwise channel threads finish their queues (call after the final sync).
    /// A connect still in flight is not waited for: it closes what it opens. Idempotent.
    pub fn close(&self, abort: bool) {
        // Under each slot's lock, so a connect finishing now either stored its value (taken
        // below) or sees `closed` and drops it.
        let source = {
            let mut slot = self.source.value.lock().unwrap();
            self.closed.store(true, Ordering::Release);
            slot.take()
        };
        if let Some(s) = source {
            s.close(abort);
        }
        self.control.close();
        let mut connecting = self.connecting.lock().unwrap();
        for w in std::mem::take(&mut *connecting) {
            if w.is_finished() {
                let _ = w.join();
            }
        }
    }
}

impl Drop for SourceSession {
    fn drop(&mut self) {
        self.close(true);
    }
}
