//! What a source or destination session shares between its threads: first-error-wins failure,
//! the connections to shut down, and the event sink towards the orchestrator.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::Error;
use crate::transport::Conn;

/// Something the data plane tells the orchestrator (TypeScript, through the binding).
#[derive(Debug)]
pub enum Event {
    /// The first error; the session is failed and its channels are shut down.
    Failed(Error),
    /// A queued command finished: `result` is pages handled, or the error that stopped it.
    Done { id: u32, result: Result<u64, Error> },
    /// Every channel passed sync barrier `epoch`; `packet_num` is the high-water mark.
    Synced { epoch: u64, packet_num: u64 },
    /// A multifd channel was admitted (destination) or connected (source).
    ChannelUp { id: u8 },
    /// A control-channel message arrived.
    Control(Vec<u8>),
    /// The control connection ended: cleanly (`None`) or with an error.
    ControlClosed(Option<Error>),
    /// Destination: a control connection was accepted. Source: the control connection is up
    /// (connected, and with TLS authenticated both ways).
    ControlConnected,
    /// Source: every multifd channel is connected (and authenticated) and has sent its init
    /// packet; the channel threads are running.
    ChannelsReady,
    /// Something degraded without failing the session (e.g. zero-copy fell back to copying).
    Warning(Error),
    /// A broken connection was replaced and carries traffic again.
    Recovered(Recovery),
}

/// One repaired connection.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The channel id, or `None` for the control connection.
    pub connection: Option<u8>,
    /// Why it broke.
    pub cause: Error,
    /// Pages sent again (source) or expected again (destination) because of it.
    pub pages_resent: u64,
    /// From the break being noticed to the replacement carrying traffic.
    pub took: Duration,
}

/// Where events go. The binding forwards them to JavaScript; tests collect them.
pub type EventSink = Arc<dyn Fn(Event) + Send + Sync>;

/// A control connection's reader, delivering into a session's events.
pub fn control_events(events: EventSink) -> crate::control::InboundSink {
    Arc::new(move |i| {
        events(match i {
            crate::control::Inbound::Frame(f) => Event::Control(f),
            crate::control::Inbound::Closed(end) => Event::ControlClosed(end),
        })
    })
}

/// Per-channel counters, read cheaply by polling.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Bytes written or read on the channel, headers included.
    pub bytes: AtomicU64,
    pub packets: AtomicU64,
    pub normal_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub syncs: AtomicU64,
    /// MSG_ZEROCOPY sends issued, completions reaped, completions where the kernel copied
    /// anyway, ENOBUFS returns, and fallbacks to copying sends.
    pub zc_sends: AtomicU64,
    pub zc_completions: AtomicU64,
    pub zc_copied: AtomicU64,
    pub zc_enobufs: AtomicU64,
    pub zc_fallbacks: AtomicU64,
}

/// A snapshot of [`ChannelStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes: u64,
    pub packets: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub syncs: u64,
    pub zc_sends: u64,
    pub zc_completions: u64,
    pub zc_copied: u64,
    pub zc_enobufs: u64,
    pub zc_fallbacks: u64,
}

impl ChannelStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Counters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            bytes: get(&self.bytes),
            packets: get(&self.packets),
            normal_pages: get(&self.normal_pages),
            zero_pages: get(&self.zero_pages),
            syncs: get(&self.syncs),
            zc_sends: get(&self.zc_sends),
            zc_completions: get(&self.zc_completions),
            zc_copied: get(&self.zc_copied),
            zc_enobufs: get(&self.zc_enobufs),
            zc_fallbacks: get(&self.zc_fallbacks),
        }
    }
}

/// First error wins: the first failure is kept and acted on, later ones only recorded.
pub struct Failure {
    failed: AtomicBool,
    errors: Mutex<Vec<Error>>,
    conns: Mutex<Vec<Arc<Conn>>>,
    wake: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    events: EventSink,
}

impl Failure {
    pub fn new(events: EventSink) -> Arc<Self> {
        Arc::new(Failure { failed: AtomicBool::new(false), errors: Mutex::new(Vec::new()), conns: Mutex::new(Vec::new()), wake: Mutex::new(Vec::new()), events })
    }

    pub fn events(&self) -> &EventSink {
        &self.events
    }

    /// Registers a connection to shut down on failure.
    pub fn watch(&self, conn: Arc<Conn>) {
        if self.is_failed() {
            conn.shutdown();
        }
        self.conns.lock().unwrap().push(conn);
    }

    /// Lets go of every watched connection, so they close once their threads are gone. Called
    /// when the session closes; a failure after that has nothing left to shut down.
    pub fn release_connections(&self) {
        self.conns.lock().unwrap().clear();
    }

    /// Registers a waker (e.g. a condvar notify) to run on failure, so no thread stays blocked.
    pub fn on_failure(&self, wake: impl Fn() + Send + Sync + 'static) {
        self.wake.lock().unwrap().push(Box::new(wake));
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The first error, if any.
    pub fn first(&self) -> Option<Error> {
        self.errors.lock().unwrap().first().cloned()
    }

    /// Errors after the first, kept for diagnosis.
    pub fn secondary(&self) -> Vec<Error> {
        self.errors.lock().unwrap().iter().skip(1).cloned().collect()
    }

    /// Records `err`. The first one shuts down every watched connection, wakes every waiter
    /// and emits `Event::Failed`; later ones are only kept. Returns true for the first.
    pub fn fail(&self, err: Error) -> bool {
        let first = {
            let mut errors = self.errors.lock().unwrap();
            errors.push(err.clone());
            errors.len() == 1
        };
        if !first {
            return false;
        }
        self.failed.store(true, Ordering::Release);
        // The event goes out before anything is woken: a waiter that now ends with this error
        // (and reports it as its own event) is always seen after the session's failure.
        (self.events)(Event::Failed(err));
        for c in self.conns.lock().unwrap().iter() {
            c.shutdown();
        }
        for w in self.wake.lock().unwrap().iter() {
            w();
        }
        true
    }
}
