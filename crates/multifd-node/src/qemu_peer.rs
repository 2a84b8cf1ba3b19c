//! Stock QEMU as the peer: `recv --qemu` (a destination for a QEMU source, writing a
//! mapped-ram file) and `send --qemu` (a mapped-ram file played into a QEMU destination).
//! Each run is one native thread that reports a `done` event; progress is polled.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use multifd_core::qemu_peer::{ChannelTotals, PeerProgress, QemuReceiver, QemuSender, RecvOptions, RecvSummary, SendOptions, SendSummary};
use multifd_core::session::Event;
use multifd_core::transport::Address;
use multifd_core::{Error, ErrorCode};
use napi::bindgen_prelude::Function;
use napi_derive::napi;

use crate::errors::{IntoCoded, Result, coded};
use crate::events::{JsEvents, NativeEvent};

#[napi(object)]
pub struct QemuPeerChannel {
    pub bytes: f64,
    pub packets: f64,
    pub normal_pages: f64,
    pub zero_pages: f64,
    pub syncs: f64,
}

fn channels(c: &[ChannelTotals]) -> Vec<QemuPeerChannel> {
    c.iter().map(|c| QemuPeerChannel { bytes: c.bytes as f64, packets: c.packets as f64, normal_pages: c.normal_pages as f64, zero_pages: c.zero_pages as f64, syncs: c.syncs as f64 }).collect()
}

#[napi(object)]
pub struct QemuPeerProgress {
    /// Bytes moved on every connection so far.
    pub bytes: f64,
    /// Guest RAM bytes of the migration (0 until the block list is known).
    pub total: f64,
    pub channels: Vec<f64>,
}

fn progress_of(p: &PeerProgress) -> QemuPeerProgress {
    QemuPeerProgress { bytes: p.bytes() as f64, total: p.total.load(Ordering::Relaxed) as f64, channels: p.per_channel().iter().map(|c| c.bytes as f64).collect() }
}

#[napi(object)]
pub struct QemuPeerBlock {
    pub name: String,
    pub length: f64,
    /// Pages holding data (recv); absent pages are zero.
    pub pages_present: Option<f64>,
}

#[napi(object)]
pub struct QemuRecvSummary {
    pub machine: String,
    pub to: Option<String>,
    pub blocks: Vec<QemuPeerBlock>,
    pub main_bytes: f64,
    /// Pages the main channel carried itself (a source without multifd): with data, zero.
    pub main_pages: f64,
    pub main_zero_pages: f64,
    pub per_channel: Vec<QemuPeerChannel>,
    /// Flushes (sync rounds) the source made.
    pub flushes: f64,
    pub device_state_bytes: f64,
    /// none | zlib | zstd, as the source's packets said.
    pub compression: String,
    pub seconds: f64,
}

impl From<RecvSummary> for QemuRecvSummary {
    fn from(s: RecvSummary) -> Self {
        QemuRecvSummary {
            machine: s.machine,
            to: s.to.map(|p| p.display().to_string()),
            blocks: s.blocks.iter().zip(&s.pages_present).map(|(b, &p)| QemuPeerBlock { name: b.name.clone(), length: b.used_len as f64, pages_present: Some(p as f64) }).collect(),
            main_bytes: s.main_bytes as f64,
            main_pages: s.main_pages as f64,
            main_zero_pages: s.main_zero_pages as f64,
            per_channel: channels(&s.per_channel),
            flushes: s.flushes as f64,
            device_state_bytes: s.device_state_bytes as f64,
            compression: s.compression.name().into(),
            seconds: s.seconds,
        }
    }
}

#[napi(object)]
pub struct QemuSendSummary {
    pub machine: String,
    pub blocks: Vec<QemuPeerBlock>,
    pub main_bytes: f64,
    pub per_channel: Vec<QemuPeerChannel>,
    pub device_state_bytes: f64,
    pub seconds: f64,
}

impl From<SendSummary> for QemuSendSummary {
    fn from(s: SendSummary) -> Self {
        QemuSendSummary {
            machine: s.machine,
            blocks: s.blocks.iter().map(|b| QemuPeerBlock { name: b.name.clone(), length: b.used_len as f64, pages_present: None }).collect(),
            main_bytes: s.main_bytes as f64,
            per_channel: channels(&s.per_channel),
            device_state_bytes: s.device_state_bytes as f64,
            seconds: s.seconds,
        }
    }
}

/// The thread, result and event callback of one run.
struct Job<S> {
    thread: Mutex<Option<JoinHandle<()>>>,
    result: Arc<Mutex<Option<S>>>,
    events: Mutex<Option<JsEvents>>,
}

impl<S: Send + 'static> Job<S> {
    fn new() -> Self {
        Job { thread: Mutex::new(None), result: Arc::default(), events: Mutex::new(None) }
    }

    fn start(&self, name: &str, on_event: Function<NativeEvent, ()>, work: impl FnOnce() -> multifd_core::Result<S> + Send + 'static) -> Result<()> {
        let mut slot = self.thread.lock().unwrap();
        if slot.is_some() {
            return Err(Error::new(ErrorCode::State, "this run already started")).into_coded();
        }
        let events = JsEvents::new(on_event).into_coded()?;
        let sink = events.sink();
        *self.events.lock().unwrap() = Some(events);
        let result = self.result.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let done = work().map(|s| {
                    *result.lock().unwrap() = Some(s);
                    0
                });
                sink(Event::Done { id: 0, result: done });
            })
            .map_err(|e| coded(multifd_core::error::os_error("spawn a thread", e)))?;
        *slot = Some(handle);
        Ok(())
    }

    fn finish(&self) {
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
        if let Some(e) = self.events.lock().unwrap().take() {
            e.release();
        }
    }
}

fn millis(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms.max(1)))
}

/// A destination for one QEMU source, bound at construction.
#[napi]
pub struct NativeQemuReceiver {
    rx: Arc<QemuReceiver>,
    job: Job<RecvSummary>,
}

#[napi]
impl NativeQemuReceiver {
    /// Listens on `address` (`tcp:HOST:PORT`, port 0 picks one, or `unix:PATH`).
    #[napi(factory)]
    pub fn bind(address: String) -> Result<Self> {
        let addr = Address::parse(&address).into_coded()?;
        Ok(NativeQemuReceiver { rx: Arc::new(QemuReceiver::bind(&addr).into_coded()?), job: Job::new() })
    }

    #[napi(getter)]
    pub fn address(&self) -> String {
        self.rx.address().to_string()
    }

    /// Receives one migration into `to` (a mapped-ram file) and/or `outDir` (raw images);
    /// a `done` event follows.
    #[napi]
    pub fn start(&self, to: Option<String>, out_dir: Option<String>, channels: Option<u32>, peer_timeout_ms: u32, on_event: Function<NativeEvent, ()>) -> Result<()> {
        let opts = RecvOptions { to: to.map(PathBuf::from), out_dir: out_dir.map(PathBuf::from), channels, peer_timeout: millis(peer_timeout_ms) };
        let rx = self.rx.clone();
        self.job.start("multifd/qemu-recv", on_event, move || rx.run(&opts))
    }

    #[napi]
    pub fn progress(&self) -> QemuPeerProgress {
        progress_of(&self.rx.progress())
    }

    #[napi]
    pub fn cancel(&self) {
        self.rx.canceller().cancel();
    }

    #[napi]
    pub fn result(&self) -> Option<QemuRecvSummary> {
        self.job.result.lock().unwrap().clone().map(Into::into)
    }

    #[napi]
    pub fn finish(&self) {
        self.job.finish();
    }
}

/// Plays one mapped-ram file into a QEMU destination.
#[napi]
pub struct NativeQemuSender {
    tx: Arc<QemuSender>,
    job: Job<SendSummary>,
}

#[napi]
impl NativeQemuSender {
    #[napi(constructor)]
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        NativeQemuSender { tx: Arc::default(), job: Job::new() }
    }

    #[napi]
    #[allow(clippy::too_many_arguments)]
    pub fn start(&self, path: String, address: String, channels: u32, compression: String, level: Option<u32>, connect_timeout_ms: u32, peer_timeout_ms: u32, on_event: Function<NativeEvent, ()>) -> Result<()> {
        let addr = Address::parse(&address).into_coded()?;
        let opts = SendOptions { channels, compression: multifd_core::compress::by_name(&compression).into_coded()?, level, connect_timeout: millis(connect_timeout_ms), peer_timeout: millis(peer_timeout_ms) };
        let tx = self.tx.clone();
        self.job.start("multifd/qemu-send", on_event, move || tx.run(Path::new(&path), &addr, &opts))
    }

    #[napi]
    pub fn progress(&self) -> QemuPeerProgress {
        progress_of(&self.tx.progress())
    }

    #[napi]
    pub fn cancel(&self) {
        self.tx.canceller().cancel();
    }

    #[napi]
    pub fn result(&self) -> Option<QemuSendSummary> {
        self.job.result.lock().unwrap().clone().map(Into::into)
    }

    #[napi]
    pub fn finish(&self) {
        self.job.finish();
    }
}
