//! The destination data plane: one listener, connections classified by their first bytes,
//! multifd channels admitted by their init packets, and one receive thread per channel that
//! reads pages straight into block memory. SYNC packets meet at a barrier.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::block::RamBlock;
use crate::control::{CONTROL_MAGIC, Control, Inbound, InboundSink, read_frame};
use crate::control_messages::ControlMessage;
use crate::hex::Hex;
use crate::integrity::{PageDigests, SessionDigests};
use crate::error::{Error, ErrorCode, Result, fail};
use crate::io::Boundary;
use crate::limits::{MAX_EARLY_CHANNELS, MAX_UNIDENTIFIED};
use crate::memory::WriteTarget;
use crate::protocol::{Delivered, synced_frame};
use crate::rejections::Rejections;
use crate::session::{ChannelState, ChannelStats, Counters, Event, EventSink, Failure, Recovery};
use crate::tls::{TlsServer, looks_like_tls, refuse_plaintext_peer, refuse_tls_peer};
use crate::transport::{Accepted, Address, Conn, Listener};
use crate::wire::{BlockLookup, COMMON_HEADER_LEN, ChannelClaims, CommonHeader, Compression, Geometry, INIT_PACKET_LEN, InitPacket, MAGIC, PacketHeader, PacketValidator, REPLACEMENT_ACK, Replacement};

/// When the process is out of descriptors, how long the acceptor waits for one to be released
/// before it tries again (it is woken as soon as a connection it dropped is closed).
const NO_DESCRIPTOR_WAIT: Duration = Duration::from_millis(100);

/// The connections being classified: their sockets by arrival (so `close` can cut them short
/// and the acceptor can close the oldest), and their threads.
#[derive(Default)]
struct Classifiers {
    fds: BTreeMap<u64, Unidentified>,
    threads: Vec<JoinHandle<()>>,
    next: u64,
}

/// A connection being classified: its socket, its peer (for the warning if it is rejected) and
/// when it arrived.
struct Unidentified {
    fd: std::os::fd::RawFd,
    peer: String,
    since: Instant,
}

/// A multifd channel that arrived before `configure`.
struct Early {
    conn: Conn,
    init: [u8; INIT_PACKET_LEN],
    peer: String,
    since: Instant,
}

/// What a connection said first: enough to tell whether it belongs to this destination.
enum First {
    /// The control magic, then the first frame.
    Control(Vec<u8>),
    /// A multifd channel's init packet.
    Channel([u8; INIT_PACKET_LEN]),
}

/// The `type` of a control frame, read without judging the rest (the orchestrator does).
#[derive(serde::Deserialize)]
struct FrameKind {
    #[serde(rename = "type")]
    kind: String,
}

/// What the destination expects, known once the control handshake has been accepted.
pub struct DestConfig {
    pub uuid: [u8; 16],
    pub channels: u8,
    pub geometry: Geometry,
    pub compression: Compression,
    pub blocks: Vec<Arc<RamBlock>>,
    /// How long after `configure` every channel must have arrived.
    pub channel_timeout: Duration,
    /// How long a stalled source may keep a channel mid-packet (see `Conn::set_peer_timeout`).
    pub peer_timeout: Option<Duration>,
    /// Check each packet's data pages against the digest in its header (negotiated).
    pub integrity: bool,
    /// How long a channel or the control connection whose connection broke may take to be
    /// replaced (`resumeWindowMs`) before the session fails with the cause; zero fails at once.
    pub resume_window: Duration,
}

/// When the control connection was lost, and why (`None`: the source closed it).
struct Lost {
    since: Instant,
    cause: Option<Error>,
}

/// The blocks by name, for the validator.
struct BlockTable {
    blocks: Vec<Arc<RamBlock>>,
    by_name: HashMap<Vec<u8>, usize>,
}

impl BlockLookup for BlockTable {
    fn lookup(&self, name: &[u8]) -> Option<(usize, u64)> {
        self.by_name.get(name).map(|&i| (i, self.blocks[i].len()))
    }
}

struct Barrier {
    state: Mutex<BarrierState>,
    cv: Condvar,
}

/// What one SYNC did at the barrier.
#[derive(Debug, PartialEq, Eq)]
enum Reach {
    /// The channel had reached this epoch before (a replacement sent it again).
    Again,
    /// Counted; other channels are still due.
    Counted,
    /// Counted, and it was the last: barrier `epoch` is released.
    Released(u64),
}

struct BarrierState {
    /// Channels that reached the next barrier (`epoch + 1`), each counted once.
    arrived: u32,
    /// Barriers released so far.
    epoch: u64,
    /// Per channel: the last SYNC epoch it reached (a replacement sends some again).
    passed: Vec<u64>,
    /// Per channel: given up by the source; barriers no longer wait for it.
    dropped: Vec<bool>,
    high_water: u64,
    stopping: bool,
}

impl BarrierState {
    fn new(channels: u32) -> Self {
        BarrierState { arrived: 0, epoch: 0, passed: vec![0; channels as usize], dropped: vec![false; channels as usize], high_water: 0, stopping: false }
    }

    /// Channels the barrier waits for: all but the dropped ones.
    fn live(&self) -> u32 {
        self.dropped.iter().filter(|d| !**d).count() as u32
    }

    /// Channel `id` reached its SYNC `k`: an arrival counts once per channel and epoch,
    /// however often a replacement sends the SYNC again.
    fn reach(&mut self, id: usize, k: u64) -> Reach {
        if k <= self.passed[id] {
            return Reach::Again;
        }
        self.passed[id] = k;
        self.arrived += 1;
        self.release_if_all()
    }

    /// Channel `id` is given up: the barrier waiting now no longer counts it (nor its arrival,
    /// if it had arrived), which may release it.
    fn drop_channel(&mut self, id: usize) -> Reach {
        if self.dropped[id] {
            return Reach::Again;
        }
        self.dropped[id] = true;
        if self.passed[id] > self.epoch {
            self.arrived -= 1;
        }
        if self.arrived == 0 { Reach::Counted } else { self.release_if_all() }
    }

    fn release_if_all(&mut self) -> Reach {
        if self.arrived < self.live() {
            return Reach::Counted;
        }
        self.arrived = 0;
        self.epoch += 1;
        Reach::Released(self.epoch)
    }
}

/// Where one channel's connection stands, for replacing it.
#[derive(Default)]
struct Link {
    /// The connection the current receive loop reads.
    conn: Option<Arc<Conn>>,
    /// A receive loop of this channel is running (a replacement waits until it has ended).
    running: bool,
    /// The connection broke: why and when. The replacement is due within the resume window.
    lost: Option<(Error, Instant)>,
}

/// One admitted connection, for its receive loop.
struct Admitted {
    id: u8,
    conn: Arc<Conn>,
    /// The channel's generation this loop serves: a replacement bumps it.
    generation: u64,
    /// The SYNC epoch the connection starts after (a replacement's marker; 0 for a first).
    synced: u64,
}

/// The destination's page digests ([`crate::integrity::SessionDigests`]), and each block's in the
/// table's order for the receive loops.
struct Digests {
    all: Arc<SessionDigests>,
    blocks: Vec<Arc<PageDigests>>,
}

struct Session {
    uuid: [u8; 16],
    channels: u32,
    geometry: Geometry,
    compression: Compression,
    table: BlockTable,
    claims: Mutex<ChannelClaims>,
    deadline: Instant,
    peer_timeout: Option<Duration>,
    /// With integrity: the digest of every page as it landed, per block in the table's order.
    digests: Option<Digests>,
    barrier: Barrier,
    stats: Vec<ChannelStats>,
    resume_window: Duration,
    links: Mutex<Vec<Link>>,
    /// Signalled when a receive loop ends (with `links`).
    link_ended: Condvar,
    /// Per channel: bumped by each replacement, so the loop it replaced leaves.
    generations: Vec<AtomicU64>,
    /// Each block's complete pieces ([`crate::resume::complete_pieces`]) as of the last
    /// barrier, and its epoch: taken while every channel is parked there.
    complete_pieces: Mutex<Option<(u64, Vec<Vec<u8>>)>>,
}

impl Session {
    /// Barrier `epoch` is being released, under the barrier's lock: every live channel is
    /// parked there and has read every packet before its SYNC whole, so every page marked
    /// received has landed (a lost channel's torn packet may be marked too: resume offers
    /// pieces with their digests, so such a piece is only sent again).
    fn take_complete_pieces(&self, epoch: u64) {
        let pieces = self.table.blocks.iter().map(|block| crate::resume::complete_pieces(block)).collect();
        *self.complete_pieces.lock().unwrap() = Some((epoch, pieces));
    }

    fn is_current(&self, id: u8, generation: u64) -> bool {
        self.generations[usize::from(id)].load(Ordering::Acquire) == generation
    }
}

struct Inner {
    failure: Arc<Failure>,
    events: EventSink,
    closing: AtomicBool,
    finishing: AtomicBool,
    session: Mutex<Option<Arc<Session>>>,
    /// Channels that arrived before `configure` (at most `MAX_EARLY_CHANNELS`, each for at
    /// most `classify_timeout`), oldest first.
    pending: Mutex<Vec<Early>>,
    control: Mutex<Option<Arc<Control>>>,
    /// Which accepted control connection is current: an older one's end is not news.
    control_generation: AtomicU64,
    /// Set while the control connection is lost and its replacement awaited.
    control_lost: Mutex<Option<Lost>>,
    /// `completed` went out (it may have been lost with a broken control connection).
    completed_sent: AtomicBool,
    /// Why the current control connection is being dropped on purpose (see `drop_control`).
    control_dropped: Mutex<Option<Error>>,
    /// Admitted channels. Admission happens under this lock and is refused once `closing`,
    /// so `close` (which shuts these down under the same lock) cannot miss one.
    channel_conns: Mutex<Vec<Arc<Conn>>>,
    /// Connections being classified (handshaken, first bytes read), each on its own thread.
    classifying: Mutex<Classifiers>,
    /// Signalled (with `classifying`) when a classifier has let go of its connection.
    released: Condvar,
    /// Connections closed without identifying themselves as this session's control connection
    /// or one of its channels (never fatal), with their rate-limited warnings.
    rejections: Rejections,
    /// The listening socket while the acceptor owns it, so `close` can wake a waiting accept at
    /// once instead of after the next poll interval. Cleared (under the lock) before the
    /// acceptor closes it, so `close` never touches a descriptor that was reused.
    listener_fd: Mutex<Option<std::os::fd::RawFd>>,
    receivers: Mutex<Vec<JoinHandle<()>>>,
    classify_timeout: Duration,
    /// When set, every connection must complete a mutual TLS handshake (and pass the
    /// allow-list) before its first byte is read.
    tls: Option<TlsServer>,
}

/// A listening destination.
pub struct Destination {
    inner: Arc<Inner>,
    address: Address,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl Destination {
    /// Binds `address` and starts accepting. `classify_timeout` bounds how long a new
    /// connection may take to complete its TLS handshake (with `tls`) and send its first bytes.
    pub fn listen(address: &Address, classify_timeout: Duration, tls: Option<TlsServer>, events: EventSink) -> Result<Destination> {
        crate::limits::check_destination(Some(classify_timeout), None, None)?;
        let listener = Listener::bind(address)?;
        let bound = listener.local_address()?;
        let inner = Arc::new(Inner {
            failure: Failure::new(events.clone()),
            rejections: Rejections::new(events.clone()),
            events,
            closing: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
            session: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            control: Mutex::new(None),
            control_generation: AtomicU64::new(0),
            control_lost: Mutex::new(None),
            completed_sent: AtomicBool::new(false),
            control_dropped: Mutex::new(None),
            channel_conns: Mutex::new(Vec::new()),
            classifying: Mutex::new(Classifiers::default()),
            released: Condvar::new(),
            listener_fd: Mutex::new(None),
            receivers: Mutex::new(Vec::new()),
            classify_timeout,
            tls,
        });
        let weak = Arc::downgrade(&inner);
        inner.failure.on_failure(move || {
            if let Some(i) = weak.upgrade() {
                i.stop_barrier();
            }
        });
        let i = inner.clone();
        let acceptor = std::thread::Builder::new()
            .name("multifd/accept".into())
            .spawn(move || i.accept_loop(listener))
            .map_err(|e| Error::new(ErrorCode::Io, format!("spawn acceptor: {e}")))?;
        Ok(Destination { inner, address: bound, acceptor: Mutex::new(Some(acceptor)) })
    }

    /// The address peers connect to (the real port when bound to port 0).
    pub fn address(&self) -> &Address {
        &self.address
    }

    pub fn failure(&self) -> &Arc<Failure> {
        &self.inner.failure
    }

    /// Connections rejected so far: closed, never fatal, each reported in a (rate-limited)
    /// `Event::Warning` naming the peer and the reason. A connection is rejected unless it
    /// identifies itself as this destination's session: a control connection whose first frame
    /// is the first hello, or a multifd channel whose init packet names the session's UUID.
    /// So are: silence past the classify timeout, a failed TLS handshake, plaintext to a TLS
    /// destination or TLS to a plaintext one, unknown first bytes, a second control connection,
    /// connections crowded out beyond `MAX_UNIDENTIFIED` / `MAX_EARLY_CHANNELS`, and channels
    /// that arrived before the session and expired or named another session.
    pub fn rejected_connections(&self) -> u64 {
        self.inner.rejections.count()
    }

    /// Multifd channels waiting for the session to be configured.
    pub fn early_channels(&self) -> usize {
        self.inner.pending.lock().unwrap().len()
    }

    /// The TLS session of the accepted control connection, when TLS is on.
    pub fn control_tls(&self) -> Option<crate::tls::TlsInfo> {
        self.inner.control.lock().unwrap().as_ref().and_then(|c| c.conn().tls().map(|t| t.info()))
    }

    /// Sends a frame on the accepted control connection. While it is lost and may still be
    /// replaced, a frame that cannot be written is not an error: the replacement's answer says
    /// whether `completed` went out, and other frames (pings) are not needed again.
    pub fn send_control(&self, frame: &[u8]) -> Result<()> {
        if matches!(ControlMessage::decode(frame), Ok(ControlMessage::Completed)) {
            self.inner.completed_sent.store(true, Ordering::Release);
        }
        let control = self.inner.control.lock().unwrap().clone();
        match control {
            Some(c) => c.send(frame).or_else(|e| if self.inner.control_resumable() { Ok(()) } else { Err(e) }),
            None => fail!(State, "no control connection yet"),
        }
    }

    /// Drops the control connection because of `cause` (nothing heard on it for
    /// `peerTimeoutMs`: a hung path) and waits for its replacement like a broken one's. False
    /// when no replacement would be waited for (the caller fails instead).
    pub fn drop_control(&self, cause: Error) -> bool {
        if !self.inner.control_resumable() {
            return false;
        }
        let Some(c) = self.inner.control.lock().unwrap().clone() else { return false };
        *self.inner.control_dropped.lock().unwrap() = Some(cause);
        c.conn().shutdown();
        true
    }

    /// Starts admitting multifd channels for this session (and those that already arrived).
    pub fn configure(&self, config: DestConfig) -> Result<()> {
        // Lock order everywhere: pending, then session. Holding `pending` while the session is
        // set means a channel the acceptor classifies meanwhile is either queued before we
        // drain the queue or sees the session and is admitted directly.
        crate::limits::check_destination_with(None, Some(config.channel_timeout), config.peer_timeout, Some(config.resume_window))?;
        let mut pending = self.inner.pending.lock().unwrap();
        let mut slot = self.inner.session.lock().unwrap();
        if slot.is_some() {
            fail!(State, "the destination is already configured");
        }
        for b in &config.blocks {
            if b.page_size() != config.geometry.page_size() {
                fail!(BlockMismatch, "block {:?} has {}-byte pages, the session uses {}", b.name(), b.page_size(), config.geometry.page_size());
            }
        }
        let by_name = config.blocks.iter().enumerate().map(|(i, b)| (b.name().as_bytes().to_vec(), i)).collect();
        let n = u32::from(config.channels);
        let digests = config.integrity.then(|| {
            let all = Arc::new(SessionDigests::default());
            Digests { blocks: config.blocks.iter().map(|b| all.block(b)).collect(), all }
        });
        let session = Arc::new(Session {
            uuid: config.uuid,
            channels: n,
            geometry: config.geometry,
            compression: config.compression,
            table: BlockTable { blocks: config.blocks, by_name },
            claims: Mutex::new(ChannelClaims::new(n)?),
            deadline: Instant::now() + config.channel_timeout,
            peer_timeout: config.peer_timeout,
            digests,
            barrier: Barrier { state: Mutex::new(BarrierState::new(n)), cv: Condvar::new() },
            stats: (0..n).map(|_| ChannelStats::default()).collect(),
            resume_window: config.resume_window,
            links: Mutex::new((0..n).map(|_| Link::default()).collect()),
            link_ended: Condvar::new(),
            generations: (0..n).map(|_| AtomicU64::new(0)).collect(),
            complete_pieces: Mutex::new(None),
        });
        *slot = Some(session.clone());
        drop(slot);
        let early = std::mem::take(&mut *pending);
        drop(pending);
        for Early { conn, init, peer, .. } in early {
            // A channel that arrived before the session and names another one was no channel
            // of this session: rejected, never fatal.
            if let Err(e) = InitPacket::names_session(&init, &session.uuid) {
                self.inner.rejections.reject(&peer, e);
                continue;
            }
            if let Some(a) = self.inner.admit(&session, conn, init) {
                self.inner.spawn_receiver(&session, a);
            }
        }
        Ok(())
    }

    pub fn stats(&self) -> Vec<Counters> {
        match self.inner.session.lock().unwrap().as_ref() {
            Some(s) => s.stats.iter().map(|c| c.snapshot()).collect(),
            None => Vec::new(),
        }
    }

    /// Each block's complete pieces as of the last sync barrier, with its epoch (None before
    /// the first): every page of them landed, received in this session or held from an
    /// earlier one (docs/PROTOCOL.md, "Resume").
    pub fn complete_pieces(&self) -> Option<(u64, Vec<Vec<u8>>)> {
        self.inner.session.lock().unwrap().as_ref().and_then(|s| s.complete_pieces.lock().unwrap().clone())
    }

    /// With integrity, the digests of the pages as they landed (for the block digests at
    /// completion, [`SessionDigests::block_digest`]); None without integrity or before `configure`.
    pub fn page_digests(&self) -> Option<Arc<SessionDigests>> {
        self.inner.session.lock().unwrap().as_ref().and_then(|s| s.digests.as_ref().map(|d| d.all.clone()))
    }

    /// The source said `complete {epoch}`: accepted only when every announced channel was
    /// admitted and delivered that epoch's SYNC (the last barrier passed); then [`finish`].
    /// Otherwise the session fails with `ERR_MULTIFD_OUT_OF_SEQUENCE`, and that is returned.
    ///
    /// [`finish`]: Destination::finish
    pub fn complete(&self, epoch: u64) -> Result<()> {
        if let Err(e) = self.delivered().and_then(|d| d.check_complete(epoch)) {
            self.inner.failure.fail(e.clone());
            return Err(self.inner.failure.first().unwrap_or(e));
        }
        self.finish()
    }

    /// The source gave channel `id` up (`channelDropped`): barriers stop waiting for it, its
    /// connection (if any is left) is shut down and its resume window is off. The pages it
    /// owed come again on the other channels.
    pub fn drop_channel(&self, id: u32) -> Result<()> {
        let Some(s) = self.inner.session.lock().unwrap().clone() else {
            fail!(OutOfSequence, "channelDropped before the hello was accepted");
        };
        if id >= s.channels {
            fail!(Protocol, "channelDropped names channel {id}, the session has {}", s.channels);
        }
        let i = id as usize;
        s.generations[i].fetch_add(1, Ordering::AcqRel);
        {
            let mut links = s.links.lock().unwrap();
            links[i].lost = None;
            if let Some(c) = &links[i].conn {
                c.shutdown();
            }
        }
        s.stats[i].set_state(ChannelState::Lost);
        let mut b = s.barrier.state.lock().unwrap();
        let reached = b.drop_channel(i);
        if let Reach::Released(e) = reached {
            s.take_complete_pieces(e);
        }
        let hw = b.high_water;
        drop(b);
        s.barrier.cv.notify_all();
        if let Reach::Released(e) = reached
            && let Err(err) = self.inner.released(&s, e, hw)
        {
            self.inner.failure.fail(err.clone());
            return Err(err);
        }
        Ok(())
    }

    /// What the channels delivered so far.
    fn delivered(&self) -> Result<Delivered> {
        let Some(s) = self.inner.session.lock().unwrap().clone() else {
            fail!(OutOfSequence, "the source completed before its hello was accepted");
        };
        let admitted = s.channels - s.claims.lock().unwrap().missing().len() as u32;
        let epoch = s.barrier.state.lock().unwrap().epoch;
        Ok(Delivered { announced: s.channels, admitted, epoch })
    }

    /// Ends a successful migration: channels may now close, their readers stop at the next
    /// packet boundary and are joined. Returns the first error if the session failed.
    pub fn finish(&self) -> Result<()> {
        self.inner.finishing.store(true, Ordering::Release);
        for c in self.inner.channel_conns.lock().unwrap().iter() {
            c.shutdown_read();
        }
        // Every channel has arrived: a connection still being classified is not one of them.
        self.inner.cut_classifying();
        self.join_receivers();
        match self.inner.failure.first() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Joins every receive loop: those on threads of their own and those running on the thread
    /// that classified their connection.
    fn join_receivers(&self) {
        let handles = std::mem::take(&mut *self.inner.receivers.lock().unwrap());
        for h in handles {
            let _ = h.join();
        }
        let classifiers = std::mem::take(&mut self.inner.classifying.lock().unwrap().threads);
        for c in classifiers {
            let _ = c.join();
        }
    }

    /// Stops accepting, shuts every connection down and joins every thread. Idempotent.
    pub fn close(&self) {
        self.inner.finishing.store(true, Ordering::Release);
        {
            let conns = self.inner.channel_conns.lock().unwrap();
            self.inner.closing.store(true, Ordering::Release);
            conns.iter().for_each(|c| c.shutdown());
        }
        self.inner.cut_classifying();
        if let Some(fd) = *self.inner.listener_fd.lock().unwrap() {
            // SAFETY: the acceptor still owns this open descriptor (it clears the slot under the
            // same lock before closing it); shutting a listener down only wakes its poll.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        self.inner.stop_barrier();
        if let Some(a) = self.acceptor.lock().unwrap().take() {
            let _ = a.join();
        }
        // No classifier starts once `closing` is set (checked under the classifiers' lock).
        self.join_receivers();
        self.inner.channel_conns.lock().unwrap().clear();
        if let Some(s) = self.inner.session.lock().unwrap().as_ref() {
            s.links.lock().unwrap().iter_mut().for_each(|l| l.conn = None);
        }
        self.inner.failure.release_connections();
        self.inner.pending.lock().unwrap().clear();
        self.inner.rejections.flush_now();
        if let Some(c) = self.inner.control.lock().unwrap().take() {
            c.close();
        }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    fn stop_barrier(&self) {
        if let Some(s) = self.session.lock().unwrap().as_ref() {
            s.barrier.state.lock().unwrap().stopping = true;
            s.barrier.cv.notify_all();
        }
    }

    fn accept_loop(self: &Arc<Self>, listener: Listener) {
        *self.listener_fd.lock().unwrap() = Some(listener.fd());
        self.accept_until_closed(&listener);
        let mut slot = self.listener_fd.lock().unwrap();
        slot.take();
        drop(listener);
    }

    fn accept_until_closed(self: &Arc<Self>, listener: &Listener) {
        while !self.closing.load(Ordering::Acquire) {
            self.check_deadline();
            self.expire_early();
            self.expire_classifying();
            self.expire_control_window();
            self.rejections.flush();
            match listener.accept_for(Duration::from_millis(50)) {
                Ok(Accepted::Conn(conn)) => self.start_classifying(conn),
                Ok(Accepted::Idle) => {}
                // Out of descriptors: the listener stays readable, so waiting on it would spin.
                // Make room by closing the oldest connection that has not identified itself,
                // then wait until a descriptor is released (or a while) before trying again.
                Ok(Accepted::NoDescriptors) => {
                    self.shed_oldest();
                    let c = self.classifying.lock().unwrap();
                    drop(self.released.wait_timeout(c, NO_DESCRIPTOR_WAIT).unwrap());
                }
                // `close` shut the listener down to wake us: not a failure.
                Err(_) if self.closing.load(Ordering::Acquire) => return,
                Err(e) => {
                    self.failure.fail(e);
                    return;
                }
            }
        }
    }

    fn check_deadline(&self) {
        let session = self.session.lock().unwrap().clone();
        if let Some(s) = session {
            let overdue = s.links.lock().unwrap().iter().enumerate().find_map(|(id, l)| {
                l.lost.as_ref().filter(|(_, since)| since.elapsed() >= s.resume_window).map(|(cause, _)| (id, cause.clone()))
            });
            if let Some((id, cause)) = overdue {
                self.failure.fail(cause.context(format!("channel {id} was not replaced within {} ms", s.resume_window.as_millis())));
            }
            let claims = s.claims.lock().unwrap();
            if !claims.is_complete() && Instant::now() > s.deadline && !self.failure.is_failed() {
                let missing = claims.missing();
                drop(claims);
                self.failure.fail(Error::new(
                    ErrorCode::Timeout,
                    format!("multifd channel(s) {missing:?} of {} never arrived", s.channels),
                ));
            }
        }
    }

    /// Shuts down every connection being classified, waking its thread.
    fn cut_classifying(&self) {
        for &Unidentified { fd, .. } in self.classifying.lock().unwrap().fds.values() {
            // SAFETY: a classifier owns this open socket and removes it from the map (under this
            // lock) before it lets go of it; shutting it down only wakes its blocked read.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        self.released.notify_all();
    }

    /// Cuts the oldest connection being classified, if any, and rejects it for `why`: its
    /// classifier finds its entry gone and closes it quietly. Returns whether there was one.
    fn cut_oldest_unidentified(&self, c: &mut Classifiers, why: &str) -> bool {
        let Some((_, u)) = c.fds.pop_first() else { return false };
        self.cut(u, Error::new(ErrorCode::Timeout, why));
        true
    }

    /// Shuts down a connection whose entry was just taken out of `classifying`, and rejects it.
    fn cut(&self, u: Unidentified, why: Error) {
        // SAFETY: as in `cut_classifying`: the classifier still owns the open socket (it looks
        // for its entry under the classifiers' lock, which the caller held when it took the
        // entry out, before letting go); after this, nobody here uses `fd`.
        unsafe { libc::shutdown(u.fd, libc::SHUT_RDWR) };
        self.rejections.reject(&u.peer, why);
    }

    /// Closes the oldest early channel, or else cuts the oldest connection being classified,
    /// to free a descriptor.
    fn shed_oldest(&self) {
        let early = {
            let mut p = self.pending.lock().unwrap();
            (!p.is_empty()).then(|| p.remove(0))
        };
        let why = "closed to free a descriptor: the process has none left";
        if let Some(e) = early {
            self.rejections.reject(&e.peer, Error::new(ErrorCode::Io, format!("a multifd channel waiting for its session {why}")));
            return;
        }
        self.cut_oldest_unidentified(&mut self.classifying.lock().unwrap(), &format!("not identified yet and {why}"));
    }

    /// Closes early channels that have waited longer than the classify timeout for a session.
    fn expire_early(&self) {
        let expired: Vec<Early> = {
            let mut p = self.pending.lock().unwrap();
            let (old, young) = std::mem::take(&mut *p).into_iter().partition(|e| e.since.elapsed() >= self.classify_timeout);
            *p = young;
            old
        };
        for e in expired {
            let ms = self.classify_timeout.as_millis();
            self.rejections.reject(&e.peer, Error::new(ErrorCode::Timeout, format!("a multifd channel waited {ms} ms for a session that did not start")));
        }
    }

    /// Cuts connections still unidentified after twice the classify timeout: a backstop for
    /// peers that drip their first bytes, each read within the timeout (the classifier's own
    /// timeouts end the others first).
    fn expire_classifying(&self) {
        let limit = 2 * self.classify_timeout;
        let mut c = self.classifying.lock().unwrap();
        let old: Vec<u64> = c.fds.iter().filter(|(_, u)| u.since.elapsed() >= limit).map(|(&id, _)| id).collect();
        for id in old {
            if let Some(u) = c.fds.remove(&id) {
                self.cut(u, Error::new(ErrorCode::Timeout, format!("did not identify itself within {} ms", limit.as_millis())));
            }
        }
    }

    /// Closing, or finished: no new connection matters any more.
    fn ending(&self) -> bool {
        self.closing.load(Ordering::Acquire) || self.finishing.load(Ordering::Acquire)
    }

    /// Classifies `conn` on a thread of its own, so a slow handshake (a far source, or one
    /// that stalls) does not hold up the channels behind it; a multifd channel's receive loop
    /// then runs on the same thread, next to the TLS state its handshake allocated. At most
    /// `MAX_UNIDENTIFIED` connections are being classified at once: a new one closes the
    /// oldest, so a flood of silent connections cannot crowd out a real source.
    fn start_classifying(self: &Arc<Self>, conn: Conn) {
        let mut c = self.classifying.lock().unwrap();
        if self.ending() {
            return;
        }
        c.threads.retain(|t| !t.is_finished());
        while c.fds.len() >= MAX_UNIDENTIFIED && self.cut_oldest_unidentified(&mut c, &format!("crowded out: {MAX_UNIDENTIFIED} newer connections were not identified yet")) {}
        let id = c.next;
        c.next += 1;
        let peer = conn.peer();
        c.fds.insert(id, Unidentified { fd: conn.fd(), peer: peer.clone(), since: Instant::now() });
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("multifd/classify".into()).spawn(move || {
            me.classify(conn, id, &peer);
            // Its connection is closed or handed on: the acceptor may be waiting for a descriptor.
            me.released.notify_all();
        });
        match spawned {
            Ok(t) => c.threads.push(t),
            Err(e) => {
                c.fds.remove(&id);
                drop(c);
                self.failure.fail(Error::new(ErrorCode::Io, format!("spawn a classifier thread: {e}")));
            }
        }
    }

    /// Reads a new connection's first bytes to tell a control connection from a channel, and
    /// admits it, or rejects it (closed, counted, reported; never fatal) unless it identifies
    /// itself as this destination's session. `id` is its entry in `classifying`, removed before
    /// the connection moves on; an entry already gone was cut (and rejected) by the acceptor.
    fn classify(self: &Arc<Self>, mut conn: Conn, id: u64, peer: &str) {
        let first = match conn.wait_readable(self.classify_timeout) {
            Ok(false) => Err(Error::new(ErrorCode::Timeout, format!("sent nothing within {} ms", self.classify_timeout.as_millis()))),
            Ok(true) => conn.set_read_timeout(Some(self.classify_timeout)).and_then(|()| self.read_first(&mut conn)),
            Err(e) => Err(e),
        };
        let cut = self.classifying.lock().unwrap().fds.remove(&id).is_none();
        if cut || self.ending() {
            return;
        }
        match first.and_then(|f| conn.set_read_timeout(None).map(|()| f)) {
            Ok(First::Control(frame)) => self.control_arrived(conn, frame, peer),
            Ok(First::Channel(init)) => self.channel_arrived(conn, init, peer),
            Err(e) => self.rejections.reject(peer, e),
        }
    }

    /// Reads the magic, then a control connection's first frame or a multifd channel's init
    /// packet; with TLS, after the handshake. Any error is the reason to reject the connection.
    fn read_first(&self, conn: &mut Conn) -> Result<First> {
        let deadline = Instant::now() + self.classify_timeout;
        let mut magic = [0u8; 4];
        if !conn.read_exact(&mut magic)? {
            fail!(ConnectionClosed, "closed without sending a byte");
        }
        match (&self.tls, u32::from_be_bytes(magic)) {
            (Some(_), m @ (CONTROL_MAGIC | MAGIC)) => {
                refuse_plaintext_peer(conn.fd());
                let kind = if m == CONTROL_MAGIC { "control" } else { "multifd" };
                fail!(TlsRequired, "a {kind} connection arrived in plaintext; this destination requires TLS");
            }
            (Some(server), _) => {
                conn.accept_tls(server, &magic, deadline)?;
                if !conn.read_exact(&mut magic)? {
                    fail!(ConnectionClosed, "closed after its TLS handshake without sending a byte");
                }
            }
            (None, _) if looks_like_tls(&magic) => {
                refuse_tls_peer(conn.fd());
                fail!(TlsUnavailable, "a peer started a TLS handshake; this destination has no TLS configured");
            }
            (None, _) => {}
        }
        match u32::from_be_bytes(magic) {
            CONTROL_MAGIC => match read_frame(conn)? {
                Some(frame) => Ok(First::Control(frame)),
                None => fail!(ConnectionClosed, "a control connection closed before its first message"),
            },
            MAGIC => {
                let mut init = [0u8; INIT_PACKET_LEN];
                init[..4].copy_from_slice(&magic);
                if !conn.read_exact(&mut init[4..])? {
                    fail!(ConnectionClosed, "a multifd channel closed inside its init packet");
                }
                Ok(First::Channel(init))
            }
            other => fail!(UnknownChannel, "a connection started with 0x{other:08x}, neither the control magic 0x{CONTROL_MAGIC:08x} nor the multifd magic 0x{MAGIC:08x}"),
        }
    }

    /// A control connection is admitted only as the first hello (the session this destination
    /// will run) or as the replacement of this session's (`reconnect`). Anything else (another
    /// message first, a second hello, a reconnect for another session) is rejected.
    fn control_arrived(self: &Arc<Self>, conn: Conn, frame: Vec<u8>, peer: &str) {
        let mut slot = self.control.lock().unwrap();
        let kind = serde_json::from_slice::<FrameKind>(&frame).map(|k| k.kind);
        if kind.as_deref().is_ok_and(|k| k == "reconnect") {
            let replaced = self.control_replaced(&mut slot, conn, &frame);
            drop(slot);
            // The replaced connection is closed outside the lock: its reader's end is stale news.
            if let Err(e) = replaced {
                self.rejections.reject(peer, e);
            }
            return;
        }
        let refused = match kind {
            Ok(k) if k == "hello" && slot.is_none() => None,
            // A source started again while this session waits for its lost one: the wait ends
            // now (the orchestrator is told, with the loss's cause), and the new source, whose
            // connection this destination cannot take, connects again to what follows.
            Ok(k) if k == "hello" && self.supersede_lost_control() => {
                Some(Error::new(ErrorCode::ConnectionClosed, "a new session's hello while the running session waited for its lost source: that session ends; connect again"))
            }
            Ok(k) if k == "hello" => Some(Error::new(ErrorCode::Protocol, "a second control connection with a hello: this destination runs one session")),
            Ok(k) => Some(Error::new(ErrorCode::Protocol, format!("a control connection whose first message is {k:?}, neither a hello nor a reconnect"))),
            Err(_) => Some(Error::new(ErrorCode::Protocol, format!("a control connection whose first frame ({} bytes) is not a control message", frame.len()))),
        };
        if let Some(e) = refused {
            drop(slot);
            return self.rejections.reject(peer, e);
        }
        // Announced before the reader thread starts: its first frame (the hello) must not
        // reach the orchestrator ahead of the connection it came on.
        (self.events)(Event::ControlConnected);
        let generation = self.control_generation.fetch_add(1, Ordering::AcqRel) + 1;
        *slot = Some(Control::accepted(conn, Some(frame), self.control_sink(generation)));
    }

    /// Admits a control connection that replaces this session's, answering its `reconnect`
    /// with the last barrier every channel passed and whether `completed` went out. Returns the
    /// connection it replaces (lost, or still open if this side has not noticed yet).
    fn control_replaced(self: &Arc<Self>, slot: &mut Option<Arc<Control>>, conn: Conn, frame: &[u8]) -> Result<Option<Arc<Control>>> {
        let ControlMessage::Reconnect { session, .. } = ControlMessage::decode(frame)? else {
            fail!(Protocol, "a control frame of type reconnect that is not a valid reconnect");
        };
        let Some(s) = self.session.lock().unwrap().clone().filter(|s| Hex(&s.uuid).to_string() == session) else {
            fail!(UuidMismatch, "a control reconnect for session {session}, which this destination does not run");
        };
        if slot.is_none() || s.resume_window.is_zero() || self.failure.is_failed() {
            fail!(State, "a control reconnect for session {session}, which cannot take one (no control connection yet, resumeWindowMs 0, or failed)");
        }
        if self.control_lost.lock().unwrap().as_ref().is_some_and(|l| l.since.elapsed() >= s.resume_window) {
            fail!(Timeout, "a control reconnect for session {session} after resumeWindowMs ({} ms)", s.resume_window.as_millis());
        }
        // Under the control lock: a sync acknowledged from now on goes out on the replacement,
        // after this answer (the source drops one the answer already covered).
        let epoch = s.barrier.state.lock().unwrap().epoch;
        let answer = ControlMessage::Reconnected { epoch, completed: self.completed_sent.load(Ordering::Acquire) }.encode();
        conn.set_write_timeout(Some(self.classify_timeout))?;
        conn.write_all(&[&(answer.len() as u32).to_be_bytes(), &answer])?;
        let lost = self.control_lost.lock().unwrap().take();
        let generation = self.control_generation.fetch_add(1, Ordering::AcqRel) + 1;
        let old = slot.replace(Control::accepted(conn, None, self.control_sink(generation)));
        let (cause, took) = match lost {
            Some(Lost { since, cause }) => (cause.unwrap_or_else(|| Error::new(ErrorCode::ConnectionClosed, "the source closed the control connection")), since.elapsed()),
            None => (Error::new(ErrorCode::ConnectionClosed, "the source replaced a control connection this side still had open"), Duration::ZERO),
        };
        (self.events)(Event::Recovered(Recovery { connection: None, cause, pages_resent: 0, took }));
        Ok(old)
    }

    /// The sink of accepted control connection `generation`: its frames go to the
    /// orchestrator; its end matters only while it is the current one.
    fn control_sink(self: &Arc<Self>, generation: u64) -> InboundSink {
        let (me, events) = (Arc::downgrade(self), self.events.clone());
        Arc::new(move |i| match i {
            Inbound::Frame(f) => events(Event::Control(f)),
            Inbound::Closed(end) => {
                if let Some(me) = me.upgrade() {
                    me.control_ended(generation, end);
                }
            }
        })
    }

    /// Control connection `generation` ended. Mid-session, with a resume window, its
    /// replacement is awaited (the channels carry on); otherwise the orchestrator is told.
    fn control_ended(&self, generation: u64, end: Option<Error>) {
        if generation != self.control_generation.load(Ordering::Acquire) {
            return;
        }
        let end = self.control_dropped.lock().unwrap().take().or(end);
        let clean_after_completion = end.is_none() && self.completed_sent.load(Ordering::Acquire);
        if clean_after_completion || !self.control_resumable() {
            return (self.events)(Event::ControlClosed(end));
        }
        *self.control_lost.lock().unwrap() = Some(Lost { since: Instant::now(), cause: end });
    }

    /// Whether a lost control connection would be waited for: a session with a resume window
    /// that has not failed and is not closing.
    fn control_resumable(&self) -> bool {
        let window = self.session.lock().unwrap().as_ref().map_or(Duration::ZERO, |s| s.resume_window);
        !window.is_zero() && !self.closing.load(Ordering::Acquire) && !self.failure.is_failed()
    }

    /// Ends the wait for a lost control connection's replacement once the resume window has
    /// passed: the orchestrator is told, with the cause of the loss.
    fn expire_control_window(&self) {
        let window = self.session.lock().unwrap().as_ref().map_or(Duration::ZERO, |s| s.resume_window);
        let mut lost = self.control_lost.lock().unwrap();
        if lost.as_ref().is_none_or(|l| l.since.elapsed() < window) {
            return;
        }
        let Lost { cause, .. } = lost.take().expect("checked above");
        drop(lost);
        let ms = window.as_millis();
        let cause = match cause {
            Some(e) => Error::new(e.code, format!("{}; no reconnect within resumeWindowMs ({ms} ms)", e.message)),
            None => Error::new(ErrorCode::ConnectionClosed, format!("the source closed the control connection before completing and did not reconnect within resumeWindowMs ({ms} ms)")),
        };
        (self.events)(Event::ControlClosed(Some(cause)));
    }

    /// A new session's hello arrived while this one waits for its lost control connection: the
    /// source that was lost is not coming back, so the wait ends at once with the loss's cause.
    /// False when the control connection is not lost.
    fn supersede_lost_control(&self) -> bool {
        let Some(Lost { cause, .. }) = self.control_lost.lock().unwrap().take() else {
            return false;
        };
        let cause = match cause {
            Some(e) => Error::new(e.code, format!("{}; a new session arrived instead of a reconnect", e.message)),
            None => Error::new(ErrorCode::ConnectionClosed, "the source closed the control connection before completing; a new session arrived instead of a reconnect"),
        };
        (self.events)(Event::ControlClosed(Some(cause)));
        true
    }

    /// A multifd channel: admitted when its init packet names the session's UUID (one that
    /// then breaks the protocol fails the session), rejected when it names another; queued
    /// when the session is not configured yet.
    fn channel_arrived(self: &Arc<Self>, conn: Conn, init: [u8; INIT_PACKET_LEN], peer: &str) {
        let mut pending = self.pending.lock().unwrap();
        let session = self.session.lock().unwrap().clone();
        let Some(s) = session else {
            if pending.len() >= MAX_EARLY_CHANNELS {
                let oldest = pending.remove(0);
                self.rejections.reject(&oldest.peer, Error::new(ErrorCode::Timeout, format!("crowded out: {MAX_EARLY_CHANNELS} newer multifd channels arrived before any session")));
            }
            pending.push(Early { conn, init, peer: peer.to_owned(), since: Instant::now() });
            return;
        };
        drop(pending);
        if let Err(e) = InitPacket::names_session(&init, &s.uuid) {
            return self.rejections.reject(peer, e);
        }
        if let Some(a) = self.admit(&s, conn, init) {
            self.receive_from_classifier(&s, a);
        }
    }

    /// Admits a classified channel: checks its init packet against the session and registers
    /// its connection. A replacement (the init packet's marker, for a channel already here)
    /// takes the old connection's place once the old receive loop has ended, and is told so.
    /// `None` when it is refused (the session fails) or the destination is closing.
    fn admit(&self, s: &Session, conn: Conn, buf: [u8; INIT_PACKET_LEN]) -> Option<Admitted> {
        let replacement = Replacement::decode(&buf);
        let admitted = {
            let mut claims = s.claims.lock().unwrap();
            match replacement {
                Some(_) => InitPacket::decode(&buf).and_then(|i| {
                    i.check(&s.uuid, s.channels)?;
                    // A replacement for a connection that never got here is its first arrival.
                    if !claims.is_claimed(i.channel_id) {
                        claims.claim(i.channel_id)?;
                    }
                    Ok(i)
                }),
                None => InitPacket::admit(&buf, &s.uuid, &mut claims),
            }
        };
        let init = match admitted {
            Ok(i) => i,
            Err(e) => {
                conn.shutdown();
                self.failure.fail(e.context(format!("multifd channel #{}", self.channel_conns.lock().unwrap().len())));
                return None;
            }
        };
        let id = init.channel_id;
        if s.barrier.state.lock().unwrap().dropped[usize::from(id)] {
            // The source gave this channel up; whatever connects for it now is too late.
            conn.shutdown();
            return None;
        }
        let conn = Arc::new(conn);
        let generation = s.generations[usize::from(id)].fetch_add(1, Ordering::AcqRel) + 1;
        let old = self.take_over(s, id, generation)?;
        let mut conns = self.channel_conns.lock().unwrap();
        if self.closing.load(Ordering::Acquire) || !s.is_current(id, generation) {
            conn.shutdown();
            return None;
        }
        match &old.conn {
            Some(o) => {
                self.failure.swap(o, conn.clone());
                conns.retain(|c| !Arc::ptr_eq(c, o));
            }
            None => self.failure.watch(conn.clone()),
        }
        conns.push(conn.clone());
        drop(conns);
        s.links.lock().unwrap()[usize::from(id)].conn = Some(conn.clone());
        let ready = s.peer_timeout.map_or(Ok(()), |t| conn.set_peer_timeout(t)).and_then(|()| match replacement {
            Some(_) => conn.write_all(&[&REPLACEMENT_ACK]),
            None => Ok(()),
        });
        if let Err(e) = ready {
            conn.shutdown();
            self.failure.fail(e.context(format!("channel {id}")));
            return None;
        }
        if let Some(r) = replacement {
            let (cause, took) = match old.lost {
                Some((cause, since)) => (cause, since.elapsed()),
                None => (Error::new(ErrorCode::ConnectionClosed, "replaced by the source while it still looked alive here"), Duration::ZERO),
            };
            s.stats[usize::from(id)].set_state(ChannelState::Up);
            (self.events)(Event::Recovered(Recovery { connection: Some(id), cause: cause.context(format!("channel {id}")), pages_resent: r.pages_resent, took }));
        }
        Some(Admitted { id, conn, generation, synced: replacement.map_or(0, |r| r.acked_epoch) })
    }

    /// Makes generation `generation` channel `id`'s receive loop: shuts the previous
    /// connection down, wakes its loop if it waits at the barrier, and waits until it has
    /// ended, so no older bytes land after the replacement's. Returns what the old link was.
    /// `None` when the session fails or a newer replacement came meanwhile.
    fn take_over(&self, s: &Session, id: u8, generation: u64) -> Option<Link> {
        let i = usize::from(id);
        let mut links = s.links.lock().unwrap();
        if let Some(c) = &links[i].conn {
            c.shutdown();
        }
        {
            let _b = s.barrier.state.lock().unwrap();
            s.barrier.cv.notify_all();
        }
        while links[i].running {
            if self.failure.is_failed() || self.closing.load(Ordering::Acquire) || !s.is_current(id, generation) {
                return None;
            }
            links = s.link_ended.wait_timeout(links, Duration::from_millis(100)).unwrap().0;
        }
        if !s.is_current(id, generation) {
            return None;
        }
        let old = std::mem::take(&mut links[i]);
        links[i].running = true;
        Some(old)
    }

    /// Runs channel `id`'s receive loop on the thread that classified it.
    fn receive_from_classifier(self: &Arc<Self>, s: &Arc<Session>, a: Admitted) {
        name_this_thread(&format!("multifd/recv/{}", a.id));
        self.run_receiver(s, a)
    }

    /// A channel admitted by `configure` (it arrived before the session was known) gets a
    /// receive thread of its own.
    fn spawn_receiver(self: &Arc<Self>, s: &Arc<Session>, a: Admitted) {
        if let Some(receiver) = self.receiver_thread(s, a) {
            self.receivers.lock().unwrap().push(receiver);
        }
    }

    /// Channel `id`'s receive loop on a new thread; `None` (and the session failed) when no
    /// thread could be started.
    fn receiver_thread(self: &Arc<Self>, s: &Arc<Session>, a: Admitted) -> Option<JoinHandle<()>> {
        let (me, s2, id) = (self.clone(), s.clone(), a.id);
        match std::thread::Builder::new().name(format!("multifd/recv/{id}")).spawn(move || me.run_receiver(&s2, a)) {
            Ok(t) => Some(t),
            Err(e) => {
                self.failure.fail(Error::new(ErrorCode::Io, format!("spawn receive thread: {e}")));
                let mut links = s.links.lock().unwrap();
                links[usize::from(id)].running = false;
                s.link_ended.notify_all();
                None
            }
        }
    }

    /// Channel `a.id`'s receive loop, on the calling thread, until the channel ends. A
    /// connection fault (not a protocol error) leaves the channel lost, awaiting its
    /// replacement within the resume window, instead of failing the session.
    fn run_receiver(&self, s: &Session, a: Admitted) {
        let id = a.id;
        if a.synced == 0 && a.generation == 1 {
            (self.events)(Event::ChannelUp { id });
        }
        let result = self.receive(s, &a);
        let mut links = s.links.lock().unwrap();
        let link = &mut links[usize::from(id)];
        link.running = false;
        match result {
            Ok(()) => {}
            // Replaced: its successor takes over; this connection's end is no fault.
            Err(_) if !s.is_current(id, a.generation) => {}
            Err(e) if is_connection_fault(&e) && !s.resume_window.is_zero() && !self.ending() && !self.failure.is_failed() => {
                link.lost = Some((e, Instant::now()));
                s.stats[usize::from(id)].set_state(ChannelState::Lost);
            }
            Err(e) => {
                drop(links);
                self.failure.fail(e.context(format!("channel {id}")));
                links = s.links.lock().unwrap();
            }
        }
        drop(links);
        s.link_ended.notify_all();
    }

    fn receive(&self, s: &Session, a: &Admitted) -> Result<()> {
        let (id, conn) = (a.id, &*a.conn);
        let mut synced = a.synced;
        let stats = &s.stats[id as usize];
        let page = s.geometry.page_size() as usize;
        let mut buf = vec![0u8; s.geometry.header_len()];
        let mut header = PacketHeader::default();
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(s.geometry.page_count() as usize);
        let validator = PacketValidator { geometry: s.geometry, compression: s.compression, blocks: &s.table };
        let mut decompressor = crate::compress::decompressor(s.compression)?;
        let mut payload: Vec<u8> = Vec::new();
        let mut pages: Vec<u8> = Vec::new();
        let mut each: Vec<u64> = Vec::new();
        ChannelStats::add(&stats.bytes, INIT_PACKET_LEN as u64);
        loop {
            match conn.read_at_boundary(&mut buf[..COMMON_HEADER_LEN])? {
                Boundary::Data => {}
                // Idle between packets is fine (the source decides when to send); liveness of
                // an idle peer is the control connection's business.
                Boundary::Idle if !self.closing.load(Ordering::Acquire) => continue,
                Boundary::Idle | Boundary::Eof if self.finishing.load(Ordering::Acquire) => return Ok(()),
                Boundary::Idle => return Ok(()),
                Boundary::Eof => fail!(ConnectionClosed, "the source closed the channel before the migration completed"),
            }
            CommonHeader::decode(&buf[..COMMON_HEADER_LEN])?;
            if !conn.read_exact(&mut buf[COMMON_HEADER_LEN..])? {
                fail!(ConnectionClosed, "unexpected end of stream after a packet header's first {COMMON_HEADER_LEN} bytes");
            }
            let v = validator.decode(&buf, &mut header)?;
            if let Some(index) = v.block {
                let block = &s.table.blocks[index];
                let digests = s.digests.as_ref().map(|d| &*d.blocks[index]);
                block.zero_pages_at(header.zero_offsets())?;
                if let Some(d) = digests {
                    d.record_zero(header.zero_offsets());
                }
                let data = header.normal_offsets();
                if let Some(d) = decompressor.as_mut().filter(|_| header.normal_pages > 0) {
                    payload.resize(v.payload_len as usize, 0);
                    if !conn.read_exact(&mut payload)? {
                        fail!(ConnectionClosed, "unexpected end of stream before the packet's compressed payload");
                    }
                    if block.reserve_pages(data)? {
                        // Straight into the pages (a payload that decodes to more or fewer
                        // bytes fails without writing outside them).
                        iov.clear();
                        for &o in data {
                            block.received.set((o / page as u64) as usize);
                            block.push_page(&mut iov, 0, o);
                        }
                        // SAFETY: every iovec came from `push_page`, which checked the page lies
                        // in the block; the session holds an Arc to every block while this
                        // thread runs, and no Rust reference covers block memory.
                        d.decompress(&payload, &mut unsafe { WriteTarget::pages(&iov) }).map_err(|e| block.explain(e, false))?;
                        if let Some(d) = digests {
                            check_digest(&header, id, block.name(), crate::integrity::block_pages_digest(block, data, &mut each))?;
                            d.record(data, &each);
                        }
                    } else {
                        pages.resize(data.len() * page, 0);
                        d.decompress(&payload, &mut WriteTarget::buffer(&mut pages))?;
                        if digests.is_some() {
                            check_digest(&header, id, block.name(), crate::integrity::pages_digest(pages.chunks_exact(page), &mut each))?;
                        }
                        store_pages(block, data, &pages)?;
                        if let Some(d) = digests {
                            d.record(data, &each);
                        }
                    }
                    block.check_faults(false)?;
                    ChannelStats::add(&stats.normal_pages, u64::from(header.normal_pages));
                    ChannelStats::add(&stats.zero_pages, u64::from(header.zero_pages));
                    ChannelStats::add(&stats.bytes, (buf.len() + payload.len()) as u64);
                    ChannelStats::add(&stats.packets, 1);
                    if header.flags.is_sync() && !self.arrive(s, a, &mut synced, header.packet_num)? {
                        return Ok(());
                    }
                    continue;
                }
                if block.reserve_pages(data)? {
                    iov.clear();
                    for &o in data {
                        block.received.set((o / page as u64) as usize);
                        block.push_page(&mut iov, 0, o);
                    }
                    // SAFETY: every iovec came from `push_page`, which checked the page lies in
                    // the block; the session holds an Arc to every block while this thread runs.
                    if !iov.is_empty() && !unsafe { conn.readv_exact(&mut iov).map_err(|e| block.explain(e, false))? } {
                        fail!(ConnectionClosed, "unexpected end of stream before the packet's pages");
                    }
                    if let Some(d) = digests.filter(|_| !data.is_empty()) {
                        check_digest(&header, id, block.name(), crate::integrity::block_pages_digest(block, data, &mut each))?;
                        d.record(data, &each);
                    }
                } else {
                    // No `fallocate` on this filesystem: the pages go through a buffer and the
                    // file descriptor, which reports a full disk as an error.
                    pages.resize(data.len() * page, 0);
                    if !conn.read_exact(&mut pages)? {
                        fail!(ConnectionClosed, "unexpected end of stream before the packet's pages");
                    }
                    if digests.is_some() && !data.is_empty() {
                        check_digest(&header, id, block.name(), crate::integrity::pages_digest(pages.chunks_exact(page), &mut each))?;
                    }
                    store_pages(block, data, &pages)?;
                    if let Some(d) = digests.filter(|_| !data.is_empty()) {
                        d.record(data, &each);
                    }
                }
                block.check_faults(false)?;
                ChannelStats::add(&stats.normal_pages, u64::from(header.normal_pages));
                ChannelStats::add(&stats.zero_pages, u64::from(header.zero_pages));
            }
            ChannelStats::add(&stats.bytes, (buf.len() + header.normal_pages as usize * page) as u64);
            ChannelStats::add(&stats.packets, 1);
            if header.flags.is_sync() && !self.arrive(s, a, &mut synced, header.packet_num)? {
                return Ok(());
            }
        }
    }

    /// Channel `a.id` read a SYNC, its `synced + 1`th: counts its arrival at that barrier
    /// once (a replacement sends again SYNCs its predecessor may have delivered), then parks it
    /// until every channel has arrived. False when the channel was replaced meanwhile: its loop
    /// leaves without reading on.
    fn arrive(&self, s: &Session, a: &Admitted, synced: &mut u64, packet_num: u64) -> Result<bool> {
        *synced += 1;
        let k = *synced;
        let mut b = s.barrier.state.lock().unwrap();
        b.high_water = b.high_water.max(packet_num);
        let reached = b.reach(usize::from(a.id), k);
        if reached != Reach::Again {
            ChannelStats::add(&s.stats[usize::from(a.id)].syncs, 1);
        }
        if let Reach::Released(e) = reached {
            s.take_complete_pieces(e);
            let hw = b.high_water;
            drop(b);
            self.released(s, e, hw)?;
            return Ok(true);
        }
        while b.epoch < k {
            if b.stopping {
                return Err(self.failure.first().unwrap_or_else(|| Error::new(ErrorCode::Cancelled, "the destination is closing")));
            }
            if !s.is_current(a.id, a.generation) {
                return Ok(false);
            }
            b = s.barrier.cv.wait(b).unwrap();
        }
        Ok(true)
    }
}

impl Inner {
    /// Barrier `epoch` is released: wakes the channels parked there and acknowledges it.
    fn released(&self, s: &Session, epoch: u64, high_water: u64) -> Result<()> {
        s.barrier.cv.notify_all();
        // The orchestrator is told, not asked: the acknowledgement goes to the source from here,
        // whatever the JavaScript event loop is doing.
        (self.events)(Event::Synced { epoch, packet_num: high_water });
        let control = self.control.lock().unwrap().clone();
        // A control connection lost meanwhile is no reason to fail: its replacement's answer
        // acknowledges this sync.
        if let Some(c) = control
            && let Err(err) = c.send(&synced_frame(epoch, high_water))
            && !self.control_resumable()
        {
            return Err(err.context(format!("acknowledging sync {epoch}")));
        }
        Ok(())
    }
}

/// A fault of the connection itself (closed, reset, timed out), which the source repairs with
/// a replacement; anything else (a protocol error) fails the session.
fn is_connection_fault(e: &Error) -> bool {
    matches!(e.code, ErrorCode::ConnectionClosed | ErrorCode::Timeout)
}

/// Names the calling thread as `top` and `perf` show it (at most 15 bytes).
fn name_this_thread(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from a live buffer.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

/// Bytes the receive path has copied into blocks through a private buffer (pages of files
/// without `fallocate`): a diagnostic for tests that check the other paths make no such copy.
pub fn staged_bytes() -> u64 {
    STAGED_BYTES.load(Ordering::Relaxed)
}

static STAGED_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Writes one packet's decoded pages (`pages`, in the order of `offsets`) into `block`,
/// marking them received: one reservation per run of consecutive pages, then one copy each.
fn store_pages(block: &RamBlock, offsets: &[u64], pages: &[u8]) -> Result<()> {
    STAGED_BYTES.fetch_add(pages.len() as u64, Ordering::Relaxed);
    let page = block.page_size() as usize;
    block.reserve_pages(offsets)?;
    for (&o, data) in offsets.iter().zip(pages.chunks_exact(page)) {
        block.received.set(o as usize / page);
        block.store(o, data)?;
    }
    Ok(())
}

/// Fails with `ERR_MULTIFD_INTEGRITY`, naming channel, block and pages, unless the data pages
/// hash to the digest their header carries.
fn check_digest(header: &PacketHeader, channel: u8, block: &str, got: u64) -> Result<()> {
    if header.normal_pages == 0 {
        return Ok(());
    }
    if got != header.digest {
        let first = header.normal_offsets().first().copied().unwrap_or(0);
        fail!(
            Integrity,
            "channel {channel}, block {block:?}, packet {} ({} data pages from offset 0x{first:x}): data digest 0x{got:016x}, header says 0x{:016x}",
            header.packet_num,
            header.normal_pages,
            header.digest
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_barrier_counts_each_channel_once_per_epoch() {
        let mut b = BarrierState::new(2);
        assert_eq!(b.reach(0, 1), Reach::Counted);
        // Channel 0's replacement sends SYNC 1 again before channel 1 arrived: not a second
        // arrival (which would release the barrier without channel 1).
        assert_eq!(b.reach(0, 1), Reach::Again);
        assert_eq!(b.epoch, 0);
        assert_eq!(b.reach(1, 1), Reach::Released(1));
        // A replacement numbering from an older acknowledged epoch: everything up to what the
        // channel passed is a repeat.
        assert_eq!(b.reach(1, 1), Reach::Again);
        assert_eq!(b.reach(1, 2), Reach::Counted);
        assert_eq!(b.reach(1, 2), Reach::Again);
        assert_eq!(b.reach(0, 2), Reach::Released(2));
        assert_eq!((b.epoch, b.arrived), (2, 0));
    }

    #[test]
    fn a_dropped_channel_no_longer_holds_the_barrier() {
        let mut b = BarrierState::new(3);
        assert_eq!(b.reach(0, 1), Reach::Counted);
        assert_eq!(b.reach(2, 1), Reach::Counted);
        // Channel 2 arrived, then is dropped: its arrival no longer counts, nor is it awaited.
        assert_eq!(b.drop_channel(2), Reach::Counted);
        assert_eq!(b.reach(1, 1), Reach::Released(1));
        assert_eq!(b.reach(0, 2), Reach::Counted);
        // Dropping the last one missing releases the barrier.
        assert_eq!(b.drop_channel(1), Reach::Released(2));
        assert_eq!(b.drop_channel(1), Reach::Again);
        assert_eq!(b.reach(0, 3), Reach::Released(3), "one live channel: each arrival releases");
    }
}
