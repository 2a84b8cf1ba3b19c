//! Source and destination sessions for the TypeScript orchestrator. Each is a handle over the
//! core's threads plus the control connection; every decision (when to sync, complete, fail)
//! is made in TypeScript.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use multifd_core::control::Control;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::session::{Counters, Event, Failure};
use multifd_core::source::{Selection, Source, SourceConfig};
use multifd_core::tls::{TlsClient, TlsOptions, TlsServer};
use multifd_core::transport::Address;
use multifd_core::wire::{Compression, Geometry};
use multifd_core::{Error, ErrorCode};
use napi::bindgen_prelude::{Buffer, Function};
use napi_derive::napi;

use crate::block::Block;
use crate::errors::IntoNapi;
use crate::events::{JsEvents, NativeEvent};
use crate::numbers::{code, to_u64, uuid};

/// Counters of one channel.
#[napi(object)]
pub struct ChannelCounters {
    pub bytes: f64,
    pub packets: f64,
    pub normal_pages: f64,
    pub zero_pages: f64,
    pub syncs: f64,
    /// MSG_ZEROCOPY sends issued.
    pub zero_copy_sends: f64,
    /// Zero-copy completions reaped from the error queue.
    pub zero_copy_completions: f64,
    /// Completions where the kernel copied anyway (QEMU's dirty-sync-missed-zero-copy).
    pub zero_copy_copied: f64,
    /// ENOBUFS returns from zero-copy sends (locked-memory limit).
    pub zero_copy_enobufs: f64,
    /// 1 when this channel fell back to copying sends.
    pub zero_copy_fallbacks: f64,
}

fn counters(stats: Vec<Counters>) -> Vec<ChannelCounters> {
    stats
        .into_iter()
        .map(|c| ChannelCounters {
            bytes: c.bytes as f64,
            packets: c.packets as f64,
            normal_pages: c.normal_pages as f64,
            zero_pages: c.zero_pages as f64,
            syncs: c.syncs as f64,
            zero_copy_sends: c.zc_sends as f64,
            zero_copy_completions: c.zc_completions as f64,
            zero_copy_copied: c.zc_copied as f64,
            zero_copy_enobufs: c.zc_enobufs as f64,
            zero_copy_fallbacks: c.zc_fallbacks as f64,
        })
        .collect()
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(u64::from(v))
}

#[napi(object)]
pub struct ChannelOptions {
    pub uuid: Buffer,
    pub channels: u32,
    pub page_size: u32,
    pub compression: String,
    /// zlib 1..9, zstd 1..20; absent for the default (1).
    pub compression_level: Option<u32>,
    pub zero_page_detection: bool,
    pub zero_copy: bool,
    pub connect_timeout_ms: u32,
    /// How long a stalled destination may block a channel; absent for no limit.
    pub peer_timeout_ms: Option<u32>,
    /// Put an xxh3-64 digest of each packet's data pages in its header.
    pub integrity: bool,
    /// Bytes per second over all channels; absent for no limit.
    pub max_bandwidth: Option<f64>,
}

fn bandwidth(v: Option<f64>) -> napi::Result<Option<u64>> {
    v.map(|b| to_u64(b, "max bandwidth")).transpose()
}

/// Mutual TLS credentials, as PEM (the TypeScript layer reads files).
#[napi(object)]
pub struct TlsCredentials {
    /// This side's certificate chain, leaf first.
    pub cert: Buffer,
    /// The private key for `cert`.
    pub key: Buffer,
    /// The CA certificates that may sign the peer's certificate.
    pub ca: Buffer,
    /// Source: the name the destination's certificate must carry (default: the host dialled).
    pub name: Option<String>,
    /// Destination: identities allowed to connect (subject, common name or alternative name).
    pub allow: Option<Vec<String>>,
}

impl From<TlsCredentials> for TlsOptions {
    fn from(c: TlsCredentials) -> TlsOptions {
        TlsOptions { cert: c.cert.to_vec(), key: c.key.to_vec(), ca: c.ca.to_vec(), name: c.name, allow: c.allow.unwrap_or_default() }
    }
}

/// A negotiated TLS session, as the control connection saw it.
#[napi(object)]
pub struct TlsSessionInfo {
    /// `TLS 1.3` or `TLS 1.2`.
    pub protocol: String,
    /// e.g. `TLS13_AES_128_GCM_SHA256`.
    pub cipher_suite: String,
    /// The peer certificate's subject (RFC 4514), e.g. `CN=source,O=Example`.
    pub peer_subject: Option<String>,
    /// The peer certificate's alternative names.
    pub peer_alt_names: Vec<String>,
}

impl From<multifd_core::tls::TlsInfo> for TlsSessionInfo {
    fn from(i: multifd_core::tls::TlsInfo) -> Self {
        TlsSessionInfo { protocol: i.protocol, cipher_suite: i.cipher_suite, peer_subject: i.peer.as_ref().map(|p| p.subject.clone()), peer_alt_names: i.peer.map(|p| p.alt_names).unwrap_or_default() }
    }
}

/// A page range in bytes.
#[napi(object)]
pub struct ByteRange {
    pub offset: f64,
    pub length: f64,
}

#[napi]
pub struct NativeSource {
    address: Address,
    events: JsEvents,
    failure: Arc<Failure>,
    control: Arc<Mutex<Option<Arc<Control>>>>,
    source: Arc<Mutex<Option<Source>>>,
    tls: Option<TlsClient>,
    /// Connects (and TLS handshakes) run here, off the JavaScript thread; joined by `close`.
    connecting: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// Runs `work` on its own thread: its value goes into `slot` and `ready` is emitted, or its
/// error fails the session. The JavaScript thread never waits on the network.
fn in_background<T: Send + 'static>(
    name: &str,
    failure: &Arc<Failure>,
    slot: &Arc<Mutex<Option<T>>>,
    ready: Event,
    work: impl FnOnce() -> multifd_core::Result<T> + Send + 'static,
) -> napi::Result<std::thread::JoinHandle<()>> {
    let (failure, slot) = (failure.clone(), slot.clone());
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || match work() {
            Ok(v) => {
                *slot.lock().unwrap() = Some(v);
                (failure.events())(ready);
            }
            Err(e) => {
                failure.fail(e);
            }
        })
        .map_err(|e| crate::errors::to_napi(Error::new(ErrorCode::Io, format!("spawn {name}: {e}"))))
}

#[napi]
impl NativeSource {
    /// Starts opening the control connection (with `tls`, after a mutual TLS handshake, which
    /// the channels repeat) in the background: a `controlConnected` event follows, or `failed`.
    /// `onEvent` receives every event of this session.
    #[napi(factory)]
    pub fn connect(address: String, connect_timeout_ms: u32, tls: Option<TlsCredentials>, on_event: Function<NativeEvent, ()>) -> napi::Result<NativeSource> {
        let address = Address::parse(&address).into_napi()?;
        let tls = tls.map(|c| TlsClient::new(&c.into(), &address)).transpose().into_napi()?;
        let events = JsEvents::new(on_event)?;
        let failure = Failure::new(events.sink());
        let control = Arc::new(Mutex::new(None));
        let (addr, client, sink) = (address.clone(), tls.clone(), events.sink());
        let worker = in_background("multifd/connect", &failure, &control, Event::ControlConnected, move || Control::connect(&addr, ms(connect_timeout_ms), client.as_ref(), sink));
        let worker = match worker {
            Ok(w) => w,
            Err(e) => {
                events.release();
                return Err(e);
            }
        };
        Ok(NativeSource { address, events, failure, control, source: Arc::new(Mutex::new(None)), tls, connecting: Mutex::new(vec![worker]) })
    }

    /// The control connection's TLS session, once connected with TLS.
    #[napi]
    pub fn tls_info(&self) -> Option<TlsSessionInfo> {
        self.control.lock().unwrap().as_ref().and_then(|c| c.conn().tls().map(|t| t.info().into()))
    }

    #[napi]
    pub fn send_control(&self, frame: Buffer) -> napi::Result<()> {
        match self.control.lock().unwrap().as_ref() {
            Some(c) => c.send(&frame).into_napi(),
            None => Err(Error::new(ErrorCode::State, "the control connection is closed")).into_napi(),
        }
    }

    /// Starts connecting the multifd channels in the background (each authenticated with TLS
    /// when configured, each sending its init packet); `channelsReady` follows, or `failed`.
    #[napi]
    pub fn start_channels(&self, options: ChannelOptions) -> napi::Result<()> {
        let mut connecting = self.connecting.lock().unwrap();
        if connecting.len() > 1 || self.source.lock().unwrap().is_some() {
            return Err(Error::new(ErrorCode::State, "channels are already started")).into_napi();
        }
        let channels = u8::try_from(options.channels)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| Error::new(ErrorCode::InvalidArgument, format!("channels must be 1..255, got {}", options.channels)))
            .into_napi()?;
        let config = SourceConfig {
            address: self.address.clone(),
            uuid: uuid(&options.uuid)?,
            channels,
            geometry: Geometry::new(options.page_size).into_napi()?,
            compression: Compression::from_name(&options.compression).into_napi()?,
            compression_level: options.compression_level,
            zero_page_detection: options.zero_page_detection,
            zero_copy: options.zero_copy,
            connect_timeout: ms(options.connect_timeout_ms),
            peer_timeout: options.peer_timeout_ms.map(ms),
            max_bandwidth: bandwidth(options.max_bandwidth)?,
            integrity: options.integrity,
            tls: self.tls.clone(),
        };
        let failure = self.failure.clone();
        connecting.push(in_background("multifd/connect", &self.failure, &self.source, Event::ChannelsReady, move || Source::start(config, failure))?);
        Ok(())
    }

    fn with_source<T>(&self, f: impl FnOnce(&Source) -> multifd_core::Result<T>) -> napi::Result<T> {
        match self.source.lock().unwrap().as_ref() {
            Some(s) => f(s).into_napi(),
            None => Err(Error::new(ErrorCode::State, "channels are not started")).into_napi(),
        }
    }

    /// Queues pages of `block`: all of them, `ranges`, or (with `dirty`) the dirty ones.
    /// A `done` event with this `id` follows.
    #[napi]
    pub fn send(&self, id: u32, block: &Block, ranges: Option<Vec<ByteRange>>, dirty: bool) -> napi::Result<()> {
        let selection = match (ranges, dirty) {
            (_, true) => Selection::Dirty,
            (Some(r), false) => Selection::Ranges(r.iter().map(|r| Ok((to_u64(r.offset, "offset")?, to_u64(r.length, "length")?))).collect::<napi::Result<_>>()?),
            (None, false) => Selection::Whole,
        };
        self.with_source(|s| s.send(id, block.inner.clone(), selection))
    }

    /// Queues a SYNC on every channel; a `done` event with this `id` and the epoch follows.
    #[napi]
    pub fn sync(&self, id: u32) -> napi::Result<f64> {
        self.with_source(|s| s.sync(id)).map(|e| e as f64)
    }

    #[napi]
    pub fn stats(&self) -> Vec<ChannelCounters> {
        counters(self.source.lock().unwrap().as_ref().map(|s| s.stats()).unwrap_or_default())
    }

    /// Changes the bandwidth limit of all channels together (bytes per second; absent for no
    /// limit). Applies to the next packet of every channel.
    #[napi]
    pub fn set_max_bandwidth(&self, bytes_per_second: Option<f64>) -> napi::Result<()> {
        let rate = bandwidth(bytes_per_second)?;
        self.with_source(|s| s.set_max_bandwidth(rate))
    }

    /// Milliseconds the channels have waited for the bandwidth limit, all channels added up.
    #[napi]
    pub fn throttled_ms(&self) -> f64 {
        self.source.lock().unwrap().as_ref().map_or(0.0, |s| s.throttled().as_secs_f64() * 1000.0)
    }

    /// Stops queuing new pages (pending sends and syncs end with ERR_MULTIFD_CANCELLED); the
    /// packets being written finish, so every channel stays at a packet boundary.
    #[napi]
    pub fn stop_queuing(&self) {
        if let Some(s) = self.source.lock().unwrap().as_ref() {
            s.stop_queuing();
        }
    }

    /// Fails the session with `code` (first error wins): channels are shut down at once.
    #[napi]
    pub fn fail(&self, code_name: String, message: String) -> bool {
        self.failure.fail(Error::new(code(&code_name), message))
    }

    /// Joins every thread and closes every connection. With `abort`, sockets are shut down
    /// first; otherwise channel threads finish their queues (call after the final sync).
    #[napi]
    pub fn close(&self, abort: bool) {
        // A connect in flight ends within its connect timeout; its result is closed below.
        for w in self.connecting.lock().unwrap().drain(..) {
            let _ = w.join();
        }
        if let Some(s) = self.source.lock().unwrap().take() {
            s.close(abort);
        }
        if let Some(c) = self.control.lock().unwrap().take() {
            c.close();
        }
        self.events.release();
    }
}

#[napi(object)]
pub struct DestinationOptions {
    pub uuid: Buffer,
    pub channels: u32,
    pub page_size: u32,
    pub compression: String,
    pub channel_timeout_ms: u32,
    /// How long a stalled source may keep a channel mid-packet; absent for no limit.
    pub peer_timeout_ms: Option<u32>,
    /// Check each packet's data pages against the digest in its header.
    pub integrity: bool,
}

#[napi]
pub struct NativeDestination {
    dest: Destination,
    events: JsEvents,
    blocks: Mutex<Vec<Arc<multifd_core::block::RamBlock>>>,
}

#[napi]
impl NativeDestination {
    #[napi(factory)]
    /// Listens on `address`. With `tls`, every connection must complete a mutual TLS
    /// handshake and pass the allow-list within `classify_timeout_ms` before it is read.
    pub fn listen(address: String, classify_timeout_ms: u32, tls: Option<TlsCredentials>, on_event: Function<NativeEvent, ()>) -> napi::Result<NativeDestination> {
        let address = Address::parse(&address).into_napi()?;
        let tls = tls.map(|c| TlsServer::new(&c.into())).transpose().into_napi()?;
        let events = JsEvents::new(on_event)?;
        match Destination::listen(&address, ms(classify_timeout_ms), tls, events.sink()) {
            Ok(dest) => Ok(NativeDestination { dest, events, blocks: Mutex::new(Vec::new()) }),
            Err(e) => {
                events.release();
                Err(e).into_napi()
            }
        }
    }

    /// The address sources connect to (`tcp:HOST:PORT` with the real port, or `unix:PATH`).
    #[napi(getter)]
    pub fn address(&self) -> String {
        self.dest.address().to_string()
    }

    /// The accepted control connection's TLS session, when TLS is on.
    #[napi]
    pub fn tls_info(&self) -> Option<TlsSessionInfo> {
        self.dest.control_tls().map(Into::into)
    }

    #[napi]
    pub fn send_control(&self, frame: Buffer) -> napi::Result<()> {
        self.dest.send_control(&frame).into_napi()
    }

    /// Adds a block that pages may be written into (before `configure`).
    #[napi]
    pub fn add_block(&self, block: &Block) {
        self.blocks.lock().unwrap().push(block.inner.clone());
    }

    /// Starts admitting channels for this session.
    #[napi]
    pub fn configure(&self, options: DestinationOptions) -> napi::Result<()> {
        let channels = u8::try_from(options.channels)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| Error::new(ErrorCode::InvalidArgument, format!("channels must be 1..255, got {}", options.channels)))
            .into_napi()?;
        self.dest
            .configure(DestConfig {
                uuid: uuid(&options.uuid)?,
                channels,
                geometry: Geometry::new(options.page_size).into_napi()?,
                compression: Compression::from_name(&options.compression).into_napi()?,
                blocks: self.blocks.lock().unwrap().clone(),
                channel_timeout: ms(options.channel_timeout_ms),
                peer_timeout: options.peer_timeout_ms.map(ms),
                integrity: options.integrity,
            })
            .into_napi()
    }

    #[napi]
    pub fn stats(&self) -> Vec<ChannelCounters> {
        counters(self.dest.stats())
    }

    #[napi]
    pub fn fail(&self, code_name: String, message: String) -> bool {
        self.dest.failure().fail(Error::new(code(&code_name), message))
    }

    /// Completes: channel readers stop at the next packet boundary and are joined.
    #[napi]
    pub fn finish(&self) -> napi::Result<()> {
        self.dest.finish().into_napi()
    }

    /// Joins every thread and closes every connection and the listener.
    #[napi]
    pub fn close(&self) {
        self.dest.close();
        self.blocks.lock().unwrap().clear();
        self.events.release();
    }
}
