//! Plays a QEMU mapped-ram migration file into a stock QEMU 10 destination (`-incoming`
//! with the multifd capability): the main stream QEMU expects (header, configuration without
//! mapped-ram, the RAM block list, a flush), every page over N multifd channels between two
//! SYNCs, then the RAM section's end with its flush and the file's device state as it is.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{ChannelTotals, PeerProgress};
use crate::compress;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::qemu_file::QemuFile;
use crate::qemu_stream::{self, Configuration, RamBlockEntry, StreamReader, Top, kind, limits, ram_flag};
use crate::session::{ChannelStats, Failure};
use crate::transport::{Address, Conn};
use crate::wire::{self, Compression, Geometry, InitPacket, PacketHeader};

#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The destination's `multifd-channels`.
    pub channels: u32,
    /// The destination's `multifd-compression`.
    pub compression: Compression,
    pub level: Option<u32>,
    pub connect_timeout: Duration,
    pub peer_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SendSummary {
    pub machine: String,
    pub blocks: Vec<RamBlockEntry>,
    pub main_bytes: u64,
    pub per_channel: Vec<ChannelTotals>,
    pub device_state_bytes: u64,
    pub seconds: f64,
}

/// What the file holds besides its pages, ready to send.
struct Plan {
    config: Configuration,
    ram_id: u32,
    blocks: Vec<(RamBlockEntry, crate::mapped_ram::BlockHeader)>,
    commands: Vec<(u16, Vec<u8>)>,
    tail: Vec<u8>,
}

fn io(e: std::io::Error, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::Io, format!("{what}: {e}"))
}

/// Reads the parts of a mapped-ram file that are not pages: configuration, RAM section id,
/// block layout, the commands in the RAM section's tail and the device state after it.
fn plan(path: &Path) -> Result<Plan> {
    let qf = QemuFile::open(path)?;
    if !qf.is_complete() {
        fail!(Incomplete, "{} is not a complete QEMU save: its RAM section does not end", path.display());
    }
    if qf.blocks().iter().any(|b| b.ignored) || qf.capabilities().iter().any(|c| c != "mapped-ram") {
        fail!(QemuStream, "{} was saved with capabilities {:?}: only mapped-ram can be played to a QEMU destination", path.display(), qf.capabilities());
    }
    let file = File::open(path).map_err(|e| io(e, format_args!("open {}", path.display())))?;
    let mut r = StreamReader::new(BufReader::new(&file));
    r.header()?;
    let (mut config, next) = r.configuration()?;
    config.capabilities.clear();
    let ram_id = match r.top_after(next)? {
        Top::Start { full: false, id, name, .. } if name == "ram" => id,
        other => fail!(QemuStream, "expected the RAM section after the configuration, found {other:?}"),
    };
    let blocks: Vec<_> = qf.blocks().iter().map(|b| (RamBlockEntry { name: b.name.clone(), used_len: b.used_len }, b.header)).collect();
    if blocks.iter().any(|(b, h)| h.page_size != config.page_size() || b.name.len() > wire::MAX_BLOCK_NAME) {
        fail!(QemuStream, "{}: a block's page size differs from the target's {} bytes", path.display(), config.page_size());
    }
    let resume = blocks.iter().map(|(b, h)| h.end(b.used_len)).max().unwrap_or(0);
    let mut f = &file;
    f.seek(SeekFrom::Start(resume)).map_err(|e| io(e, "seek"))?;
    let mut r = StreamReader::new(BufReader::new(f));
    let ps = config.page_size();
    let records = |r: &mut StreamReader<BufReader<&File>>| -> Result<()> {
        loop {
            match r.ram_word(ps)?.flags {
                ram_flag::EOS => return r.footer(ram_id),
                ram_flag::MULTIFD_FLUSH => {}
                f => fail!(QemuStream, "RAM flags {f:#x} in the tail of a mapped-ram file"),
            }
        }
    };
    records(&mut r)?;
    let mut commands = Vec::new();
    loop {
        match r.top()? {
            Top::Part { id, end } if id == ram_id => {
                records(&mut r)?;
                if end {
                    break;
                }
            }
            Top::Command { cmd, data } => commands.push((cmd, data)),
            other => fail!(QemuStream, "{other:?} before the end of the RAM section"),
        }
    }
    let tail = r.rest(limits::MAX_DEVICE_STATE, "the device state")?;
    qemu_stream::split_device_tail(&tail)?;
    Ok(Plan { config, ram_id, blocks, commands, tail })
}

/// Hands out the pages to send, a packet's worth (within one block) at a time.
struct Work {
    next: Mutex<(usize, u64)>,
    pages_per_packet: u64,
}

impl Work {
    fn take(&self, blocks: &[(RamBlockEntry, crate::mapped_ram::BlockHeader)]) -> Option<(usize, u64, u64)> {
        let mut g = self.next.lock().unwrap();
        loop {
            let (b, page) = *g;
            let (entry, h) = blocks.get(b)?;
            let pages = entry.used_len / h.page_size;
            if page < pages {
                let n = (pages - page).min(self.pages_per_packet);
                *g = (b, page + n);
                return Some((b, page, n));
            }
            *g = (b + 1, 0);
        }
    }
}

pub struct QemuSender {
    progress: Arc<PeerProgress>,
    failure: Arc<Failure>,
}

impl Default for QemuSender {
    fn default() -> Self {
        QemuSender { progress: Arc::default(), failure: Failure::new(Arc::new(|_| {})) }
    }
}

impl QemuSender {
    pub fn progress(&self) -> Arc<PeerProgress> {
        self.progress.clone()
    }

    pub fn canceller(&self) -> super::recv::Canceller {
        super::recv::Canceller::from_failure(self.failure.clone())
    }

    pub fn run(&self, path: &Path, address: &Address, opts: &SendOptions) -> Result<SendSummary> {
        let r = self.run_inner(path, address, opts);
        if let Err(e) = &r {
            self.failure.fail(e.clone());
        }
        self.failure.release_connections();
        r.map_err(|e| self.failure.first().unwrap_or(e))
    }

    fn connect(&self, address: &Address, opts: &SendOptions) -> Result<Arc<Conn>> {
        let c = Arc::new(Conn::connect(address, opts.connect_timeout)?);
        c.set_peer_timeout(opts.peer_timeout)?;
        self.failure.watch(c.clone());
        Ok(c)
    }

    fn run_inner(&self, path: &Path, address: &Address, opts: &SendOptions) -> Result<SendSummary> {
        if !(1..=255).contains(&opts.channels) {
            fail!(InvalidArgument, "--channels must be 1..255, got {}", opts.channels);
        }
        let plan = plan(path)?;
        compress::compressor(opts.compression, opts.level)?;
        let geometry = Geometry::new(plan.config.page_size() as u32)?;
        self.progress.total.store(plan.blocks.iter().map(|(b, _)| b.used_len).sum(), Ordering::Relaxed);
        let started = Instant::now();

        let mut head = Vec::new();
        qemu_stream::encode_header(&mut head);
        plan.config.encode(&mut head);
        let entries: Vec<RamBlockEntry> = plan.blocks.iter().map(|(b, _)| b.clone()).collect();
        qemu_stream::encode_ram_start(&mut head, plan.ram_id, &entries);
        qemu_stream::encode_ram_word(&mut head, ram_flag::MULTIFD_FLUSH);
        qemu_stream::encode_ram_word(&mut head, ram_flag::EOS);
        qemu_stream::encode_footer(&mut head, plan.ram_id);
        let main = self.connect(address, opts)?;
        main.write_all(&[&head])?;
        self.progress.main_bytes.fetch_add(head.len() as u64, Ordering::Relaxed);

        let uuid = plan.config.uuid.unwrap_or([0; 16]);
        let file = Arc::new(File::open(path).map_err(|e| io(e, format_args!("open {}", path.display())))?);
        let blocks = Arc::new(plan.blocks.clone());
        let work = Arc::new(Work { next: Mutex::new((0, 0)), pages_per_packet: u64::from(geometry.page_count()) });
        let packet_num = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for id in 0..opts.channels {
            let conn = self.connect(address, opts)?;
            conn.write_all(&[&InitPacket { uuid, channel_id: id as u8 }.encode()])?;
            let stats = Arc::new(ChannelStats::default());
            ChannelStats::add(&stats.bytes, wire::INIT_PACKET_LEN as u64);
            self.progress.channels.lock().unwrap().push(stats.clone());
            let ch = ChannelTx { conn, geometry, compressor: compress::compressor(opts.compression, opts.level)?, compression: opts.compression, file: file.clone(), blocks: blocks.clone(), work: work.clone(), packet_num: packet_num.clone(), stats };
            let failure = self.failure.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("multifd/qemu-tx{id}"))
                    .spawn(move || {
                        let r = ch.run().map_err(|e| e.context(format_args!("multifd channel {id}")));
                        if let Err(e) = &r {
                            failure.fail(e.clone());
                        }
                        r
                    })
                    .map_err(|e| Error::new(ErrorCode::Io, format!("spawn a channel thread: {e}")))?,
            );
        }
        let mut first = None;
        for t in threads {
            let r = t.join().unwrap_or_else(|_| Err(Error::new(ErrorCode::Io, "a channel thread panicked")));
            if let (Err(e), None) = (r, &first) {
                first = Some(e);
            }
        }
        if let Some(e) = first {
            return Err(e);
        }

        let mut end = Vec::with_capacity(plan.tail.len() + 64);
        for (cmd, data) in &plan.commands {
            qemu_stream::encode_command(&mut end, *cmd, data);
        }
        qemu_stream::encode_section_part(&mut end, kind::SECTION_END, plan.ram_id);
        qemu_stream::encode_ram_word(&mut end, ram_flag::MULTIFD_FLUSH);
        qemu_stream::encode_ram_word(&mut end, ram_flag::EOS);
        qemu_stream::encode_footer(&mut end, plan.ram_id);
        end.extend_from_slice(&plan.tail);
        main.write_all(&[&end])?;
        self.progress.main_bytes.fetch_add(end.len() as u64, Ordering::Relaxed);
        Ok(SendSummary {
            machine: plan.config.machine,
            blocks: entries,
            main_bytes: self.progress.main_bytes.load(Ordering::Relaxed),
            per_channel: self.progress.per_channel(),
            device_state_bytes: plan.tail.len() as u64,
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// One multifd channel: a SYNC, packets until the work runs out, a SYNC.
struct ChannelTx {
    conn: Arc<Conn>,
    geometry: Geometry,
    compressor: Option<Box<dyn compress::Compressor>>,
    compression: Compression,
    file: Arc<File>,
    blocks: Arc<Vec<(RamBlockEntry, crate::mapped_ram::BlockHeader)>>,
    work: Arc<Work>,
    packet_num: Arc<AtomicU64>,
    stats: Arc<ChannelStats>,
}

impl ChannelTx {
    fn sync(&self, hdr: &mut [u8]) -> Result<()> {
        PacketHeader::sync(self.packet_num.fetch_add(1, Ordering::Relaxed)).encode_into(self.geometry, hdr)?;
        self.conn.write_all(&[hdr])?;
        ChannelStats::add(&self.stats.bytes, hdr.len() as u64);
        ChannelStats::add(&self.stats.packets, 1);
        ChannelStats::add(&self.stats.syncs, 1);
        Ok(())
    }

    fn run(mut self) -> Result<()> {
        let ps = u64::from(self.geometry.page_size());
        let mut hdr = vec![0u8; self.geometry.header_len()];
        let mut buf = vec![0u8; wire::PACKET_SIZE as usize];
        let mut out = Vec::new();
        let (mut normal, mut zero) = (Vec::new(), Vec::new());
        self.sync(&mut hdr)?;
        while let Some((b, first, n)) = self.work.take(&self.blocks) {
            let (entry, h) = &self.blocks[b];
            // The bitmap words of these pages (first is a multiple of 64: packets are 128 pages).
            let mut bits = [0u8; 16];
            let words = n.div_ceil(64) as usize;
            self.file.read_exact_at(&mut bits[..words * 8], h.bitmap_offset + first / 8).map_err(|e| io(e, format_args!("read the bitmap of block '{}'", entry.name)))?;
            let present = |i: u64| bits[(i / 8) as usize] & (1 << (i % 8)) != 0;
            normal.clear();
            zero.clear();
            if let (Some(lo), Some(hi)) = ((0..n).find(|&i| present(i)), (0..n).rev().find(|&i| present(i))) {
                let span = &mut buf[(lo * ps) as usize..((hi + 1) * ps) as usize];
                self.file.read_exact_at(span, h.pages_offset + (first + lo) * ps).map_err(|e| io(e, format_args!("read pages of block '{}'", entry.name)))?;
            }
            for i in 0..n {
                let off = (first + i) * ps;
                if present(i) && !is_zero(&buf[(i * ps) as usize..((i + 1) * ps) as usize]) {
                    normal.push(off);
                } else {
                    zero.push(off);
                }
            }
            let page = |off: &u64| {
                let i = (off / ps - first) as usize * ps as usize;
                &buf[i..i + ps as usize]
            };
            let mut slices: Vec<&[u8]> = Vec::with_capacity(normal.len() + 1);
            slices.push(&[]);
            let payload_len = match &mut self.compressor {
                Some(c) if !normal.is_empty() => {
                    let pages = normal.iter().map(page).collect::<Vec<_>>();
                    let pages = crate::memory::ReadSource::slices(&pages);
                    c.compress(&pages, &mut out)?.into_bytes(&mut out, &pages);
                    slices.push(&out);
                    out.len()
                }
                _ => {
                    slices.extend(normal.iter().map(page));
                    normal.len() * ps as usize
                }
            };
            let num = self.packet_num.fetch_add(1, Ordering::Relaxed);
            PacketHeader::data(self.geometry, self.compression, num, entry.name.as_bytes(), &normal, &zero, payload_len as u32).encode_into(self.geometry, &mut hdr)?;
            slices[0] = &hdr;
            self.conn.write_all(&slices)?;
            ChannelStats::add(&self.stats.bytes, (hdr.len() + payload_len) as u64);
            ChannelStats::add(&self.stats.packets, 1);
            ChannelStats::add(&self.stats.normal_pages, normal.len() as u64);
            ChannelStats::add(&self.stats.zero_pages, zero.len() as u64);
        }
        self.sync(&mut hdr)
    }
}

/// Sends the QEMU mapped-ram file at `path` to the QEMU destination at `address`.
pub fn send_file(path: &Path, address: &Address, opts: &SendOptions) -> Result<SendSummary> {
    QemuSender::default().run(path, address, opts)
}

/// Whether a page read into a private buffer is all zero: OR-folded in 256-byte blocks (which
/// the compiler vectorises) with an exit at the first non-zero block.
fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(256).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}
