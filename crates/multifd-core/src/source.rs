//! The source data plane: N channel threads, each with its own connection, fed packet-sized
//! batches of pages by a dispatcher that hands each batch to the next channel with room.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::block::RamBlock;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::io::iovec;
use crate::limits::{SourceChoices, check_source, millis};
use crate::session::{ChannelStats, Counters, Event, Failure};
use crate::throttle::Throttle;
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
    /// A level in the method's range (`compress::METHODS`); `None` for its default.
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
    /// Redials of a connection that breaks mid-session (`limits::CHANNEL_RETRIES`); 0 fails at
    /// once. This branch applies it to the control connection (`control_link`).
    pub channel_retries: u32,
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
        // Every limit and rule, as the TypeScript and CLI layers apply them (`limits`), before
        // any connection is made.
        check_source(&SourceChoices {
            channels: u32::from(config.channels),
            compression: config.compression.name(),
            compression_level: config.compression_level,
            zero_copy: config.zero_copy,
            tls: config.tls.is_some(),
            unix: matches!(config.address, Address::Unix(_)),
            connect_timeout_ms: millis(config.connect_timeout),
            peer_timeout_ms: config.peer_timeout.map(millis),
            max_bandwidth: config.max_bandwidth,
        })?;
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
