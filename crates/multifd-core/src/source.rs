//! The source data plane: N channel threads, each with its own connection, fed packet-sized
//! batches of pages by a dispatcher that hands each batch to the next channel with room.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::block::RamBlock;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::io::iovec;
use crate::session::{ChannelStats, Counters, Event, Failure};
use crate::tls::TlsClient;
use crate::transport::{Address, Conn};
use crate::wire::{Compression, Flags, Geometry, InitPacket, PacketHeader};
use crate::zerocopy::{self, Notice, ZeroCopySender};

/// Jobs waiting per channel: one being written, one ready behind it, so no channel idles
/// while the dispatcher finds its next batch.
const QUEUE_DEPTH: usize = 2;

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub address: Address,
    pub uuid: [u8; 16],
    pub channels: u8,
    pub geometry: Geometry,
    pub compression: Compression,
    /// Level for zlib (1..9) or zstd (1..20); `None` for the method's default (1).
    pub compression_level: Option<u32>,
    /// Scan pages on the channel threads and send zero pages as offsets only.
    pub zero_page_detection: bool,
    /// Send pages with MSG_ZEROCOPY (TCP only, no compression).
    pub zero_copy: bool,
    pub connect_timeout: Duration,
    /// QEMU's `max-bandwidth`: bytes per second over all channels together; `None` for no
    /// limit. Changeable while the session runs ([`Source::set_max_bandwidth`]).
    pub max_bandwidth: Option<u64>,
    /// How long a stalled destination may block a channel (see `Conn::set_peer_timeout`).
    pub peer_timeout: Option<Duration>,
    /// Put an xxh3-64 digest of each packet's data pages in the header (negotiated).
    pub integrity: bool,
    /// Mutual TLS on every channel: each handshake completes before the init packet.
    pub tls: Option<TlsClient>,
}

/// How much a bucket holds: QEMU measures `max-bandwidth` in windows of 100 ms
/// (`BUFFER_DELAY`), so a burst of up to a tenth of a second's worth goes out at line rate.
const BURST: Duration = Duration::from_millis(100);

/// QEMU's `max-bandwidth` as one token bucket shared by every channel of a session. A channel
/// takes tokens for the whole packet (header and payload) just before writing it; when the
/// bucket is in debt it waits until the debt is paid back at the current rate. Packets are
/// never split, so a channel may run the bucket up to one packet into debt: the long-run rate
/// is the limit, bursts are bounded by a tenth of a second's worth plus one packet per channel.
#[derive(Debug)]
pub struct Throttle {
    bucket: Mutex<Bucket>,
    /// Rate changes and stop wake every waiting channel.
    changed: Condvar,
    /// Total time channels spent waiting for tokens, in nanoseconds.
    waited_ns: AtomicU64,
}

#[derive(Debug)]
struct Bucket {
    rate: Option<u64>,
    /// Bytes that may go now; negative while in debt.
    tokens: f64,
    last: Instant,
    stopped: bool,
}

impl Bucket {
    fn capacity(rate: u64) -> f64 {
        rate as f64 * BURST.as_secs_f64()
    }

    /// Adds the tokens earned since the last refill at the current rate.
    fn refill(&mut self, now: Instant) {
        if let Some(rate) = self.rate {
            let earned = now.saturating_duration_since(self.last).as_secs_f64() * rate as f64;
            self.tokens = (self.tokens + earned).min(Self::capacity(rate));
        }
        self.last = now;
    }
}

impl Throttle {
    /// A bucket for `rate` bytes per second (`None`: unlimited), starting full.
    pub fn new(rate: Option<u64>) -> Result<Throttle> {
        check_rate(rate)?;
        Ok(Throttle {
            bucket: Mutex::new(Bucket { rate, tokens: rate.map_or(0.0, Bucket::capacity), last: Instant::now(), stopped: false }),
            changed: Condvar::new(),
            waited_ns: AtomicU64::new(0),
        })
    }

    pub fn rate(&self) -> Option<u64> {
        self.bucket.lock().unwrap().rate
    }

    /// Changes the rate at once, also for channels already waiting. A debt built up at the old
    /// rate is kept, but never more than one window's worth of the new rate, as QEMU starts
    /// the new limit with its next window; lifting the limit releases every waiting channel.
    pub fn set_rate(&self, rate: Option<u64>) -> Result<()> {
        check_rate(rate)?;
        let mut b = self.bucket.lock().unwrap();
        b.refill(Instant::now());
        b.tokens = match (b.rate, rate) {
            (_, None) => 0.0,
            (None, Some(new)) => Bucket::capacity(new),
            (Some(_), Some(new)) => b.tokens.clamp(-Bucket::capacity(new), Bucket::capacity(new)),
        };
        b.rate = rate;
        drop(b);
        self.changed.notify_all();
        Ok(())
    }

    /// Takes `bytes` tokens, first waiting while the bucket is in debt. Returns false, without
    /// taking anything, once the throttle is stopped (the session is closing).
    pub fn acquire(&self, bytes: u64) -> bool {
        let mut b = self.bucket.lock().unwrap();
        let mut waited_since: Option<Instant> = None;
        let granted = loop {
            if b.stopped {
                break false;
            }
            let Some(rate) = b.rate else { break true };
            let now = Instant::now();
            b.refill(now);
            if b.tokens >= 0.0 {
                b.tokens -= bytes as f64;
                break true;
            }
            waited_since.get_or_insert(now);
            let wait = Duration::from_secs_f64(-b.tokens / rate as f64);
            b = self.changed.wait_timeout(b, wait).unwrap().0;
        };
        if let Some(since) = waited_since {
            self.waited_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        granted
    }

    /// Time channels have spent waiting for tokens so far, all channels added up.
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }

    /// Releases every waiting channel for good: `acquire` returns false from now on.
    pub fn stop(&self) {
        self.bucket.lock().unwrap().stopped = true;
        self.changed.notify_all();
    }
}

fn check_rate(rate: Option<u64>) -> Result<()> {
    if rate == Some(0) {
        fail!(InvalidArgument, "max bandwidth must be at least 1 byte per second (no value for no limit)");
    }
    Ok(())
}

/// Which pages of a block to send.
#[derive(Debug, Clone)]
pub enum Selection {
    Whole,
    /// Byte ranges `(offset, length)`, rounded out to whole pages.
    Ranges(Vec<(u64, u64)>),
    /// The pages marked dirty since the last take; the bits are cleared as they are taken.
    Dirty,
}

enum Job {
    Pages { block: Arc<RamBlock>, offsets: Vec<u64> },
    Sync,
}

struct Queues {
    jobs: Vec<VecDeque<Job>>,
    synced: Vec<u64>,
    cursor: usize,
    stopping: bool,
}

struct Shared {
    config: SourceConfig,
    queues: Mutex<Queues>,
    /// One per channel: work has been queued for it.
    work: Vec<Condvar>,
    /// The dispatcher waits here for queue room and sync progress.
    progress: Condvar,
    packet_num: AtomicU64,
    stats: Vec<ChannelStats>,
    failure: Arc<Failure>,
    throttle: Throttle,
}

enum Command {
    Send { id: u32, block: Arc<RamBlock>, selection: Selection },
    Sync { id: u32 },
}

/// A running set of source channels.
pub struct Source {
    shared: Arc<Shared>,
    /// The channels' connections, for [`Source::unsent_bytes`]; let go of by `close`.
    conns: Mutex<Vec<Arc<Conn>>>,
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    syncs: AtomicU64,
}

impl Source {
    /// Connects every channel, sends each its init packet, and starts the channel threads and
    /// the dispatcher. Connections are registered with `failure`, so the first error anywhere
    /// shuts them all down.
    pub fn start(config: SourceConfig, failure: Arc<Failure>) -> Result<Source> {
        if config.channels == 0 {
            fail!(InvalidArgument, "a session needs at least one channel");
        }
        // Builds one compressor now so a bad level fails before any connection is made.
        crate::compress::compressor(config.compression, config.compression_level)?;
        if config.zero_copy && config.compression != Compression::None {
            fail!(InvalidArgument, "zero-copy send cannot be combined with compression");
        }
        if config.zero_copy && config.tls.is_some() {
            fail!(InvalidArgument, "zero-copy send cannot be combined with TLS: pages are encrypted into new buffers, so there is nothing to send without copying (QEMU refuses the same)");
        }
        if config.zero_copy && !matches!(config.address, Address::Tcp { .. }) {
            fail!(ZeroCopyUnavailable, "zero-copy send needs a TCP address; {} is not (SO_ZEROCOPY is TCP-only)", config.address);
        }
        let throttle = Throttle::new(config.max_bandwidth)?;
        let n = config.channels as usize;
        let conns: Vec<Arc<Conn>> = connect_channels(&config)?.into_iter().map(Arc::new).collect();
        for conn in &conns {
            failure.watch(conn.clone());
        }
        let watched = conns.clone();
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues { jobs: (0..n).map(|_| VecDeque::new()).collect(), synced: vec![0; n], cursor: 0, stopping: false }),
            work: (0..n).map(|_| Condvar::new()).collect(),
            progress: Condvar::new(),
            packet_num: AtomicU64::new(0),
            stats: (0..n).map(|_| ChannelStats::default()).collect(),
            failure: failure.clone(),
            throttle,
            config,
        });
        {
            let weak = Arc::downgrade(&shared);
            failure.on_failure(move || {
                if let Some(s) = weak.upgrade() {
                    s.stop();
                }
            });
        }
        let mut threads = Vec::with_capacity(n + 1);
        for (id, conn) in conns.into_iter().enumerate() {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("multifd/send/{id}"))
                    .spawn(move || {
                        if let Err(e) = s.run_channel(id, &conn) {
                            s.failure.fail(e.context(format!("channel {id}")));
                        }
                    })
                    .map_err(|e| Error::new(ErrorCode::Io, format!("spawn channel thread: {e}")))?,
            );
            (failure.events())(Event::ChannelUp { id: id as u8 });
        }
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("multifd/dispatch".into())
                .spawn(move || s.run_dispatcher(rx))
                .map_err(|e| Error::new(ErrorCode::Io, format!("spawn dispatcher: {e}")))?,
        );
        Ok(Source { shared, conns: Mutex::new(watched), commands: Mutex::new(Some(tx)), threads: Mutex::new(threads), syncs: AtomicU64::new(0) })
    }

    fn command(&self, c: Command) -> Result<()> {
        match self.commands.lock().unwrap().as_ref() {
            Some(tx) if tx.send(c).is_ok() => Ok(()),
            _ => fail!(State, "the source is closed"),
        }
    }

    /// Queues the pages of `block` chosen by `selection`; `Event::Done { id }` follows when all
    /// are handed to channels (not yet written).
    pub fn send(&self, id: u32, block: Arc<RamBlock>, selection: Selection) -> Result<()> {
        if block.page_size() != self.shared.config.geometry.page_size() {
            fail!(InvalidArgument, "block {:?} has {}-byte pages, the session uses {}", block.name(), block.page_size(), self.shared.config.geometry.page_size());
        }
        self.command(Command::Send { id, block, selection })
    }

    /// Queues a SYNC on every channel after its queued work; `Event::Done { id, result: epoch }`
    /// follows when every channel has written it. Returns the epoch this sync will reach.
    pub fn sync(&self, id: u32) -> Result<u64> {
        self.command(Command::Sync { id })?;
        Ok(self.syncs.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Stops queuing: the dispatcher refuses new work (pending commands end with
    /// `ERR_MULTIFD_CANCELLED`) and each channel thread exits after the packet it is writing,
    /// leaving every stream at a packet boundary. Sockets stay open; `close` shuts them.
    pub fn stop_queuing(&self) {
        self.shared.stop();
    }

    pub fn stats(&self) -> Vec<Counters> {
        self.shared.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// Bytes written to the channels that the destination has not taken yet (still in this
    /// side's socket send queues: unsent or, for TCP, unacknowledged), all channels added up.
    /// Shrinking while a sync is awaited means the destination is still reading.
    pub fn unsent_bytes(&self) -> u64 {
        self.conns.lock().unwrap().iter().map(|c| send_queue(c.fd())).sum()
    }

    /// Changes `max_bandwidth` while the session runs (`None` lifts the limit). It applies to
    /// the next packet of every channel, including channels waiting for tokens now.
    pub fn set_max_bandwidth(&self, bytes_per_second: Option<u64>) -> Result<()> {
        self.shared.throttle.set_rate(bytes_per_second)
    }

    pub fn max_bandwidth(&self) -> Option<u64> {
        self.shared.throttle.rate()
    }

    /// Time the channels have spent waiting for the bandwidth limit, all channels added up.
    pub fn throttled(&self) -> Duration {
        self.shared.throttle.waited()
    }

    /// Stops every thread and joins it; with `shutdown`, also shuts the sockets down first
    /// (failure or cancel). Idempotent.
    pub fn close(&self, shutdown: bool) {
        self.commands.lock().unwrap().take();
        if shutdown {
            self.shared.failure.fail(Error::new(ErrorCode::Cancelled, "the source was closed"));
        }
        self.shared.stop();
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
        self.conns.lock().unwrap().clear();
        self.shared.failure.release_connections();
    }
}

/// Connects every channel at once, as QEMU does (one TLS handshake and round trip each, not
/// one after another): each connects, authenticates, sets its timeouts and sends its init
/// packet. The first failing channel (by id) fails the whole start; the others are closed.
fn connect_channels(config: &SourceConfig) -> Result<Vec<Conn>> {
    let open = |id: u8| -> Result<Conn> {
        let conn = Conn::connect_secure(&config.address, config.connect_timeout, config.tls.as_ref())?;
        if let Some(t) = config.peer_timeout {
            conn.set_peer_timeout(t)?;
        }
        if config.zero_copy {
            zerocopy::enable(conn.fd())?;
        }
        conn.write_all(&[&InitPacket { uuid: config.uuid, channel_id: id }.encode()])?;
        Ok(conn)
    };
    let results: Vec<Result<Conn>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..config.channels)
            .map(|id| std::thread::Builder::new().name(format!("multifd/connect/{id}")).spawn_scoped(scope, move || open(id)))
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| Err(Error::new(ErrorCode::Io, "a connect thread panicked"))),
                Err(e) => Err(Error::new(ErrorCode::Io, format!("spawn a connect thread: {e}"))),
            })
            .collect()
    });
    results.into_iter().enumerate().map(|(id, r)| r.map_err(|e| e.context(format!("channel {id}")))).collect()
}

/// Bytes in a socket's send queue (SIOCOUTQ); 0 when the socket cannot say.
fn send_queue(fd: std::os::fd::RawFd) -> u64 {
    let mut queued: libc::c_int = 0;
    // SAFETY: `fd` is a socket kept open by the `Arc<Conn>` the caller holds; SIOCOUTQ
    // (TIOCOUTQ) writes one int through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    if rc == 0 { u64::try_from(queued).unwrap_or(0) } else { 0 }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.close(false);
    }
}

impl Shared {
    fn stop(&self) {
        self.queues.lock().unwrap().stopping = true;
        self.work.iter().for_each(Condvar::notify_all);
        self.progress.notify_all();
        self.throttle.stop();
    }

    fn stopped_error(&self) -> Error {
        self.failure.first().unwrap_or_else(|| Error::new(ErrorCode::Cancelled, "the source is closing"))
    }

    fn run_dispatcher(&self, commands: mpsc::Receiver<Command>) {
        let events = self.failure.events().clone();
        while let Ok(cmd) = commands.recv() {
            match cmd {
                Command::Send { id, block, selection } => {
                    let result = self.dispatch_pages(&block, selection);
                    events(Event::Done { id, result });
                }
                Command::Sync { id } => {
                    let result = self.dispatch_sync();
                    events(Event::Done { id, result });
                }
            }
        }
    }

    /// Hands `job` to the next channel (round robin) whose queue has room.
    fn push(&self, job: Job) -> Result<()> {
        let n = self.work.len();
        let mut q = self.queues.lock().unwrap();
        loop {
            if q.stopping {
                return Err(self.stopped_error());
            }
            let start = q.cursor;
            if let Some(c) = (0..n).map(|i| (start + i) % n).find(|&c| q.jobs[c].len() < QUEUE_DEPTH) {
                q.jobs[c].push_back(job);
                q.cursor = (c + 1) % n;
                self.work[c].notify_one();
                return Ok(());
            }
            q = self.progress.wait(q).unwrap();
        }
    }

    fn dispatch_pages(&self, block: &Arc<RamBlock>, selection: Selection) -> Result<u64> {
        let page = u64::from(block.page_size());
        let per_packet = self.config.geometry.page_count() as usize;
        let mut batch = Vec::with_capacity(per_packet);
        let mut total = 0u64;
        let mut flush = |batch: &mut Vec<u64>| -> Result<()> {
            if !batch.is_empty() {
                total += batch.len() as u64;
                let offsets = std::mem::replace(batch, Vec::with_capacity(per_packet));
                self.push(Job::Pages { block: block.clone(), offsets })?;
            }
            Ok(())
        };
        let mut add_run = |first: u64, count: u64, batch: &mut Vec<u64>| -> Result<()> {
            for p in first..first + count {
                batch.push(p * page);
                if batch.len() == per_packet {
                    flush(batch)?;
                }
            }
            Ok(())
        };
        match selection {
            Selection::Whole => add_run(0, block.pages() as u64, &mut batch)?,
            Selection::Ranges(ranges) => {
                for (offset, len) in ranges {
                    if offset.checked_add(len).is_none_or(|end| end > block.len()) {
                        fail!(InvalidArgument, "range {offset}+{len} is outside block {:?} of {} bytes", block.name(), block.len());
                    }
                    if len > 0 {
                        let first = offset / page;
                        add_run(first, (offset + len).div_ceil(page) - first, &mut batch)?;
                    }
                }
            }
            Selection::Dirty => {
                for (first, count) in block.dirty.take().runs() {
                    add_run(first as u64, count as u64, &mut batch)?;
                }
            }
        }
        flush(&mut batch)?;
        Ok(total)
    }

    fn dispatch_sync(&self) -> Result<u64> {
        let mut q = self.queues.lock().unwrap();
        let target = q.synced.iter().copied().max().unwrap_or(0) + 1;
        for c in 0..self.work.len() {
            while q.jobs[c].len() >= QUEUE_DEPTH && !q.stopping {
                q = self.progress.wait(q).unwrap();
            }
            if q.stopping {
                return Err(self.stopped_error());
            }
            q.jobs[c].push_back(Job::Sync);
            self.work[c].notify_one();
        }
        while q.synced.iter().any(|&s| s < target) {
            if q.stopping {
                return Err(self.stopped_error());
            }
            q = self.progress.wait(q).unwrap();
        }
        Ok(target)
    }

    fn next_job(&self, id: usize) -> Option<Job> {
        let mut q = self.queues.lock().unwrap();
        loop {
            if q.stopping {
                return None;
            }
            if let Some(job) = q.jobs[id].pop_front() {
                self.progress.notify_one();
                return Some(job);
            }
            q = self.work[id].wait(q).unwrap();
        }
    }

    fn run_channel(&self, id: usize, conn: &Conn) -> Result<()> {
        let cfg = &self.config;
        let stats = &self.stats[id];
        ChannelStats::add(&stats.bytes, crate::wire::INIT_PACKET_LEN as u64);

        let g = cfg.geometry;
        let page = g.page_size() as usize;
        let mut wire = vec![0u8; g.header_len()];
        let mut header = PacketHeader::default();
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(g.page_count() as usize + 1);
        let mut zc = cfg.zero_copy.then(|| ZeroCopySender::new(conn.fd()));
        let mut compressor = crate::compress::compressor(cfg.compression, cfg.compression_level)?;
        let mut payload: Vec<u8> = Vec::new();
        // Compression input with a digest: one packet's normal pages, copied out of block memory.
        let mut staging: Vec<u8> = Vec::new();
        while let Some(job) = self.next_job(id) {
            match job {
                Job::Pages { block, offsets } => {
                    header.offsets.clear();
                    let mut zeros = Vec::new();
                    for &o in &offsets {
                        if cfg.zero_page_detection && block.is_zero_page(o) {
                            zeros.push(o);
                        } else {
                            header.offsets.push(o);
                        }
                    }
                    let normal = header.offsets.len() as u32;
                    header.offsets.extend_from_slice(&zeros);
                    header.flags = Flags(cfg.compression.wire_code());
                    header.pages_alloc = g.page_count();
                    header.normal_pages = normal;
                    header.zero_pages = zeros.len() as u32;
                    header.next_packet_size = normal * g.page_size();
                    let data = &header.offsets[..normal as usize];
                    let digest = match compressor.as_mut().filter(|_| normal > 0) {
                        Some(c) if cfg.integrity => {
                            // With a digest, compression reads a private copy of the pages and
                            // the digest is taken from the same copy, so it matches the payload.
                            staging.resize(data.len() * page, 0);
                            for (&o, dst) in data.iter().zip(staging.chunks_exact_mut(page)) {
                                block.memory().copy_to(o, dst);
                            }
                            c.compress(&crate::memory::ReadSource::slices(&[&staging]), &mut payload)?;
                            header.next_packet_size = payload.len() as u32;
                            crate::integrity::pages_digest(staging.chunks_exact(page))
                        }
                        Some(c) => {
                            // Otherwise it reads the pages where they are (see `crate::memory`).
                            iov.clear();
                            for &o in data {
                                block.push_page(&mut iov, 0, o);
                            }
                            // SAFETY: every iovec came from `push_page` on `block`, which this
                            // thread holds (an Arc in the job) until the call returns.
                            c.compress(&unsafe { crate::memory::ReadSource::pages(&iov) }, &mut payload)?;
                            header.next_packet_size = payload.len() as u32;
                            0
                        }
                        None if cfg.integrity => crate::integrity::block_pages_digest(&block, data),
                        None => 0,
                    };
                    header.digest = digest;
                    // A source file truncated under the scan or the copies above.
                    block.check_faults(true)?;
                    // Bandwidth limit: the whole packet, just before it is numbered and written.
                    // A stop while waiting ends the thread here, between packets.
                    if !self.throttle.acquire((wire.len() + header.next_packet_size as usize) as u64) {
                        return Ok(());
                    }
                    header.packet_num = self.packet_num.fetch_add(1, Ordering::Relaxed);
                    header.block.clear();
                    header.block.extend_from_slice(block.name().as_bytes());
                    header.encode_into(g, &mut wire)?;

                    iov.clear();
                    iov.push(iovec(wire.as_ptr(), wire.len()));
                    if compressor.is_some() {
                        if normal > 0 {
                            iov.push(iovec(payload.as_ptr(), payload.len()));
                        }
                        // SAFETY: both iovecs point into buffers this thread owns.
                        unsafe { conn.writev_all(&mut iov)? };
                        block.check_faults(true)?;
                        ChannelStats::add(&stats.bytes, (wire.len() + header.next_packet_size as usize) as u64);
                        ChannelStats::add(&stats.packets, 1);
                        ChannelStats::add(&stats.normal_pages, u64::from(normal));
                        ChannelStats::add(&stats.zero_pages, zeros.len() as u64);
                        continue;
                    }
                    // Contiguous pages share one iovec (never the header's).
                    for &o in header.normal_offsets() {
                        block.push_page(&mut iov, 1, o);
                    }
                    match zc.as_mut() {
                        Some(zc) => {
                            // SAFETY: every page iovec came from `push_page` on `block`, which the
                            // sender keeps alive until the kernel reports the send complete.
                            if let Some(Notice::FellBack(w)) = unsafe { zc.send(&wire, &mut iov[1..], &block, stats).map_err(|e| block.explain(e, true))? } {
                                (self.failure.events())(Event::Warning(w.context(format!("channel {id}"))));
                            }
                        }
                        // SAFETY: the header buffer is ours; every page iovec came from
                        // `push_page` (bounds-checked) on a block this job holds an Arc to.
                        None => unsafe { conn.writev_all(&mut iov).map_err(|e| block.explain(e, true))? },
                    }
                    // TLS copies the pages in user space: a truncated file shows up here.
                    block.check_faults(true)?;
                    ChannelStats::add(&stats.bytes, (wire.len() + normal as usize * page) as u64);
                    ChannelStats::add(&stats.packets, 1);
                    ChannelStats::add(&stats.normal_pages, u64::from(normal));
                    ChannelStats::add(&stats.zero_pages, zeros.len() as u64);
                }
                Job::Sync => {
                    if !self.throttle.acquire(wire.len() as u64) {
                        return Ok(());
                    }
                    let sync = PacketHeader::sync(self.packet_num.fetch_add(1, Ordering::Relaxed));
                    sync.encode_into(g, &mut wire)?;
                    conn.write_all(&[&wire])?;
                    if let Some(zc) = zc.as_mut() {
                        zc.flush(stats, || self.queues.lock().unwrap().stopping)?;
                    }
                    ChannelStats::add(&stats.bytes, wire.len() as u64);
                    ChannelStats::add(&stats.syncs, 1);
                    let mut q = self.queues.lock().unwrap();
                    q.synced[id] += 1;
                    self.progress.notify_all();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes `packet`-byte packets from `threads` threads until `total` bytes went; returns the
    /// elapsed time.
    fn drain(t: &Arc<Throttle>, threads: usize, total: u64, packet: u64) -> Duration {
        let started = Instant::now();
        let left = Arc::new(AtomicU64::new(total));
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let (t, left) = (t.clone(), left.clone());
                std::thread::spawn(move || {
                    while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(packet)).is_ok() {
                        assert!(t.acquire(packet));
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        started.elapsed()
    }

    #[test]
    fn unlimited_never_waits() {
        let t = Arc::new(Throttle::new(None).unwrap());
        assert!(drain(&t, 4, 1 << 30, 1 << 19) < Duration::from_millis(500));
        assert_eq!(t.waited(), Duration::ZERO);
    }

    #[test]
    fn shared_bucket_holds_the_rate_across_threads() {
        // 8 MB/s shared by 4 threads: 4 MB beyond the 0.8 MB burst take about 0.4 s.
        let rate = 8_000_000;
        let t = Arc::new(Throttle::new(Some(rate)).unwrap());
        let took = drain(&t, 4, 4_000_000, 100_000);
        let expected = (4_000_000.0 - Bucket::capacity(rate)) / rate as f64;
        assert!(took.as_secs_f64() >= expected * 0.9, "{took:?} < {expected} s");
        assert!(took.as_secs_f64() < expected * 3.0 + 0.2, "{took:?} far above {expected} s");
        assert!(t.waited() > Duration::ZERO);
    }

    #[test]
    fn a_new_rate_applies_to_waiting_channels() {
        // 1 KB/s: a 1 MB packet puts the bucket 1000 s into debt; lifting the limit releases it.
        let t = Arc::new(Throttle::new(Some(1000)).unwrap());
        assert!(t.acquire(1_000_000));
        let waiter = {
            let t = t.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                assert!(t.acquire(1000));
                started.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        t.set_rate(None).unwrap();
        assert!(waiter.join().unwrap() < Duration::from_secs(5));
        // A higher rate keeps at most one window of debt: 100 ms at 10 MB/s.
        t.set_rate(Some(1000)).unwrap();
        assert!(t.acquire(1_000_000));
        t.set_rate(Some(10_000_000)).unwrap();
        let started = Instant::now();
        assert!(t.acquire(1));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(t.rate(), Some(10_000_000));
    }

    #[test]
    fn stop_releases_waiters_without_granting() {
        let t = Arc::new(Throttle::new(Some(1)).unwrap());
        assert!(t.acquire(1 << 20));
        let waiter = {
            let t = t.clone();
            std::thread::spawn(move || t.acquire(1))
        };
        std::thread::sleep(Duration::from_millis(20));
        t.stop();
        assert!(!waiter.join().unwrap());
        assert!(!t.acquire(1));
    }

    #[test]
    fn zero_is_not_a_rate() {
        assert_eq!(Throttle::new(Some(0)).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(Throttle::new(None).unwrap().set_rate(Some(0)).unwrap_err().code, ErrorCode::InvalidArgument);
    }
}
