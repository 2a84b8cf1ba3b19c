//! A migration destination for a stock QEMU 10 source: accepts the main channel and the
//! multifd channels on one listener (told apart by their first four bytes), follows the main
//! stream and applies the channels' pages in QEMU's order of flushes and SYNCs, into a
//! mapped-ram file and/or raw block images ([`PageSink`]).

use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::barrier::SyncBarrier;
use super::{ChannelTotals, PageSink, PeerProgress};
use crate::compress;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::io::Boundary;
use crate::qemu_stream::{self, CMD_SWITCHOVER_START, FILE_MAGIC, RamBlockEntry, StreamReader, Top, kind, limits, ram_flag};
use crate::session::{ChannelStats, Failure};
use crate::transport::{Address, Conn, Listener, Socket};
use crate::wire::{self, BlockInfo, Compression, Geometry, InitPacket, PacketHeader, PacketValidator};

/// What `recv --qemu` writes and how long it waits.
#[derive(Debug, Clone)]
pub struct RecvOptions {
    /// The mapped-ram file to write (renamed into place when complete).
    pub to: Option<PathBuf>,
    /// A directory for one raw image per RAM block.
    pub out_dir: Option<PathBuf>,
    /// The source's `multifd-channels`; found out at the first flush when not given.
    pub channels: Option<u32>,
    /// How long a connection may stay silent, and a sync wait last.
    pub peer_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RecvSummary {
    pub machine: String,
    pub blocks: Vec<RamBlockEntry>,
    /// Pages holding data per block, in block order.
    pub pages_present: Vec<u64>,
    pub main_bytes: u64,
    /// Pages the main channel carried itself (a source without multifd): with data, zero.
    pub main_pages: u64,
    pub main_zero_pages: u64,
    pub per_channel: Vec<ChannelTotals>,
    /// Flushes (sync rounds) the main stream carried.
    pub flushes: u64,
    /// Bytes of device state and VM description carried through.
    pub device_state_bytes: u64,
    pub compression: Compression,
    pub seconds: f64,
    pub to: Option<PathBuf>,
}

/// A bound listener waiting for one QEMU source. The listener closes when the run ends.
pub struct QemuReceiver {
    listener: std::sync::Mutex<Option<Listener>>,
    address: Address,
    progress: Arc<PeerProgress>,
    failure: Arc<Failure>,
}

/// Cancels a running receive from another thread.
#[derive(Clone)]
pub struct Canceller(Arc<Failure>);

impl Canceller {
    pub(crate) fn from_failure(f: Arc<Failure>) -> Canceller {
        Canceller(f)
    }

    pub fn cancel(&self) {
        self.0.fail(Error::new(ErrorCode::Cancelled, "the receive was cancelled"));
    }
}

/// The main channel as a byte source, counting what it reads.
struct MainReader {
    conn: Arc<Conn>,
    progress: Arc<PeerProgress>,
}

impl Read for MainReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match self.conn.socket() {
            Socket::Tcp(s) => (&*s).read(buf)?,
            Socket::Unix(s) => (&*s).read(buf)?,
        };
        self.progress.main_bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Connections accepted so far.
struct Accepted {
    main: Option<Arc<Conn>>,
    channels: Vec<Option<Arc<Conn>>>,
    uuid: Option<[u8; 16]>,
}

impl Accepted {
    fn count(&self) -> usize {
        self.channels.iter().filter(|c| c.is_some()).count()
    }
}

impl QemuReceiver {
    pub fn bind(address: &Address) -> Result<QemuReceiver> {
        let listener = Listener::bind(address)?;
        let address = listener.local_address()?;
        Ok(QemuReceiver { listener: std::sync::Mutex::new(Some(listener)), address, progress: Arc::default(), failure: Failure::new(Arc::new(|_| {})) })
    }

    /// The address QEMU should migrate to (with the real port when bound to port 0).
    pub fn address(&self) -> &Address {
        &self.address
    }

    pub fn progress(&self) -> Arc<PeerProgress> {
        self.progress.clone()
    }

    pub fn canceller(&self) -> Canceller {
        Canceller(self.failure.clone())
    }

    /// Reads the first bytes of a new connection and files it as the main channel or a
    /// multifd channel (init packet checked: magic, version, one UUID for all, id unused).
    fn classify(&self, conn: Conn, acc: &mut Accepted, timeout: Duration) -> Result<()> {
        conn.set_peer_timeout(timeout)?;
        let conn = Arc::new(conn);
        self.failure.watch(conn.clone());
        let mut magic = [0u8; 4];
        if !conn.read_exact(&mut magic)? {
            fail!(ConnectionClosed, "a connection closed before sending anything");
        }
        match u32::from_be_bytes(magic) {
            FILE_MAGIC => {
                if acc.main.is_some() {
                    fail!(UnknownChannel, "a second main migration channel ('QEVM') connected");
                }
                acc.main = Some(conn);
            }
            wire::MAGIC => {
                let mut init = [0u8; wire::INIT_PACKET_LEN];
                init[..4].copy_from_slice(&magic);
                if !conn.read_exact(&mut init[4..])? {
                    fail!(ConnectionClosed, "a multifd channel closed inside its init packet");
                }
                let p = InitPacket::decode(&init)?;
                if *acc.uuid.get_or_insert(p.uuid) != p.uuid {
                    fail!(UuidMismatch, "multifd channel {} announces another VM UUID than the channels before it", p.channel_id);
                }
                let id = usize::from(p.channel_id);
                if acc.channels.len() <= id {
                    acc.channels.resize(id + 1, None);
                }
                if acc.channels[id].is_some() {
                    fail!(ChannelDuplicate, "multifd channel id {id} connected twice");
                }
                acc.channels[id] = Some(conn);
            }
            other => fail!(UnknownChannel, "a connection starts with {other:#010x}: neither QEMU's main channel ('QEVM') nor a multifd channel (0x11223344)"),
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        match self.failure.first() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs the whole receive. On failure nothing is left at `to` (the temporary file is
    /// removed) and the first error is returned.
    pub fn run(&self, opts: &RecvOptions) -> Result<RecvSummary> {
        let Some(listener) = self.listener.lock().unwrap().take() else {
            fail!(State, "this receiver already ran");
        };
        let r = self.run_inner(&listener, opts);
        drop(listener);
        if let Err(e) = &r {
            self.failure.fail(e.clone());
        }
        self.failure.release_connections();
        r.map_err(|e| self.failure.first().unwrap_or(e))
    }

    fn run_inner(&self, listener: &Listener, opts: &RecvOptions) -> Result<RecvSummary> {
        if opts.to.is_none() && opts.out_dir.is_none() {
            fail!(InvalidArgument, "recv --qemu needs --to FILE or --out DIR");
        }
        let mut acc = Accepted { main: None, channels: Vec::new(), uuid: None };
        // QEMU connects the main channel and its multifd channels in any order.
        let main = loop {
            self.check()?;
            if let Some(conn) = listener.accept_timeout(Duration::from_millis(200))? {
                self.classify(conn, &mut acc, opts.peer_timeout)?;
            }
            if let Some(m) = &acc.main {
                break m.clone();
            }
        };
        let started = Instant::now();
        let reader = MainReader { conn: main, progress: self.progress.clone() };
        let mut r = StreamReader::new(BufReader::with_capacity(256 << 10, std::io::Cursor::new(FILE_MAGIC.to_be_bytes()).chain(reader)));
        r.header()?;
        let (config, next) = r.configuration()?;
        if let Some(c) = config.capabilities.first() {
            fail!(QemuStream, "the source runs with capability '{c}', which a network destination here does not support (the configuration lists {:?})", config.capabilities);
        }
        let page_size = config.page_size();
        let geometry = Geometry::new(page_size as u32)?;
        let ram_id = match r.top_after(next)? {
            Top::Start { full: false, id, name, version, .. } if name == "ram" => {
                if version != qemu_stream::RAM_SECTION_VERSION {
                    fail!(BadVersion, "RAM section version {version}, this implementation knows {}", qemu_stream::RAM_SECTION_VERSION);
                }
                id
            }
            Top::Start { name, .. } => fail!(QemuStream, "section '{name}' comes before the RAM section: only RAM is supported as an iterable section"),
            Top::Command { cmd, .. } => fail!(QemuStream, "command {cmd:#x} before the RAM section (postcopy or a return path?) is not supported"),
            other => fail!(QemuStream, "expected the RAM section to start, found {other:?}"),
        };
        let word = r.ram_word(page_size)?;
        if word.flags != ram_flag::MEM_SIZE {
            fail!(QemuStream, "the RAM section starts with flags {:#x}, expected RAM_SAVE_FLAG_MEM_SIZE (0x4)", word.flags);
        }
        let blocks = r.block_list(word.addr, page_size)?;
        self.progress.total.store(word.addr, Ordering::Relaxed);
        let sink = Arc::new(PageSink::create(opts.to.as_deref(), opts.out_dir.as_deref(), &config, ram_id, &blocks)?);

        let mut main = MainLoop { rx: self, listener, opts, sink: sink.clone(), geometry, acc, barrier: None, threads: Vec::new(), compression: Arc::new(OnceLock::new()), last_block: None, page: vec![0; page_size as usize] };
        let result = main.follow(&mut r, ram_id);
        let threads = std::mem::take(&mut main.threads);
        if let Err(e) = &result {
            self.failure.fail(e.clone());
        }
        let mut errors = Vec::new();
        for t in threads {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => errors.push(e),
                Err(_) => errors.push(Error::new(ErrorCode::Io, "a channel thread panicked")),
            }
        }
        let (commands, tail) = result?;
        if let Some(e) = errors.into_iter().next() {
            return Err(e);
        }
        let flushes = main.barrier.as_ref().map_or(0, |b| b.flushes());
        let compression = main.compression.get().copied().unwrap_or_default();
        drop(main);

        // The file's stream after the block list: the RAM section's end (its pages are all in
        // the mapped regions), the commands QEMU sent, then device state as received.
        let mut trailer = Vec::with_capacity(tail.len() + 64);
        qemu_stream::encode_ram_word(&mut trailer, ram_flag::EOS);
        qemu_stream::encode_footer(&mut trailer, ram_id);
        for (cmd, data) in &commands {
            qemu_stream::encode_command(&mut trailer, *cmd, data);
        }
        qemu_stream::encode_section_part(&mut trailer, kind::SECTION_END, ram_id);
        qemu_stream::encode_ram_word(&mut trailer, ram_flag::EOS);
        qemu_stream::encode_footer(&mut trailer, ram_id);
        trailer.extend_from_slice(&tail);
        let sink = Arc::try_unwrap(sink).map_err(|_| Error::new(ErrorCode::State, "a channel still holds the output"))?;
        let pages_present = sink.pages_present();
        sink.finish(&trailer)?;
        Ok(RecvSummary {
            machine: config.machine,
            blocks,
            pages_present,
            main_bytes: self.progress.main_bytes.load(Ordering::Relaxed),
            main_pages: self.progress.main_pages.load(Ordering::Relaxed),
            main_zero_pages: self.progress.main_zero_pages.load(Ordering::Relaxed),
            per_channel: self.progress.per_channel(),
            flushes,
            device_state_bytes: tail.len() as u64,
            compression,
            seconds: started.elapsed().as_secs_f64(),
            to: opts.to.clone(),
        })
    }
}

/// A `QEMU_VM_COMMAND` kept for the file: command and payload.
type Command = (u16, Vec<u8>);

type Stream = StreamReader<BufReader<std::io::Chain<std::io::Cursor<[u8; 4]>, MainReader>>>;

/// The main thread's state while it follows the stream.
struct MainLoop<'a> {
    rx: &'a QemuReceiver,
    listener: &'a Listener,
    opts: &'a RecvOptions,
    sink: Arc<PageSink>,
    geometry: Geometry,
    acc: Accepted,
    barrier: Option<Arc<SyncBarrier>>,
    threads: Vec<JoinHandle<Result<()>>>,
    compression: Arc<OnceLock<Compression>>,
    /// The block of the last page record (`RAM_SAVE_FLAG_CONTINUE` refers to it).
    last_block: Option<usize>,
    page: Vec<u8>,
}

impl MainLoop<'_> {
    /// Everything after the block list: RAM section parts up to its END, the commands
    /// between them, then the device state up to the end of the stream.
    fn follow(&mut self, r: &mut Stream, ram_id: u32) -> Result<(Vec<Command>, Vec<u8>)> {
        let mut commands = Vec::new();
        self.ram_records(r)?;
        r.footer(ram_id)?;
        loop {
            match r.top()? {
                Top::Part { id, end } if id == ram_id => {
                    self.ram_records(r)?;
                    r.footer(ram_id)?;
                    if end {
                        break;
                    }
                }
                Top::Command { cmd: CMD_SWITCHOVER_START, data } if data.is_empty() => commands.push((CMD_SWITCHOVER_START, data)),
                Top::Command { cmd, .. } => fail!(QemuStream, "command {cmd:#x} at byte {} is not supported (only the switchover command 0xb is)", r.pos()),
                Top::Start { name, full, .. } => fail!(QemuStream, "section '{name}' ({}) at byte {} before the RAM section ended: only RAM is supported as an iterable section", if full { "full" } else { "start" }, r.pos()),
                Top::Part { id, .. } => fail!(QemuStream, "a part of section {id} at byte {}: only the RAM section ({ram_id}) is iterable here", r.pos()),
                Top::Eof => fail!(Truncated, "the stream ended at byte {} before the RAM section did", r.pos()),
            }
        }
        let tail = r.rest(limits::MAX_DEVICE_STATE, "the device state")?;
        qemu_stream::split_device_tail(&tail)?;
        // A channel that connected after the count was taken (a handshake held up on a lossy
        // network) carried pages nobody read: never a file that silently lacks them.
        if self.barrier.is_some() && self.opts.channels.is_none() && self.listener.accept_timeout(Duration::ZERO)?.is_some() {
            fail!(ChannelCountMismatch, "a connection arrived after the first flush, when the {} multifd channel(s) were counted; give --channels N (the source's multifd-channels)", self.acc.channels.len());
        }
        Ok((commands, tail))
    }

    /// RAM records up to `RAM_SAVE_FLAG_EOS`.
    fn ram_records(&mut self, r: &mut Stream) -> Result<()> {
        let ps = self.sink.page_size();
        loop {
            let at = r.pos();
            let w = r.ram_word(ps)?;
            if !qemu_stream::reader::known_ram_flags(w.flags) {
                fail!(QemuStream, "RAM flags {:#x} at byte {at} are not supported (xbzrle, compression threads and RDMA hooks are not)", w.flags);
            }
            match w.flags {
                ram_flag::EOS => return Ok(()),
                ram_flag::MULTIFD_FLUSH => self.flush()?,
                f if f & !ram_flag::CONTINUE == ram_flag::ZERO || f & !ram_flag::CONTINUE == ram_flag::PAGE => {
                    let block = if f & ram_flag::CONTINUE != 0 {
                        self.last_block.ok_or_else(|| Error::new(ErrorCode::QemuStream, format!("a page at byte {at} continues a block but none came before")))?
                    } else {
                        let name = r.idstr("RAM block name")?;
                        self.sink.blocks().iter().position(|b| b.name == name).ok_or_else(|| Error::new(ErrorCode::UnknownBlock, format!("a page at byte {at} names block '{name}', which is not in the block list")))?
                    };
                    self.last_block = Some(block);
                    let used = self.sink.blocks()[block].used_len;
                    if w.addr >= used {
                        fail!(OffsetRange, "page offset {:#x} at byte {at} is outside block '{}' ({used:#x} bytes)", w.addr, self.sink.blocks()[block].name);
                    }
                    if f & ram_flag::ZERO != 0 {
                        let fill = r.u8("zero page fill byte")?;
                        if fill != 0 {
                            fail!(QemuStream, "a 'zero' page at byte {at} is filled with {fill:#04x}");
                        }
                        self.sink.zero(block, w.addr)?;
                        self.rx.progress.main_zero_pages.fetch_add(1, Ordering::Relaxed);
                    } else {
                        r.fill(&mut self.page, "page data")?;
                        self.sink.data(block, w.addr, &self.page)?;
                        self.rx.progress.main_pages.fetch_add(1, Ordering::Relaxed);
                    }
                }
                f => fail!(QemuStream, "RAM flags {f:#x} at byte {at} where pages, a flush or the end of the section belong"),
            }
        }
    }

    /// `RAM_SAVE_FLAG_MULTIFD_FLUSH`: the channel threads start at the first one (every
    /// channel is connected by then: QEMU connects them all before its first flush), then
    /// every flush waits for one SYNC per channel.
    fn flush(&mut self) -> Result<()> {
        if self.barrier.is_none() {
            self.start_channels()?;
        }
        self.barrier.as_ref().unwrap().flush(self.opts.peer_timeout)
    }

    fn start_channels(&mut self) -> Result<()> {
        let rx = self.rx;
        let deadline = Instant::now() + self.opts.peer_timeout;
        match self.opts.channels {
            Some(n) => {
                while self.acc.count() < n as usize {
                    rx.check()?;
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        fail!(Timeout, "{} of the {n} multifd channels connected within {} ms", self.acc.count(), self.opts.peer_timeout.as_millis());
                    }
                    if let Some(c) = self.listener.accept_timeout(left.min(Duration::from_millis(200)))? {
                        rx.classify(c, &mut self.acc, self.opts.peer_timeout)?;
                    }
                }
            }
            None => {
                // Whatever is waiting in the listen queue: QEMU connected every channel before
                // it wrote the flush that got us here.
                while let Some(c) = self.listener.accept_timeout(Duration::ZERO)? {
                    rx.classify(c, &mut self.acc, self.opts.peer_timeout)?;
                }
            }
        }
        let n = self.acc.channels.len();
        if n == 0 {
            fail!(QemuStream, "the main stream flushes multifd channels, but none connected");
        }
        if let Some(missing) = self.acc.channels.iter().position(|c| c.is_none()) {
            fail!(ChannelIdRange, "multifd channels up to id {} connected, but channel {missing} did not", n - 1);
        }
        if self.opts.channels.is_some_and(|want| want as usize != n) {
            fail!(ChannelCountMismatch, "{n} multifd channels connected, --channels says {}", self.opts.channels.unwrap());
        }
        let barrier = Arc::new(SyncBarrier::new(n));
        {
            let b = barrier.clone();
            rx.failure.on_failure(move || b.fail());
        }
        let table: Arc<Vec<BlockInfo>> = Arc::new(self.sink.blocks().iter().map(|b| BlockInfo { name: b.name.as_bytes().to_vec(), length: b.used_len }).collect());
        for (id, conn) in self.acc.channels.iter().enumerate() {
            let stats = Arc::new(ChannelStats::default());
            ChannelStats::add(&stats.bytes, wire::INIT_PACKET_LEN as u64);
            rx.progress.channels.lock().unwrap().push(stats.clone());
            let ch = ChannelRx {
                id,
                conn: conn.clone().unwrap(),
                geometry: self.geometry,
                table: table.clone(),
                sink: self.sink.clone(),
                barrier: barrier.clone(),
                stats,
                compression: self.compression.clone(),
                timeout: self.opts.peer_timeout,
            };
            let failure = rx.failure.clone();
            let t = std::thread::Builder::new()
                .name(format!("multifd/qemu-rx{id}"))
                .spawn(move || {
                    let r = ch.run().map_err(|e| e.context(format_args!("multifd channel {id}")));
                    ch.barrier.close(id);
                    if let Err(e) = &r {
                        failure.fail(e.clone());
                    }
                    r
                })
                .map_err(|e| Error::new(ErrorCode::Io, format!("spawn a channel thread: {e}")))?;
            self.threads.push(t);
        }
        self.barrier = Some(barrier);
        Ok(())
    }
}

/// One multifd channel's receive loop.
struct ChannelRx {
    id: usize,
    conn: Arc<Conn>,
    geometry: Geometry,
    table: Arc<Vec<BlockInfo>>,
    sink: Arc<PageSink>,
    barrier: Arc<SyncBarrier>,
    stats: Arc<ChannelStats>,
    /// The method of the first data packet of any channel: every packet must use it.
    compression: Arc<OnceLock<Compression>>,
    timeout: Duration,
}

impl ChannelRx {
    fn run(&self) -> Result<()> {
        let page = u64::from(self.geometry.page_size());
        let mut hdr = vec![0u8; self.geometry.header_len()];
        let mut header = PacketHeader::default();
        let mut payload = vec![0u8; wire::MAX_COMPRESSED_PAYLOAD as usize];
        let mut pages = vec![0u8; wire::PACKET_SIZE as usize];
        let mut decompressor: Option<Box<dyn compress::Decompressor>> = None;
        let mut idle = Instant::now();
        loop {
            match self.conn.read_at_boundary(&mut hdr)? {
                Boundary::Eof => return Ok(()),
                Boundary::Idle => {
                    // Channels rest while the main stream carries device state; a source
                    // that is gone closes the connection (or TCP's keepalive gives up).
                    if idle.elapsed() > self.timeout * 4 {
                        fail!(Timeout, "no packet for {} ms", (self.timeout * 4).as_millis());
                    }
                    continue;
                }
                Boundary::Data => idle = Instant::now(),
            }
            header.decode_into(&hdr, self.geometry)?;
            let method = if header.has_pages() {
                let m = header.flags.method()?;
                *self.compression.get_or_init(|| m)
            } else {
                self.compression.get().copied().unwrap_or_default()
            };
            let v = PacketValidator { geometry: self.geometry, compression: method, blocks: self.table.as_slice() }.validate(&header)?;
            let len = v.payload_len as usize;
            let normal = header.normal_pages as usize;
            let raw_len = normal * page as usize;
            if len > 0 && !self.conn.read_exact(&mut payload[..len])? {
                fail!(ConnectionClosed, "the channel closed before packet {}'s payload", header.packet_num);
            }
            let data: &[u8] = if method == Compression::None || normal == 0 {
                &payload[..len]
            } else {
                let d = match &mut decompressor {
                    Some(d) => d,
                    None => decompressor.insert(compress::decompressor(method)?.expect("a compression method has a decompressor")),
                };
                d.decompress(&payload[..len], &mut crate::memory::WriteTarget::buffer(&mut pages[..raw_len]))?;
                &pages[..raw_len]
            };
            if let Some(block) = v.block {
                // Runs of consecutive offsets go out in one write.
                let offs = header.normal_offsets();
                let mut i = 0;
                while i < offs.len() {
                    let mut j = i + 1;
                    while j < offs.len() && offs[j] == offs[j - 1] + page {
                        j += 1;
                    }
                    self.sink.data(block, offs[i], &data[i * page as usize..j * page as usize])?;
                    i = j;
                }
                for &z in header.zero_offsets() {
                    self.sink.zero(block, z)?;
                }
            }
            ChannelStats::add(&self.stats.bytes, (hdr.len() + len) as u64);
            ChannelStats::add(&self.stats.packets, 1);
            ChannelStats::add(&self.stats.normal_pages, u64::from(header.normal_pages));
            ChannelStats::add(&self.stats.zero_pages, u64::from(header.zero_pages));
            if header.flags.is_sync() {
                ChannelStats::add(&self.stats.syncs, 1);
                self.barrier.arrive(self.id, self.timeout)?;
            }
        }
    }
}

impl std::fmt::Debug for QemuReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuReceiver").field("address", &self.address).finish()
    }
}
