//! The source data plane: N channel threads, each with its own connection, fed packet-sized
//! batches of pages by a dispatcher that hands each batch to the next channel with room.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::block::RamBlock;
use crate::compress::Compressor;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::integrity::{PageDigests, SessionDigests};
use crate::io::iovec;
use crate::journal::{Entry, Journal};
use crate::limits::{SourceChoices, check_source, millis};
use crate::session::{ChannelState, ChannelStats, Counters, Event, Failure, Recovery};
use crate::throttle::Throttle;
use crate::tls::TlsClient;
use crate::transport::{Address, Conn};
use crate::wire::{Compression, Flags, Geometry, InitPacket, PacketHeader, REPLACEMENT_ACK, Replacement};
use crate::zerocopy::{self, Notice, ZeroCopySender};

/// The first wait before a redial; each next one doubles, up to [`MAX_REDIAL_WAIT`].
const FIRST_REDIAL_WAIT: Duration = Duration::from_millis(50);
const MAX_REDIAL_WAIT: Duration = Duration::from_secs(2);

/// Packets waiting per channel, so no channel idles while the dispatcher finds its next batches.
/// Few, so the channels finish a send together (a fuller queue is a longer tail).
const QUEUE_DEPTH: usize = 4;
/// A channel wakes a waiting dispatcher only once its queue is down to this many jobs, so the
/// dispatcher refills several slots per wake-up instead of one per packet (each wake-up is a
/// futex call and, on few cores, a context switch on both sides).
const REFILL_AT: usize = QUEUE_DEPTH / 2;

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
    /// Redials of a channel whose connection broke (see `limits::CHANNEL_RETRIES`); 0 fails
    /// the session at the first connection fault.
    pub channel_retries: u32,
    /// Channels that must stay: a channel that cannot be redialled is given up (the session
    /// goes on without it) only while more than this many remain; otherwise the session fails.
    pub min_channels: u8,
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
    /// Page runs `(first page, count)` a given-up channel owed, sent as packets.
    Runs { block: Arc<RamBlock>, runs: Vec<(u64, u64)> },
    Sync { epoch: u64 },
}

struct Queues {
    jobs: Vec<VecDeque<Job>>,
    synced: Vec<u64>,
    /// Per channel: the watcher saw its connection break while the channel thread did not.
    broken: Vec<bool>,
    /// Per channel: given up (it could not be redialled); nothing is queued for it any more.
    dropped: Vec<bool>,
    /// The last sync epoch queued (the orchestrator's and the internal ones after a drop).
    dispatched: u64,
    cursor: usize,
    stopping: bool,
    /// The dispatcher waits on `progress` for queue room (not for sync progress).
    dispatcher_waiting: bool,
    /// Per channel: its thread waits on `work[c]` for a job.
    idle: Vec<bool>,
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
    /// Each channel's current connection (replaced on recovery). Lock order: `links`, then
    /// `queues`.
    links: Mutex<Vec<Arc<Conn>>>,
    /// Per channel: what it wrote since the last acknowledged SYNC.
    journals: Vec<Mutex<Journal>>,
    /// Wakes the connection watcher (a stop, or a connection replaced); let go of by `close`.
    wake_watcher: Mutex<Option<UnixStream>>,
    /// Everything is delivered and `complete` is on its way: the destination closes the
    /// channels now, which is no fault.
    completing: AtomicBool,
    /// What the orchestrator may be told was acknowledged (see [`Source::acked`]).
    acks: Mutex<Acks>,
    /// Syncs queued by the source itself (one after each dropped channel).
    internal_syncs: AtomicU64,
    /// With integrity: the digest of every page as it was sent, from source memory.
    digests: Option<Arc<SessionDigests>>,
}

/// Acknowledgements that prove delivery. After a channel is given up, the pages it owed go
/// out on the other channels, possibly after SYNCs already written: acknowledgements up to
/// `held_until` do not cover them, the one of the SYNC queued after them does.
#[derive(Default)]
struct Acks {
    held_until: u64,
    effective: u64,
}

enum Command {
    Send { id: u32, block: Arc<RamBlock>, selection: Selection },
    Sync { id: u32 },
}

/// A running set of source channels.
pub struct Source {
    shared: Arc<Shared>,
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
            channel_retries: config.channel_retries,
            min_channels: u32::from(config.min_channels),
        })?;
        let throttle = Throttle::new(config.max_bandwidth)?;
        let n = config.channels as usize;
        let (wake_watcher, watcher_end) = UnixStream::pair().map_err(|e| crate::error::os_error("create the watcher's wake socket", e))?;
        for end in [&wake_watcher, &watcher_end] {
            end.set_nonblocking(true).map_err(|e| crate::error::os_error("create the watcher's wake socket", e))?;
        }
        let conns: Vec<Arc<Conn>> = connect_channels(&config)?.into_iter().map(Arc::new).collect();
        for conn in &conns {
            failure.watch(conn.clone());
        }
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues { jobs: (0..n).map(|_| VecDeque::new()).collect(), synced: vec![0; n], broken: vec![false; n], dropped: vec![false; n], dispatched: 0, cursor: 0, stopping: false, dispatcher_waiting: false, idle: vec![false; n] }),
            links: Mutex::new(conns.clone()),
            journals: (0..n).map(|_| Mutex::new(Journal::default())).collect(),
            wake_watcher: Mutex::new(Some(wake_watcher)),
            completing: AtomicBool::new(false),
            acks: Mutex::new(Acks::default()),
            internal_syncs: AtomicU64::new(0),
            digests: config.integrity.then(Arc::default),
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
        let mut threads = Vec::with_capacity(n + 2);
        for (id, conn) in conns.into_iter().enumerate() {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("multifd/send/{id}"))
                    .spawn(move || {
                        if let Err(e) = s.run_channel(id, conn) {
                            s.failure.fail(e.context(format!("channel {id}")));
                        }
                    })
                    .map_err(|e| Error::new(ErrorCode::Io, format!("spawn channel thread: {e}")))?,
            );
            (failure.events())(Event::ChannelUp { id: id as u8 });
        }
        // Not with zero-copy: its completions arrive on the socket's error queue, which poll
        // reports as POLLERR whatever it is asked; a zero-copy channel notices a broken
        // connection at its next write instead.
        if shared.config.channel_retries > 0 && !shared.config.zero_copy {
            let s = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("multifd/watch".into())
                    .spawn(move || s.watch_connections(&watcher_end))
                    .map_err(|e| Error::new(ErrorCode::Io, format!("spawn the connection watcher: {e}")))?,
            );
        }
        let (tx, rx) = mpsc::channel();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("multifd/dispatch".into())
                .spawn(move || s.run_dispatcher(rx))
                .map_err(|e| Error::new(ErrorCode::Io, format!("spawn dispatcher: {e}")))?,
        );
        Ok(Source { shared, commands: Mutex::new(Some(tx)), threads: Mutex::new(threads), syncs: AtomicU64::new(0) })
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
        if let Some(all) = &self.shared.digests {
            // Made here (8 bytes a page), not by the first channel thread that writes a page.
            all.block(&block);
        }
        self.command(Command::Send { id, block, selection })
    }

    /// With integrity, the digests of the pages as they were sent (for the block digests at
    /// completion, [`SessionDigests::block_digest`] with each block's dirty bitmap as `stale`).
    pub fn page_digests(&self) -> Option<Arc<SessionDigests>> {
        self.shared.digests.clone()
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
        self.shared.links.lock().unwrap().iter().map(|c| send_queue(c.fd())).sum()
    }

    /// The last sync is acknowledged and `complete` goes out: from now on the destination
    /// closing a channel is the migration ending, not a fault to repair.
    pub fn completing(&self) {
        self.shared.completing.store(true, Ordering::Release);
        self.shared.wake_watcher();
    }

    /// The destination acknowledged sync `epoch`: every channel forgets what it wrote up to it.
    /// Returns the epoch up to which every page queued is now delivered: `epoch`, or less
    /// while the pages of a given-up channel are still on their way (the acknowledgement of
    /// the sync queued after them covers everything before).
    pub fn acked(&self, epoch: u64) -> u64 {
        for j in &self.shared.journals {
            j.lock().unwrap().acked(epoch);
        }
        let mut a = self.shared.acks.lock().unwrap();
        if epoch > a.held_until {
            a.effective = a.effective.max(epoch);
        }
        a.effective
    }

    /// Syncs the source queued itself so far (one after each given-up channel); the session's
    /// ledger counts them with the orchestrator's.
    pub fn internal_syncs(&self) -> u64 {
        self.shared.internal_syncs.load(Ordering::Acquire)
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
        self.shared.links.lock().unwrap().clear();
        self.shared.wake_watcher.lock().unwrap().take();
        self.shared.failure.release_connections();
    }
}

/// Connects every channel at once, as QEMU does (one TLS handshake and round trip each, not
/// one after another): each connects, authenticates, sets its timeouts and sends its init
/// packet. The first failing channel (by id) fails the whole start; the others are closed.
fn connect_channels(config: &SourceConfig) -> Result<Vec<Conn>> {
    let open = |id: u8| open_channel(config, id, None);
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

/// Opens channel `id`'s connection: connect (and TLS), timeouts, zero-copy, init packet. A
/// replacement carries the marker and waits (within the connect timeout) for the
/// destination's acknowledgement that it took the old connection's place.
fn open_channel(config: &SourceConfig, id: u8, replacing: Option<Replacement>) -> Result<Conn> {
    let conn = Conn::connect_secure(&config.address, config.connect_timeout, config.tls.as_ref())?;
    if config.zero_copy {
        zerocopy::enable(conn.fd())?;
    }
    let init = InitPacket { uuid: config.uuid, channel_id: id };
    match replacing {
        None => conn.write_all(&[&init.encode()])?,
        Some(r) => {
            conn.set_read_timeout(Some(config.connect_timeout))?;
            conn.set_write_timeout(Some(config.connect_timeout))?;
            conn.write_all(&[&r.encode(&init)])?;
            let mut ack = [0u8; REPLACEMENT_ACK.len()];
            if !conn.read_exact(&mut ack)? {
                fail!(ConnectionClosed, "the destination closed the replacement connection before taking it");
            }
            if ack != REPLACEMENT_ACK {
                fail!(Protocol, "the destination answered a replacement connection with {ack:02x?}");
            }
            conn.set_read_timeout(None)?;
            conn.set_write_timeout(None)?;
        }
    }
    if let Some(t) = config.peer_timeout {
        conn.set_peer_timeout(t)?;
    }
    Ok(conn)
}

/// A fault of the connection itself (reset, closed, timed out), which a replacement repairs.
fn is_connection_fault(e: &Error) -> bool {
    matches!(e.code, ErrorCode::ConnectionClosed | ErrorCode::Timeout)
}

/// A redial that failed in a way another redial may not (connect refused, reset, timed out).
fn may_redial(e: &Error) -> bool {
    is_connection_fault(e) || e.code == ErrorCode::Io
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

/// One channel's connection and its write state, kept across replacements.
struct Writer {
    id: usize,
    conn: Arc<Conn>,
    wire: Vec<u8>,
    header: PacketHeader,
    iov: Vec<libc::iovec>,
    zc: Option<ZeroCopySender>,
    compressor: Option<Box<dyn Compressor>>,
    payload: Vec<u8>,
    /// Compression input with a digest: one packet's normal pages, copied out of block memory.
    staging: Vec<u8>,
    /// A compressed packet's payload as iovecs: `payload`, spliced with the pages a method
    /// sends as they are (`compress::Payload`).
    body: Vec<libc::iovec>,
    /// With integrity: each data page's digest in the packet being written.
    each: Vec<u64>,
    /// The page digests of the block last written (see [`SessionDigests::block`]).
    digests: Option<(Arc<RamBlock>, Arc<PageDigests>)>,
}

/// Whether a write went out or the source stopped first (between packets).
#[derive(PartialEq, Eq)]
enum Wrote {
    Yes,
    Stopped,
}

impl Shared {
    fn stop(&self) {
        self.queues.lock().unwrap().stopping = true;
        self.work.iter().for_each(Condvar::notify_all);
        self.progress.notify_all();
        self.throttle.stop();
        self.wake_watcher();
    }

    fn wake_watcher(&self) {
        if let Some(w) = self.wake_watcher.lock().unwrap().as_ref() {
            let _ = (&*w).write(&[1]);
        }
    }

    fn stopping(&self) -> bool {
        self.queues.lock().unwrap().stopping
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
            if let Some(c) = (0..n).map(|i| (start + i) % n).find(|&c| !q.dropped[c] && q.jobs[c].len() < QUEUE_DEPTH) {
                q.jobs[c].push_back(job);
                q.cursor = (c + 1) % n;
                if q.idle[c] {
                    self.work[c].notify_one();
                }
                return Ok(());
            }
            q = self.wait_for_room(q);
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
        q.dispatched += 1;
        let target = q.dispatched;
        for c in 0..self.work.len() {
            while q.jobs[c].len() >= QUEUE_DEPTH && !q.stopping && !q.dropped[c] {
                q = self.wait_for_room(q);
            }
            if q.stopping {
                return Err(self.stopped_error());
            }
            if q.dropped[c] {
                continue;
            }
            q.jobs[c].push_back(Job::Sync { epoch: target });
            self.work[c].notify_one();
        }
        while q.synced.iter().zip(&q.dropped).any(|(&s, &dropped)| !dropped && s < target) {
            if q.stopping {
                return Err(self.stopped_error());
            }
            q = self.progress.wait(q).unwrap();
        }
        Ok(target)
    }

    /// The channel's next job; `None` once stopping; an error when the watcher saw the
    /// channel's connection break.
    fn next_job(&self, id: usize) -> Result<Option<Job>> {
        let mut q = self.queues.lock().unwrap();
        loop {
            if q.stopping {
                return Ok(None);
            }
            if q.broken[id] {
                fail!(ConnectionClosed, "the destination's end of the connection closed or reset");
            }
            if let Some(job) = q.jobs[id].pop_front() {
                if q.dispatcher_waiting && q.jobs[id].len() <= REFILL_AT {
                    self.progress.notify_one();
                }
                return Ok(Some(job));
            }
            q.idle[id] = true;
            q = self.work[id].wait(q).unwrap();
            q.idle[id] = false;
        }
    }

    /// The dispatcher's wait for a channel to take jobs off its full queue (see [`REFILL_AT`]);
    /// `stop` and `give_up` wake it too.
    fn wait_for_room<'a>(&self, mut q: MutexGuard<'a, Queues>) -> MutexGuard<'a, Queues> {
        q.dispatcher_waiting = true;
        q = self.progress.wait(q).unwrap();
        q.dispatcher_waiting = false;
        q
    }

    fn run_channel(&self, id: usize, conn: Arc<Conn>) -> Result<()> {
        let cfg = &self.config;
        ChannelStats::add(&self.stats[id].bytes, crate::wire::INIT_PACKET_LEN as u64);
        let mut w = Writer {
            id,
            zc: cfg.zero_copy.then(|| ZeroCopySender::new(conn.fd())),
            conn,
            wire: vec![0u8; cfg.geometry.header_len()],
            header: PacketHeader::default(),
            iov: Vec::with_capacity(cfg.geometry.page_count() as usize + 1),
            compressor: crate::compress::compressor(cfg.compression, cfg.compression_level)?,
            payload: Vec::new(),
            staging: Vec::new(),
            body: Vec::new(),
            each: Vec::new(),
            digests: None,
        };
        loop {
            match self.pump(&mut w) {
                Ok(()) => return Ok(()),
                Err(cause) if self.recoverable(&cause) => {
                    if self.recover(&mut w, cause)? == Wrote::Stopped {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A connection fault this channel repairs itself: never while the session is failing or
    /// stopping, never with `channel_retries` 0.
    fn recoverable(&self, e: &Error) -> bool {
        self.config.channel_retries > 0 && is_connection_fault(e) && !self.completing.load(Ordering::Acquire) && !self.failure.is_failed() && !self.stopping()
    }

    /// Writes the channel's jobs until the source stops, journaling each before it goes out
    /// (unless nothing is ever sent again: `channel_retries` 0).
    fn pump(&self, w: &mut Writer) -> Result<()> {
        let page = u64::from(self.config.geometry.page_size());
        let journal = (self.config.channel_retries > 0).then_some(&self.journals[w.id]);
        while let Some(job) = self.next_job(w.id)? {
            let wrote = match job {
                Job::Pages { block, offsets } => {
                    if let Some(j) = journal {
                        j.lock().unwrap().pages(&block, &offsets, page);
                    }
                    self.write_pages(w, &block, &offsets)?
                }
                Job::Runs { block, runs } => self.write_runs(w, &block, &runs, journal)?,
                Job::Sync { epoch } => {
                    if let Some(j) = journal {
                        j.lock().unwrap().sync(epoch);
                    }
                    self.write_sync(w, epoch)?
                }
            };
            if wrote == Wrote::Stopped {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Replaces channel `w.id`'s broken connection: redial with backoff, the replacement marker,
    /// the destination's acknowledgement, then everything written since the last acknowledged
    /// SYNC again (the pages' current contents). Gives up with `cause` after the retries.
    fn recover(&self, w: &mut Writer, cause: Error) -> Result<Wrote> {
        let id = w.id;
        let noticed = Instant::now();
        self.stats[id].set_state(ChannelState::Recovering);
        w.conn.shutdown();
        let mut wait = FIRST_REDIAL_WAIT;
        let mut last = cause.clone();
        for _ in 0..self.config.channel_retries {
            if !self.pause(id, wait) {
                return Ok(Wrote::Stopped);
            }
            wait = (wait * 2).min(MAX_REDIAL_WAIT);
            let (marker, entries) = {
                let j = self.journals[id].lock().unwrap();
                (Replacement { acked_epoch: j.acked_epoch(), pages_resent: j.page_count() }, j.entries())
            };
            let conn = match open_channel(&self.config, id as u8, Some(marker)) {
                Ok(c) => Arc::new(c),
                Err(e) if may_redial(&e) => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.install(w, conn)?;
            ChannelStats::add(&self.stats[id].bytes, crate::wire::INIT_PACKET_LEN as u64);
            (self.failure.events())(Event::Recovered(Recovery {
                connection: Some(id as u8),
                cause: cause.clone().context(format!("channel {id}")),
                pages_resent: marker.pages_resent,
                took: noticed.elapsed(),
            }));
            match self.resend(w, &entries) {
                Ok(wrote) => return Ok(wrote),
                Err(e) if self.recoverable(&e) => {
                    self.stats[id].set_state(ChannelState::Recovering);
                    w.conn.shutdown();
                    last = e;
                }
                Err(e) => return Err(e),
            }
        }
        self.stats[id].set_state(ChannelState::Lost);
        let gave_up = cause.context(format!("gave up after {} redial(s), the last failing with {}", self.config.channel_retries, last));
        if self.give_up(id, &gave_up) {
            return Ok(Wrote::Stopped);
        }
        Err(gave_up)
    }

    /// Goes on without channel `id`, unless that leaves fewer than `min_channels`: nothing is
    /// queued for it any more, what it owed (its journal and queue) is queued on the others
    /// ahead of their SYNCs, and one more SYNC after it on every other channel proves it
    /// delivered (acknowledgements before that one are held back, see [`Source::acked`]).
    /// The orchestrator hears `ChannelDropped` (it tells the destination) and a warning.
    fn give_up(&self, id: usize, why: &Error) -> bool {
        let mut q = self.queues.lock().unwrap();
        let live: Vec<usize> = (0..self.work.len()).filter(|&c| c != id && !q.dropped[c]).collect();
        if live.len() < usize::from(self.config.min_channels.max(1)) || q.stopping || self.failure.is_failed() || self.completing.load(Ordering::Acquire) {
            return false;
        }
        q.dropped[id] = true;
        let journal = std::mem::take(&mut *self.journals[id].lock().unwrap());
        let mut owed: Vec<Job> = journal
            .entries()
            .into_iter()
            .filter_map(|e| match e {
                Entry::Pages { block, runs, .. } => Some(Job::Runs { block, runs }),
                Entry::Sync { .. } => None,
            })
            .collect();
        owed.extend(q.jobs[id].drain(..).filter(|j| !matches!(j, Job::Sync { .. })));
        for (i, job) in owed.into_iter().enumerate() {
            let c = live[i % live.len()];
            let at = q.jobs[c].iter().position(|j| matches!(j, Job::Sync { .. })).unwrap_or(q.jobs[c].len());
            q.jobs[c].insert(at, job);
        }
        q.dispatched += 1;
        let proof = q.dispatched;
        self.acks.lock().unwrap().held_until = proof - 1;
        self.internal_syncs.fetch_add(1, Ordering::AcqRel);
        for &c in &live {
            q.jobs[c].push_back(Job::Sync { epoch: proof });
            self.work[c].notify_one();
        }
        drop(q);
        self.progress.notify_all();
        let events = self.failure.events();
        events(Event::Warning(why.clone().context(format!("channel {id} is given up, the migration goes on with {} of {} channels", live.len(), self.work.len()))));
        events(Event::ChannelDropped { id: id as u8 });
        true
    }

    /// Waits `d` before a redial; false when the source stops meanwhile.
    fn pause(&self, id: usize, d: Duration) -> bool {
        let until = Instant::now() + d;
        let mut q = self.queues.lock().unwrap();
        loop {
            let now = Instant::now();
            if q.stopping || self.failure.is_failed() {
                return false;
            }
            if now >= until {
                return true;
            }
            q = self.work[id].wait_timeout(q, until - now).unwrap().0;
        }
    }

    /// Puts `conn` in place of the channel's broken connection, for every later write, a
    /// failure's shutdown and the watcher.
    fn install(&self, w: &mut Writer, conn: Arc<Conn>) -> Result<()> {
        self.failure.swap(&w.conn, conn.clone());
        let mut links = self.links.lock().unwrap();
        links[w.id] = conn.clone();
        self.queues.lock().unwrap().broken[w.id] = false;
        drop(links);
        if w.zc.is_some() {
            w.zc = Some(ZeroCopySender::new(conn.fd()));
        }
        w.conn = conn;
        // A compression stream spans a connection's packets: the replacement starts a new one,
        // as the destination's new receive loop does.
        w.compressor = crate::compress::compressor(self.config.compression, self.config.compression_level)?;
        self.stats[w.id].set_state(ChannelState::Up);
        self.wake_watcher();
        Ok(())
    }

    /// Writes a journal again on a replacement connection, in order: pages (their current
    /// contents, treated as any page) in packets, and SYNCs.
    fn resend(&self, w: &mut Writer, entries: &[Entry]) -> Result<Wrote> {
        for e in entries {
            match e {
                Entry::Pages { block, runs, .. } => {
                    if self.write_runs(w, block, runs, None)? == Wrote::Stopped {
                        return Ok(Wrote::Stopped);
                    }
                }
                Entry::Sync { epoch } => {
                    if self.write_sync(w, *epoch)? == Wrote::Stopped {
                        return Ok(Wrote::Stopped);
                    }
                }
            }
        }
        Ok(Wrote::Yes)
    }

    /// Writes page runs of `block` as packets, journaling each packet first when `journal`.
    fn write_runs(&self, w: &mut Writer, block: &Arc<RamBlock>, runs: &[(u64, u64)], journal: Option<&Mutex<Journal>>) -> Result<Wrote> {
        let page = u64::from(self.config.geometry.page_size());
        let per_packet = self.config.geometry.page_count() as usize;
        let mut batch = Vec::with_capacity(per_packet);
        let pages = runs.iter().flat_map(|&(first, count)| first..first + count);
        let mut pages = pages.peekable();
        while pages.peek().is_some() {
            batch.clear();
            batch.extend(pages.by_ref().take(per_packet).map(|p| p * page));
            if let Some(j) = journal {
                j.lock().unwrap().pages(block, &batch, page);
            }
            if self.write_pages(w, block, &batch)? == Wrote::Stopped {
                return Ok(Wrote::Stopped);
            }
        }
        Ok(Wrote::Yes)
    }

    /// Writes one packet of `block`'s pages at `offsets`.
    fn write_pages(&self, w: &mut Writer, block: &Arc<RamBlock>, offsets: &[u64]) -> Result<Wrote> {
        let cfg = &self.config;
        let (id, stats) = (w.id, &self.stats[w.id]);
        let g = cfg.geometry;
        let page = g.page_size() as usize;
        let Writer { conn, wire, header, iov, zc, compressor, payload, staging, body, each, digests, .. } = w;
        header.offsets.clear();
        let mut zeros = Vec::new();
        for &o in offsets {
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
                // With a digest, compression reads a private copy of the pages and the digest
                // is taken from the same copy, so it matches the payload.
                staging.resize(data.len() * page, 0);
                for (&o, dst) in data.iter().zip(staging.chunks_exact_mut(page)) {
                    block.memory().copy_to(o, dst);
                }
                let copy = [staging.as_slice()];
                let pages = crate::memory::ReadSource::slices(&copy);
                let p = c.compress(&pages, payload)?;
                header.next_packet_size = p.len(payload) as u32;
                body.clear();
                p.push_iovecs(payload, &pages, body, 0);
                crate::integrity::pages_digest(staging.chunks_exact(page), each)
            }
            Some(c) => {
                // Otherwise it reads the pages where they are (see `crate::memory`).
                iov.clear();
                for &o in data {
                    block.push_page(iov, 0, o);
                }
                // SAFETY: every iovec came from `push_page` on `block`, which the caller holds
                // (an Arc in the job or the journal) until the call returns.
                let pages = unsafe { crate::memory::ReadSource::pages(iov) };
                let p = c.compress(&pages, payload)?;
                header.next_packet_size = p.len(payload) as u32;
                body.clear();
                p.push_iovecs(payload, &pages, body, 0);
                0
            }
            None if cfg.integrity => crate::integrity::block_pages_digest(block, data, each),
            None => 0,
        };
        header.digest = digest;
        if let Some(all) = &self.digests {
            // Every page's digest as sent, from this read of source memory; the zero pages' too.
            let d = match digests {
                Some((b, d)) if Arc::ptr_eq(b, block) => d,
                _ => &digests.insert((block.clone(), all.block(block))).1,
            };
            d.record(data, each);
            d.record_zero(&header.offsets[normal as usize..]);
        }
        // A source file truncated under the scan or the copies above.
        block.check_faults(true)?;
        // Bandwidth limit: the whole packet, just before it is numbered and written. A stop
        // while waiting ends the thread here, between packets.
        if !self.throttle.acquire((wire.len() + header.next_packet_size as usize) as u64) {
            return Ok(Wrote::Stopped);
        }
        header.packet_num = self.packet_num.fetch_add(1, Ordering::Relaxed);
        header.block.clear();
        header.block.extend_from_slice(block.name().as_bytes());
        header.encode_into(g, wire)?;

        iov.clear();
        iov.push(iovec(wire.as_ptr(), wire.len()));
        if compressor.is_some() {
            if normal > 0 {
                iov.extend_from_slice(body);
            }
            // SAFETY: the iovecs point into buffers this thread owns and, for pages a
            // compressor sends as they are, into `block` (bounds-checked by `push_page`),
            // which the caller holds.
            unsafe { conn.writev_all(iov).map_err(|e| block.explain(e, true))? };
            block.check_faults(true)?;
            ChannelStats::add(&stats.bytes, (wire.len() + header.next_packet_size as usize) as u64);
        } else {
            // Contiguous pages share one iovec (never the header's).
            for &o in header.normal_offsets() {
                block.push_page(iov, 1, o);
            }
            match zc.as_mut() {
                Some(zc) => {
                    // SAFETY: every page iovec came from `push_page` on `block`, which the
                    // sender keeps alive until the kernel reports the send complete.
                    if let Some(Notice::FellBack(w)) = unsafe { zc.send(wire, &mut iov[1..], block, stats).map_err(|e| block.explain(e, true))? } {
                        (self.failure.events())(Event::Warning(w.context(format!("channel {id}"))));
                    }
                }
                // SAFETY: the header buffer is ours; every page iovec came from `push_page`
                // (bounds-checked) on a block the caller holds an Arc to.
                None => unsafe { conn.writev_all(iov).map_err(|e| block.explain(e, true))? },
            }
            // TLS copies the pages in user space: a truncated file shows up here.
            block.check_faults(true)?;
            ChannelStats::add(&stats.bytes, (wire.len() + normal as usize * page) as u64);
        }
        ChannelStats::add(&stats.packets, 1);
        ChannelStats::add(&stats.normal_pages, u64::from(normal));
        ChannelStats::add(&stats.zero_pages, zeros.len() as u64);
        Ok(Wrote::Yes)
    }

    /// Writes SYNC `epoch` and counts it (once, however often it is written).
    fn write_sync(&self, w: &mut Writer, epoch: u64) -> Result<Wrote> {
        let stats = &self.stats[w.id];
        if !self.throttle.acquire(w.wire.len() as u64) {
            return Ok(Wrote::Stopped);
        }
        let sync = PacketHeader::sync(self.packet_num.fetch_add(1, Ordering::Relaxed));
        sync.encode_into(self.config.geometry, &mut w.wire)?;
        w.conn.write_all(&[&w.wire])?;
        if let Some(zc) = w.zc.as_mut() {
            zc.flush(stats, || self.queues.lock().unwrap().stopping)?;
        }
        // A SYNC is a packet on the wire, as the destination counts it.
        ChannelStats::add(&stats.bytes, w.wire.len() as u64);
        ChannelStats::add(&stats.packets, 1);
        let mut q = self.queues.lock().unwrap();
        if q.synced[w.id] < epoch {
            q.synced[w.id] = epoch;
            ChannelStats::add(&stats.syncs, 1);
            self.progress.notify_all();
        }
        Ok(Wrote::Yes)
    }

    /// Notices a channel connection that broke while its thread does not write (the
    /// destination never writes on a channel, so a hang-up, a reset or an end of stream from
    /// it is a fault): shuts it down and wakes the thread, which then recovers. Runs until
    /// the source stops.
    fn watch_connections(&self, wake: &UnixStream) {
        loop {
            if self.stopping() || self.completing.load(Ordering::Acquire) {
                return;
            }
            let watched: Vec<(usize, Arc<Conn>)> = {
                let links = self.links.lock().unwrap();
                let q = self.queues.lock().unwrap();
                links.iter().enumerate().filter(|(i, _)| !q.broken[*i] && self.stats[*i].state() == ChannelState::Up).map(|(i, c)| (i, c.clone())).collect()
            };
            let mut fds: Vec<libc::pollfd> = std::iter::once(wake.as_raw_fd()).chain(watched.iter().map(|(_, c)| c.fd())).map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
            for f in &mut fds[1..] {
                // Not POLLIN: a TLS destination may have sent session tickets nobody reads.
                f.events = libc::POLLRDHUP;
            }
            // SAFETY: `fds` is a live array of `fds.len()` pollfds; every descriptor in it is
            // kept open by an `Arc<Conn>` in `watched` (or is the wake socket) for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if fds[0].revents != 0 {
                let mut drain = [0u8; 64];
                while matches!((&*wake).read(&mut drain), Ok(n) if n > 0) {}
            }
            for (f, (i, conn)) in fds[1..].iter().zip(&watched) {
                if f.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) == 0 {
                    continue;
                }
                let links = self.links.lock().unwrap();
                if Arc::ptr_eq(&links[*i], conn) {
                    conn.shutdown();
                    self.queues.lock().unwrap().broken[*i] = true;
                    self.work[*i].notify_all();
                }
            }
        }
    }
}
