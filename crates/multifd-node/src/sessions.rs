//! Source and destination sessions for the TypeScript orchestrator: type conversion only. The
//! core owns connections, threads, the control protocol's sequencing rules and teardown
//! (`multifd_core::lifecycle`, `multifd_core::dest`); TypeScript decides when to sync,
//! complete or give up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use multifd_core::compress;
use multifd_core::dest::{DestConfig, Destination};
use multifd_core::limits::{CHANNELS, DEFAULT_CHANNEL_RETRIES, DEFAULT_RESUME_WINDOW_MS};
use multifd_core::lifecycle::SourceSession;
use multifd_core::session::{ChannelState, Counters};
use multifd_core::source::{Selection, SourceConfig};
use multifd_core::tls::{TlsClient, TlsOptions, TlsServer};
use multifd_core::transport::Address;
use multifd_core::wire::Geometry;
use multifd_core::{Error, ErrorCode};
use napi::bindgen_prelude::{AsyncTask, Buffer, Function};
use napi_derive::napi;

use crate::block::{Block, CompletionDigestTask};
use crate::control_messages::{self, NativeBlockDigest, NativeControlMessage};
use crate::errors::{IntoCoded, Result, coded};
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
    /// Where its connection stands: `up`; `recovering` (source: redialling after a fault);
    /// `lost` (destination: broken, its replacement awaited; source: given up on).
    pub state: LinkState,
}

/// A channel connection's state.
#[napi(string_enum = "lowercase")]
pub enum LinkState {
    Up,
    Recovering,
    Lost,
}

impl From<ChannelState> for LinkState {
    fn from(s: ChannelState) -> Self {
        match s {
            ChannelState::Up => LinkState::Up,
            ChannelState::Recovering => LinkState::Recovering,
            ChannelState::Lost => LinkState::Lost,
        }
    }
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
            state: c.state.into(),
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
    /// Redials of a connection (a channel or the control connection) that broke; 0 fails at the first fault; absent for the
    /// core's default.
    pub channel_retries: Option<u32>,
    /// Channels that must remain when one cannot be redialled (1..=channels; default 1).
    pub min_channels: Option<u32>,
}

fn bandwidth(v: Option<f64>) -> Result<Option<u64>> {
    v.map(|b| to_u64(b, "max bandwidth")).transpose().into_coded()
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

/// A source session: type conversion over the core's [`SourceSession`], which owns the
/// control connection, the channels, the protocol's sequencing rules and teardown.
#[napi]
pub struct NativeSource {
    session: SourceSession,
    events: JsEvents,
}

/// The channel count as the core takes it; the range is the core's (`limits::CHANNELS`).
fn channels(n: u32) -> Result<u8> {
    u8::try_from(n)
        .ok()
        .filter(|_| CHANNELS.contains(&n))
        .ok_or_else(|| Error::new(ErrorCode::InvalidArgument, format!("channels must be {}..{}, got {n}", CHANNELS.start(), CHANNELS.end())))
        .into_coded()
}

#[napi]
impl NativeSource {
    /// Starts opening the control connection (with `tls`, after a mutual TLS handshake, which
    /// the channels repeat) in the background: a `controlConnected` event follows, or `failed`.
    /// `onEvent` receives every event of this session.
    #[napi(factory)]
    pub fn connect(address: String, connect_timeout_ms: u32, tls: Option<TlsCredentials>, on_event: Function<NativeEvent, ()>) -> Result<NativeSource> {
        let address = Address::parse(&address).into_coded()?;
        let tls = tls.map(|c| TlsClient::new(&c.into(), &address)).transpose().into_coded()?;
        let events = JsEvents::new(on_event).into_coded()?;
        match SourceSession::connect(address, ms(connect_timeout_ms), tls, events.sink()) {
            Ok(session) => Ok(NativeSource { session, events }),
            Err(e) => {
                events.release();
                Err(coded(e))
            }
        }
    }

    /// The control connection's TLS session, once connected with TLS.
    #[napi]
    pub fn tls_info(&self) -> Option<TlsSessionInfo> {
        self.session.tls_info().map(Into::into)
    }

    #[napi]
    pub fn send_control(&self, message: NativeControlMessage) -> Result<()> {
        self.session.send_control(&control_messages::encode(message)?).into_coded()
    }

    /// Sends `complete`, which names `epoch` (the last sync, acknowledged) and, with
    /// integrity, every block's digest.
    #[napi]
    pub fn send_complete(&self, epoch: f64, digests: Option<Vec<NativeBlockDigest>>) -> Result<()> {
        let epoch = to_u64(epoch, "epoch").into_coded()?;
        let frame = control_messages::encode(NativeControlMessage::Complete { epoch: epoch as f64, digests })?;
        self.session.send_complete(epoch, &frame).into_coded()
    }

    /// `block`'s digest for `complete` (docs/PROTOCOL.md, "Integrity"), as 16 hex digits, off the
    /// JavaScript thread: from the digests of its pages as they were sent, hashing from memory
    /// the pages never sent or marked dirty since.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn completion_digest(&self, block: &Block) -> AsyncTask<CompletionDigestTask> {
        AsyncTask::new(CompletionDigestTask { block: block.inner.clone(), digests: self.session.page_digests(), source: true })
    }

    /// The destination acknowledged sync `epoch`; anything but a sync this source sent (and not
    /// acknowledged before) fails the session with ERR_MULTIFD_OUT_OF_SEQUENCE. Returns the
    /// epoch up to which every page queued is delivered: `epoch`, or an earlier one while the
    /// pages of a given-up channel are still on their way.
    #[napi]
    pub fn synced(&self, epoch: f64) -> Result<f64> {
        let epoch = to_u64(epoch, "epoch").into_coded()?;
        self.session.synced(epoch).map(|e| e as f64).into_coded()
    }

    /// Drops the control connection to redial it (nothing heard on it for `peerTimeoutMs`);
    /// false when it will not be redialled.
    #[napi]
    pub fn drop_control(&self, code_name: String, message: String) -> bool {
        self.session.drop_control(Error::new(code(&code_name), message))
    }

    /// The destination reported completion; before `complete` was sent this fails the session
    /// with ERR_MULTIFD_OUT_OF_SEQUENCE.
    #[napi]
    pub fn completed(&self) -> Result<()> {
        self.session.completed().into_coded()
    }

    /// Starts connecting the multifd channels in the background, all at once (each
    /// authenticated with TLS when configured, each sending its init packet); `channelsReady`
    /// follows, or `failed`.
    #[napi]
    pub fn start_channels(&self, options: ChannelOptions) -> Result<()> {
        let config = SourceConfig {
            address: self.session.address().clone(),
            uuid: uuid(&options.uuid).into_coded()?,
            channels: channels(options.channels)?,
            geometry: Geometry::new(options.page_size).into_coded()?,
            compression: compress::by_name(&options.compression).into_coded()?,
            compression_level: options.compression_level,
            zero_page_detection: options.zero_page_detection,
            zero_copy: options.zero_copy,
            connect_timeout: ms(options.connect_timeout_ms),
            peer_timeout: options.peer_timeout_ms.map(ms),
            max_bandwidth: bandwidth(options.max_bandwidth)?,
            integrity: options.integrity,
            tls: self.session.tls().cloned(),
            channel_retries: options.channel_retries.unwrap_or(DEFAULT_CHANNEL_RETRIES),
            // Above 255 no channel count allows it: 0 is refused the same way.
            min_channels: u8::try_from(options.min_channels.unwrap_or(1)).unwrap_or(0),
        };
        self.session.start_channels(config).into_coded()
    }

    /// Queues pages of `block`: all of them, `ranges`, or (with `dirty`) the dirty ones.
    /// A `done` event with this `id` follows.
    #[napi]
    pub fn send(&self, id: u32, block: &Block, ranges: Option<Vec<ByteRange>>, dirty: bool) -> Result<()> {
        let selection = match (ranges, dirty) {
            (_, true) => Selection::Dirty,
            (Some(r), false) => Selection::Ranges(r.iter().map(|r| Ok((to_u64(r.offset, "offset")?, to_u64(r.length, "length")?))).collect::<Result<_>>()?),
            (None, false) => Selection::Whole,
        };
        self.session.send(id, block.inner.clone(), selection).into_coded()
    }

    /// Queues a SYNC on every channel; a `done` event with this `id` follows once every channel
    /// wrote it. Returns the epoch the destination now owes a `synced` for.
    #[napi]
    pub fn sync(&self, id: u32) -> Result<f64> {
        self.session.sync(id).map(|e| e as f64).into_coded()
    }

    #[napi]
    pub fn stats(&self) -> Vec<ChannelCounters> {
        counters(self.session.stats())
    }

    /// Changes the bandwidth limit of all channels together (bytes per second; absent for no
    /// limit). Applies to the next packet of every channel.
    #[napi]
    pub fn set_max_bandwidth(&self, bytes_per_second: Option<f64>) -> Result<()> {
        let rate = bandwidth(bytes_per_second)?;
        self.session.set_max_bandwidth(rate).into_coded()
    }

    /// Milliseconds the channels have waited for the bandwidth limit, all channels added up.
    #[napi]
    pub fn throttled_ms(&self) -> f64 {
        self.session.throttled().as_secs_f64() * 1000.0
    }

    /// Bytes written to the channels that the destination has not taken yet, all channels
    /// added up: while it shrinks, the destination is making progress.
    #[napi]
    pub fn unsent_bytes(&self) -> f64 {
        self.session.unsent_bytes() as f64
    }

    /// Stops queuing new pages (pending sends and syncs end with ERR_MULTIFD_CANCELLED); the
    /// packets being written finish, so every channel stays at a packet boundary.
    #[napi]
    pub fn stop_queuing(&self) {
        self.session.stop_queuing();
    }

    /// Fails the session with `code` (first error wins): channels are shut down at once.
    #[napi]
    pub fn fail(&self, code_name: String, message: String) -> bool {
        self.session.fail(Error::new(code(&code_name), message))
    }

    /// Closes every connection and joins the channel threads, never waiting for the network
    /// (a connect in flight closes what it opens). With `abort`, sockets are shut down first;
    /// otherwise channel threads finish their queues (call after the final sync).
    #[napi]
    pub fn close(&self, abort: bool) {
        self.session.close(abort);
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
    /// How long a broken channel's or control connection's replacement may take; 0 fails at once; absent for the core's
    /// default.
    pub resume_window_ms: Option<u32>,
}

/// What [`NativeDestination::complete_pieces`] returns.
#[napi(object)]
pub struct CompletePieces {
    /// The sync barrier they were taken at.
    pub epoch: f64,
    /// One bitmap per block, in the hello's order.
    pub blocks: Vec<Buffer>,
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
    pub fn listen(address: String, classify_timeout_ms: u32, tls: Option<TlsCredentials>, on_event: Function<NativeEvent, ()>) -> Result<NativeDestination> {
        let address = Address::parse(&address).into_coded()?;
        let tls = tls.map(|c| TlsServer::new(&c.into())).transpose().into_coded()?;
        let events = JsEvents::new(on_event).into_coded()?;
        match Destination::listen(&address, ms(classify_timeout_ms), tls, events.sink()) {
            Ok(dest) => Ok(NativeDestination { dest, events, blocks: Mutex::new(Vec::new()) }),
            Err(e) => {
                events.release();
                Err(e).into_coded()
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
    pub fn send_control(&self, message: NativeControlMessage) -> Result<()> {
        self.dest.send_control(&control_messages::encode(message)?).into_coded()
    }

    /// Adds a block that pages may be written into (before `configure`).
    #[napi]
    pub fn add_block(&self, block: &Block) {
        self.blocks.lock().unwrap().push(block.inner.clone());
    }

    /// Starts admitting channels for this session.
    #[napi]
    pub fn configure(&self, options: DestinationOptions) -> Result<()> {
        let channels = channels(options.channels)?;
        self.dest
            .configure(DestConfig {
                uuid: uuid(&options.uuid).into_coded()?,
                channels,
                geometry: Geometry::new(options.page_size).into_coded()?,
                compression: compress::by_name(&options.compression).into_coded()?,
                blocks: self.blocks.lock().unwrap().clone(),
                channel_timeout: ms(options.channel_timeout_ms),
                peer_timeout: options.peer_timeout_ms.map(ms),
                integrity: options.integrity,
                resume_window: ms(options.resume_window_ms.unwrap_or(DEFAULT_RESUME_WINDOW_MS)),
            })
            .into_coded()
    }

    #[napi]
    pub fn stats(&self) -> Vec<ChannelCounters> {
        counters(self.dest.stats())
    }

    #[napi]
    pub fn fail(&self, code_name: String, message: String) -> bool {
        self.dest.failure().fail(Error::new(code(&code_name), message))
    }

    /// The source gave channel `id` up (`channelDropped`): barriers stop waiting for it.
    #[napi]
    pub fn drop_channel(&self, id: u32) -> Result<()> {
        self.dest.drop_channel(id).into_coded()
    }

    /// Drops the control connection and waits for its replacement (nothing heard on it for
    /// `peerTimeoutMs`); false when no replacement would be waited for.
    #[napi]
    pub fn drop_control(&self, code_name: String, message: String) -> bool {
        self.dest.drop_control(Error::new(code(&code_name), message))
    }

    /// Connections rejected so far because they never identified themselves as this session's
    /// (each reported in a rate-limited `warning` event naming the peer and the reason).
    #[napi]
    pub fn rejected_connections(&self) -> f64 {
        self.dest.rejected_connections() as f64
    }

    /// The source said `complete {epoch}`: accepted only when every announced channel was
    /// admitted and delivered that epoch's SYNC (otherwise the session fails with
    /// ERR_MULTIFD_OUT_OF_SEQUENCE); then channel readers stop at the next packet boundary and
    /// are joined.
    #[napi]
    pub fn complete(&self, epoch: f64) -> Result<()> {
        let epoch = to_u64(epoch, "epoch").into_coded()?;
        self.dest.complete(epoch).into_coded()
    }

    /// `block`'s digest at completion (docs/PROTOCOL.md, "Integrity"), as 16 hex digits, off
    /// the JavaScript thread: from the digests of its pages as they landed, hashing from memory
    /// the pages never received in this session.
    #[napi(ts_return_type = "Promise<string>")]
    pub fn completion_digest(&self, block: &Block) -> AsyncTask<CompletionDigestTask> {
        AsyncTask::new(CompletionDigestTask { block: block.inner.clone(), digests: self.dest.page_digests(), source: false })
    }

    /// Each block's complete pieces as of the last sync barrier (docs/PROTOCOL.md, "Resume"):
    /// one bitmap per block (bit `i` of byte `i / 8` for 1 MiB piece `i`), or null before the
    /// first barrier.
    #[napi]
    pub fn complete_pieces(&self) -> Option<CompletePieces> {
        self.dest.complete_pieces().map(|(epoch, blocks)| CompletePieces { epoch: epoch as f64, blocks: blocks.into_iter().map(Buffer::from).collect() })
    }

    /// Joins every thread and closes every connection and the listener.
    #[napi]
    pub fn close(&self) {
        self.dest.close();
        self.blocks.lock().unwrap().clear();
        self.events.release();
    }
}
