//! Snapshot files: our own small header (magic, version, completion state, generation, block
//! table; docs/FORMAT.md), then, per block, QEMU's mapped-ram layout. Pages are written and
//! read by N threads with positioned vectored I/O straight from and into block memory; zero
//! pages are never written, so the file stays sparse.
//!
//! Write order makes an interrupted snapshot recognisable: the header goes out marked
//! incomplete (and is synced) first, then the pages, then the bitmaps, then `fdatasync`, and
//! only then the completion marker, synced again.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::bitmap::{AtomicBitmap, word_runs};
use crate::block::RamBlock;
use crate::error::{Error, ErrorCode, Result, fail, os_error};
use crate::mapped_ram::{self, BlockHeader};

pub const MAGIC: [u8; 8] = *b"MFDSNAP\0";
pub const VERSION: u32 = 1;
const STATE_INCOMPLETE: u32 = 0;
const STATE_COMPLETE: u32 = 1;
/// Bytes of the fixed part of the file header.
const FIXED_LEN: usize = 40;
/// Byte offset of the state word (the completion marker).
const STATE_AT: u64 = 12;
const MAX_BLOCKS: usize = 4096;
/// The header region (fixed part + block table) is padded to this.
const HEADER_ALIGN: u64 = 4096;
/// Largest run of pages one positioned read or write moves.
const MAX_RUN_PAGES: u64 = 256;

/// One block as the file describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub name: String,
    pub len: u64,
    /// Where the block's mapped-ram header starts.
    pub header_offset: u64,
    pub layout: BlockHeader,
    /// Pages with data in the file.
    pub pages_present: u64,
}

/// What a snapshot file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub complete: bool,
    pub page_size: u32,
    /// Completed snapshots written into this file (incremental ones included).
    pub generation: u64,
    pub blocks: Vec<BlockEntry>,
    pub file_len: u64,
}

/// Counters a running snapshot or restore updates; cheap to poll.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of block memory covered so far (pages written or read, zero pages skipped).
    pub bytes: AtomicU64,
    pub pages_written: AtomicU64,
    pub zero_pages: AtomicU64,
    /// Bytes of block memory this job covers in all.
    pub total: AtomicU64,
    /// Bytes of file data a restore asked the kernel to read ahead of its readers.
    pub read_ahead: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
pub struct SnapshotOptions {
    pub channels: usize,
    /// Write pages with O_DIRECT (the headers and bitmaps still go through the page cache).
    pub direct_io: bool,
    /// Write only the blocks' dirty pages into an existing complete snapshot of them.
    pub incremental: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Header region length for these block names.
fn header_region_len(names: &[&str]) -> u64 {
    let table: usize = names.iter().map(|n| 1 + n.len() + 16).sum();
    ((FIXED_LEN + table) as u64).next_multiple_of(HEADER_ALIGN)
}

fn encode_header(state: u32, page_size: u32, generation: u64, blocks: &[BlockEntry]) -> Vec<u8> {
    let names: Vec<&str> = blocks.iter().map(|b| b.name.as_str()).collect();
    let mut out = vec![0u8; header_region_len(&names) as usize];
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&VERSION.to_be_bytes());
    out[12..16].copy_from_slice(&state.to_be_bytes());
    out[16..20].copy_from_slice(&page_size.to_be_bytes());
    out[20..24].copy_from_slice(&(blocks.len() as u32).to_be_bytes());
    out[24..32].copy_from_slice(&generation.to_be_bytes());
    let mut at = FIXED_LEN;
    for b in blocks {
        out[at] = b.name.len() as u8;
        out[at + 1..at + 1 + b.name.len()].copy_from_slice(b.name.as_bytes());
        at += 1 + b.name.len();
        out[at..at + 8].copy_from_slice(&b.len.to_be_bytes());
        out[at + 8..at + 16].copy_from_slice(&b.header_offset.to_be_bytes());
        at += 16;
    }
    out[32..40].copy_from_slice(&((at - FIXED_LEN) as u64).to_be_bytes());
    out
}

/// Reads and validates a snapshot file's structure: header, block table (names unique), every
/// block's mapped-ram header, and the population of its bitmap (counted in chunks, never held
/// whole). Completion is reported, not required.
pub fn read_info(file: &File, path: &Path) -> Result<SnapshotInfo> {
    let file_len = file.metadata().map_err(|e| os_error(format_args!("stat {}", path.display()), e))?.len();
    let mut fixed = [0u8; FIXED_LEN];
    if file_len < FIXED_LEN as u64 {
        fail!(FileFormat, "{} is {file_len} bytes, too short for a snapshot header", path.display());
    }
    file.read_exact_at(&mut fixed, 0).map_err(|e| os_error(format_args!("read {}", path.display()), e))?;
    if fixed[0..8] != MAGIC {
        fail!(BadMagic, "{} does not start with the snapshot magic \"MFDSNAP\\0\"", path.display());
    }
    let version = be32(&fixed, 8);
    if version != VERSION {
        fail!(BadVersion, "snapshot format version {version}, expected {VERSION}");
    }
    let state = be32(&fixed, 12);
    if state != STATE_COMPLETE && state != STATE_INCOMPLETE {
        fail!(FileFormat, "snapshot state word {state} is neither 0 (incomplete) nor 1 (complete)");
    }
    let page_size = be32(&fixed, 16);
    if !page_size.is_power_of_two() || !(512..=(1 << 19)).contains(&page_size) {
        fail!(FileFormat, "snapshot page size {page_size} is not a power of two from 512 to 512 KiB");
    }
    let count = be32(&fixed, 20) as usize;
    if count == 0 || count > MAX_BLOCKS {
        fail!(FileFormat, "snapshot has {count} blocks; expected 1 to {MAX_BLOCKS}");
    }
    let generation = be64(&fixed, 24);
    let table_len = be64(&fixed, 32);
    if table_len > (count * (1 + 255 + 16)) as u64 || FIXED_LEN as u64 + table_len > file_len {
        fail!(FileFormat, "snapshot block table of {table_len} bytes does not fit");
    }
    let mut table = vec![0u8; table_len as usize];
    file.read_exact_at(&mut table, FIXED_LEN as u64).map_err(|e| os_error(format_args!("read {}", path.display()), e))?;
    let mut at = 0usize;
    let mut blocks: Vec<BlockEntry> = Vec::with_capacity(count);
    let mut prev_end = header_region_len(&[]);
    for i in 0..count {
        let name_len = *table.get(at).ok_or_else(|| Error::new(ErrorCode::FileFormat, format!("block table ends inside entry {i}")))? as usize;
        let entry_end = at + 1 + name_len + 16;
        if name_len == 0 || entry_end > table.len() {
            fail!(FileFormat, "block table entry {i} (name of {name_len} bytes) does not fit the table");
        }
        let name = String::from_utf8(table[at + 1..at + 1 + name_len].to_vec()).map_err(|_| Error::new(ErrorCode::FileFormat, format!("block {i} has a name that is not UTF-8")))?;
        if blocks.iter().any(|b| b.name == name) {
            fail!(DuplicateBlock, "{}: block {name:?} appears twice in the block table (entry {i})", path.display());
        }
        let len = be64(&table, at + 1 + name_len);
        let header_offset = be64(&table, at + 1 + name_len + 8);
        at = entry_end;
        if len == 0 || !len.is_multiple_of(u64::from(page_size)) || len > 1 << 46 {
            fail!(FileFormat, "block {name:?} length {len} is not a positive multiple of the page size (at most 64 TiB)");
        }
        if header_offset < prev_end || header_offset.checked_add(mapped_ram::HEADER_LEN as u64).is_none_or(|e| e > file_len) {
            fail!(FileFormat, "block {name:?} header offset {header_offset} overlaps the previous region or lies past the end of the file");
        }
        let mut hb = [0u8; mapped_ram::HEADER_LEN];
        file.read_exact_at(&mut hb, header_offset).map_err(|e| os_error(format_args!("read {}", path.display()), e))?;
        let layout = BlockHeader::decode(&hb, header_offset, len, file_len, Some(u64::from(page_size)))?;
        let pages_present = Bitmap { file, path, offset: layout.bitmap_offset, pages: len / u64::from(page_size) }.count()?;
        prev_end = layout.end(len);
        blocks.push(BlockEntry { name, len, header_offset, layout, pages_present });
    }
    Ok(SnapshotInfo { complete: state == STATE_COMPLETE, page_size, generation, blocks, file_len })
}

/// Bitmap bytes read at a time (a multiple of 8): the most a bitmap costs in memory.
const BITMAP_CHUNK: u64 = 64 << 10;

/// A block's present-page bitmap in the file (`decode` checked it lies inside the file). Read
/// in chunks of [`BITMAP_CHUNK`] bytes; bits past the last page mean nothing and are ignored.
struct Bitmap<'a> {
    file: &'a File,
    path: &'a Path,
    offset: u64,
    pages: u64,
}

impl Bitmap<'_> {
    /// Calls `visit(first_word, words)` for each chunk of the bitmap, bits past the last page
    /// cleared.
    fn chunks(&self, mut visit: impl FnMut(u64, &[u64]) -> Result<()>) -> Result<()> {
        let total = mapped_ram::bitmap_len(self.pages);
        let mut buf = vec![0u8; total.min(BITMAP_CHUNK) as usize];
        let mut words = Vec::with_capacity(buf.len() / 8);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(BITMAP_CHUNK) as usize;
            self.file.read_exact_at(&mut buf[..n], self.offset + done).map_err(|e| os_error(format_args!("read bitmap of {}", self.path.display()), e))?;
            words.clear();
            words.extend(mapped_ram::bitmap_words(&buf[..n]));
            let first = done / 8;
            let last_word = first + words.len() as u64 - 1;
            if let Some(last) = words.last_mut() {
                let valid = (self.pages - last_word * 64).min(64);
                if valid < 64 {
                    *last &= (1u64 << valid) - 1;
                }
            }
            visit(first, &words)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Pages marked present.
    fn count(&self) -> Result<u64> {
        let mut n = 0;
        self.chunks(|_, words| {
            n += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
            Ok(())
        })?;
        Ok(n)
    }

    /// Calls `emit(first, count, present)` for the maximal runs of present and of absent
    /// pages, in order; together they cover the block. Present runs come from the one run
    /// finder ([`word_runs`]), a chunk at a time; the gaps between them are the absent runs.
    fn runs(&self, mut emit: impl FnMut(u64, u64, bool) -> Result<()>) -> Result<()> {
        // The present run not emitted yet (it may continue in the next chunk), and where the
        // pages not yet accounted for begin.
        let mut pending: Option<(u64, u64)> = None;
        let mut next = 0u64;
        let pages = self.pages;
        self.chunks(|first_word, words| {
            let base = first_word * 64;
            let bits = (pages - base).min(words.len() as u64 * 64) as usize;
            for (f, c) in word_runs(words, bits, true) {
                let (from, to) = (base + f as u64, base + (f + c) as u64);
                match pending {
                    Some((pf, pe)) if pe == from => pending = Some((pf, to)),
                    _ => {
                        if let Some((pf, pe)) = pending {
                            emit(pf, pe - pf, true)?;
                        }
                        if from > next {
                            emit(next, from - next, false)?;
                        }
                        pending = Some((from, to));
                    }
                }
                next = to;
            }
            Ok(())
        })?;
        if let Some((pf, pe)) = pending {
            emit(pf, pe - pf, true)?;
        }
        if pages > next {
            emit(next, pages - next, false)?;
        }
        Ok(())
    }
}

/// Reads a snapshot file's description.
pub fn inspect(path: &Path) -> Result<SnapshotInfo> {
    let file = File::open(path).map_err(|e| os_error(format_args!("open {}", path.display()), e))?;
    read_info(&file, path)
}

/// A unit of page I/O: a run of pages of one block.
#[derive(Clone, Copy)]
struct Run {
    block: usize,
    first: u64,
    count: u64,
}

/// Cuts `(first, count)` runs into units of at most MAX_RUN_PAGES pages.
fn cut(block: usize, runs: impl Iterator<Item = (u64, u64)>, out: &mut VecDeque<Run>) {
    for (first, count) in runs {
        let mut p = first;
        while p < first + count {
            let n = MAX_RUN_PAGES.min(first + count - p);
            out.push_back(Run { block, first: p, count: n });
            p += n;
        }
    }
}

/// Runs `work(worker, run)` on `channels` threads over the queued runs; first error wins and
/// stops the rest.
fn parallel(channels: usize, runs: VecDeque<Run>, work: impl Fn(usize, Run) -> Result<()> + Sync) -> Result<()> {
    let queue = Mutex::new(runs);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for worker in 0..channels.max(1) {
            let (queue, failed, stop, work) = (&queue, &failed, &stop, &work);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(run) = queue.lock().unwrap().pop_front() else { break };
                    if let Err(e) = work(worker, run) {
                        stop.store(true, Ordering::Relaxed);
                        failed.lock().unwrap().get_or_insert(e);
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Direction of a positioned transfer between block memory and the file.
#[derive(Clone, Copy)]
enum Direction {
    /// Block memory to the file (`pwritev`).
    Write,
    /// The file to block memory (`preadv`).
    Read,
}

/// Moves all of `iov` at `offset`, retrying short transfers. A zero-length write means the
/// disk is full; a zero-length read means a page marked present lies past the end of the file.
fn positioned_all(file: &File, dir: Direction, mut iov: libc::iovec, mut offset: u64, path: &Path) -> Result<()> {
    while iov.iov_len > 0 {
        let n = match dir {
            // SAFETY: iov describes block memory the caller keeps mapped (it holds an Arc).
            Direction::Write => unsafe { libc::pwritev(file.as_raw_fd(), &iov, 1, offset as libc::off_t) },
            // SAFETY: iov describes writable block memory the caller keeps mapped.
            Direction::Read => unsafe { libc::preadv(file.as_raw_fd(), &iov, 1, offset as libc::off_t) },
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_error(format_args!("{} {}", if matches!(dir, Direction::Write) { "write pages to" } else { "read pages from" }, path.display()), e));
        }
        if n == 0 {
            match dir {
                Direction::Write => return Err(os_error(format_args!("write pages to {}", path.display()), io::Error::from_raw_os_error(libc::ENOSPC))),
                Direction::Read => fail!(FileFormat, "{}: a page marked present lies past the end of the file (offset {offset})", path.display()),
            }
        }
        // SAFETY: n <= iov_len, so the advanced pointer stays inside the same run.
        iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n as usize) }.cast();
        iov.iov_len -= n as usize;
        offset += n as u64;
    }
    Ok(())
}

/// Starts writing back the file's dirty pages in `offset..offset + len` without waiting for
/// them (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the disk works while later pages are
/// still being written and the final `fdatasync` finds little left to do. Waits only when the
/// device queue is full, which paces the writers to the disk. A hint: where it fails, the
/// final `fdatasync` still writes everything and reports any error.
fn start_writeback(file: &File, offset: u64, len: u64) {
    // SAFETY: sync_file_range on a descriptor we own; it touches no memory of ours.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE) };
}

fn sync(file: &File, path: &Path) -> Result<()> {
    file.sync_data().map_err(|e| os_error(format_args!("fdatasync {}", path.display()), e))
}

fn set_state(file: &File, path: &Path, state: u32, generation: u64) -> Result<()> {
    file.write_all_at(&state.to_be_bytes(), STATE_AT).map_err(|e| os_error(format_args!("write header of {}", path.display()), e))?;
    file.write_all_at(&generation.to_be_bytes(), 24).map_err(|e| os_error(format_args!("write header of {}", path.display()), e))
}

/// Writes `blocks` into a snapshot at `path` (or, incrementally, their dirty pages into an
/// existing complete snapshot of the same blocks). Returns the file's new description.
pub fn snapshot(blocks: &[Arc<RamBlock>], path: &Path, options: SnapshotOptions, progress: &Progress) -> Result<SnapshotInfo> {
    let Some(first) = blocks.first() else { fail!(InvalidArgument, "a snapshot needs at least one block") };
    let page_size = first.page_size();
    if let Some(b) = blocks.iter().find(|b| b.page_size() != page_size) {
        fail!(InvalidArgument, "block {:?} has {}-byte pages, {:?} has {page_size}", b.name(), b.page_size(), first.name());
    }
    if blocks.len() > MAX_BLOCKS {
        fail!(InvalidArgument, "at most {MAX_BLOCKS} blocks per snapshot");
    }
    let page = u64::from(page_size);
    let file = OpenOptions::new().read(true).write(true).create(!options.incremental).truncate(!options.incremental).mode(0o600).open(path).map_err(|e| os_error(format_args!("open {}", path.display()), e))?;

    // The layout: ours for a new file, the existing one (checked against the blocks) otherwise.
    let (entries, generation, bitmaps): (Vec<BlockEntry>, u64, Vec<AtomicBitmap>) = if options.incremental {
        let info = read_info(&file, path)?;
        if !info.complete {
            fail!(Incomplete, "{} is not a complete snapshot; take a full one first", path.display());
        }
        let same = info.page_size == page_size && info.blocks.len() == blocks.len() && info.blocks.iter().zip(blocks).all(|(e, b)| e.name == b.name() && e.len == b.len());
        if !same {
            fail!(BlockMismatch, "{} holds other blocks (names, lengths or page size) than the ones given", path.display());
        }
        let bitmaps = info
            .blocks
            .iter()
            .zip(blocks)
            .map(|(e, b)| {
                let bm = AtomicBitmap::new(b.pages());
                Bitmap { file: &file, path, offset: e.layout.bitmap_offset, pages: b.pages() as u64 }.runs(|first, count, present| if present { bm.set_range(first as usize, count as usize) } else { Ok(()) })?;
                Ok(bm)
            })
            .collect::<Result<Vec<_>>>()?;
        (info.blocks, info.generation, bitmaps)
    } else {
        let names: Vec<&str> = blocks.iter().map(|b| b.name()).collect();
        let mut offset = header_region_len(&names);
        let mut entries = Vec::with_capacity(blocks.len());
        for b in blocks {
            let layout = BlockHeader::layout(offset, b.len(), page)?;
            entries.push(BlockEntry { name: b.name().to_string(), len: b.len(), header_offset: offset, layout, pages_present: 0 });
            offset = layout.end(b.len());
        }
        (entries, 0, blocks.iter().map(|b| AtomicBitmap::new(b.pages())).collect())
    };

    // 1. Mark the file incomplete, durably, before any page changes.
    if options.incremental {
        set_state(&file, path, STATE_INCOMPLETE, generation)?;
    } else {
        file.write_all_at(&encode_header(STATE_INCOMPLETE, page_size, generation, &entries), 0).map_err(|e| os_error(format_args!("write header of {}", path.display()), e))?;
        for e in &entries {
            file.write_all_at(&e.layout.encode(), e.header_offset).map_err(|er| os_error(format_args!("write block header of {}", path.display()), er))?;
        }
        let end = entries.last().map_or(0, |e| e.layout.end(e.len));
        file.set_len(end).map_err(|e| os_error(format_args!("size {}", path.display()), e))?;
    }
    sync(&file, path)?;

    // 2. Pages, in parallel, each thread with its own descriptor (O_DIRECT if asked).
    let mut runs = VecDeque::new();
    for (i, b) in blocks.iter().enumerate() {
        if options.incremental {
            let dirty = b.dirty.take();
            cut(i, dirty.runs().map(|(f, c)| (f as u64, c as u64)), &mut runs);
        } else {
            b.dirty.clear_all();
            cut(i, std::iter::once((0, b.pages() as u64)), &mut runs);
        }
    }
    progress.total.store(runs.iter().map(|r| r.count * page).sum(), Ordering::Relaxed);
    let writers = (0..options.channels.max(1))
        .map(|_| {
            let mut o = OpenOptions::new();
            o.write(true);
            if options.direct_io {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path).map_err(|e| {
                if options.direct_io && e.raw_os_error() == Some(libc::EINVAL) {
                    Error::new(ErrorCode::InvalidArgument, format!("direct I/O is not supported for {} (filesystem without O_DIRECT?)", path.display()))
                } else {
                    os_error(format_args!("open {}", path.display()), e)
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    parallel(options.channels, runs, |w, run| {
        let (b, e, bm) = (&blocks[run.block], &entries[run.block], &bitmaps[run.block]);
        // Split the run at zero pages: data runs are written, zero pages only clear their bit.
        let mut p = run.first;
        while p < run.first + run.count {
            if b.is_zero_page(p * page) {
                bm.clear(p as usize);
                progress.zero_pages.fetch_add(1, Ordering::Relaxed);
                p += 1;
                continue;
            }
            let start = p;
            while p < run.first + run.count && !b.is_zero_page(p * page) {
                p += 1;
            }
            let iov = b.memory().iovec(start * page, ((p - start) * page) as usize);
            positioned_all(&writers[w], Direction::Write, iov, e.layout.pages_offset + start * page, path).map_err(|e| b.explain(e, true))?;
            bm.set_range(start as usize, (p - start) as usize)?;
            progress.pages_written.fetch_add(p - start, Ordering::Relaxed);
        }
        if !options.direct_io {
            start_writeback(&writers[w], e.layout.pages_offset + run.first * page, run.count * page);
        }
        // A source file truncated under the scan above.
        b.check_faults(true)?;
        progress.bytes.fetch_add(run.count * page, Ordering::Relaxed);
        Ok(())
    })?;
    drop(writers);

    // 3. Bitmaps, then one flush for them and the pages (fdatasync covers the file whatever
    // descriptor wrote it), then the completion marker, flushed again.
    let mut out_entries = entries.clone();
    for ((e, bm), out) in entries.iter().zip(&bitmaps).zip(&mut out_entries) {
        let words = bm.snapshot();
        out.pages_present = words.count() as u64;
        file.write_all_at(&mapped_ram::bitmap_bytes(words.words()), e.layout.bitmap_offset).map_err(|er| os_error(format_args!("write bitmap of {}", path.display()), er))?;
    }
    sync(&file, path)?;
    set_state(&file, path, STATE_COMPLETE, generation + 1)?;
    sync(&file, path)?;
    let file_len = file.metadata().map_err(|e| os_error(format_args!("stat {}", path.display()), e))?.len();
    Ok(SnapshotInfo { complete: true, page_size, generation: generation + 1, blocks: out_entries, file_len })
}

/// How far ahead of the readers the file is read into the page cache, and the least a
/// further request asks for.
const PREFETCH_WINDOW: u64 = 32 << 20;
const PREFETCH_STEP: u64 = 4 << 20;

/// Reads the file ahead of the restore's readers (`posix_fadvise(WILLNEED)`, which queues the
/// reads and returns). The readers skip absent pages, holes in the file, so the kernel's own
/// readahead sees scattered reads and would wait for each run in turn; runs are taken in
/// file order, so one shared mark of how far the file has been asked for covers every reader.
/// Only data is asked for (`SEEK_DATA`/`SEEK_HOLE`): read-ahead of a hole would fill the page
/// cache with zero pages nobody reads, most of a mostly-empty snapshot.
#[derive(Default)]
struct Prefetch {
    /// File offset up to which reads have been queued.
    until: AtomicU64,
}

/// `lseek(fd, offset, whence)`: the offset found, or None (ENXIO: no data past `offset`, or
/// any error, which ends the hint).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own; it touches no memory. It moves the descriptor's
    // file position, which nothing uses (every read is positioned).
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    (at >= 0).then_some(at as u64)
}

impl Prefetch {
    /// Called by a reader about to read at `offset`: keeps the window ahead of it queued.
    /// Returns the bytes of data it asked the kernel to read.
    fn ahead_of(&self, file: &File, offset: u64) -> u64 {
        let Some((from, len)) = self.claim(offset) else { return 0 };
        let end = from + len;
        let mut asked = 0;
        let mut at = from;
        while let Some(data) = seek(file, at, libc::SEEK_DATA).filter(|&d| d < end) {
            let hole = seek(file, data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            if hole <= data {
                break;
            }
            // SAFETY: posix_fadvise on a descriptor we own; it touches no memory of ours. A
            // hint: where it fails, the reads simply wait for the disk.
            let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), data as libc::off_t, (hole - data) as libc::off_t, libc::POSIX_FADV_WILLNEED) };
            asked += hole - data;
            at = hole;
        }
        asked
    }

    /// The range (offset, length) a reader at `offset` should queue, if the window ahead of
    /// it has run short by a step; each byte is claimed by one reader only.
    fn claim(&self, offset: u64) -> Option<(u64, u64)> {
        let want = offset + PREFETCH_WINDOW;
        if want < self.until.load(Ordering::Relaxed) + PREFETCH_STEP {
            return None;
        }
        let queued = self.until.fetch_max(want, Ordering::Relaxed);
        let from = queued.max(offset);
        (from < want).then(|| (from, want - from))
    }
}

/// Runs of pages queued for the reader threads before they are started on them: bounds the
/// memory a bitmap of alternating bits costs, whatever the block's size.
const RESTORE_BATCH: usize = 1 << 16;

/// Reads a complete snapshot into `blocks` (same names and lengths, in any order). Pages not
/// in the file become zero. Never reads or writes outside a block or past the file; bitmaps
/// are read in chunks, runs handed to the readers in bounded batches.
pub fn restore(path: &Path, blocks: &[Arc<RamBlock>], channels: usize, progress: &Progress) -> Result<SnapshotInfo> {
    let file = File::open(path).map_err(|e| os_error(format_args!("open {}", path.display()), e))?;
    let info = read_info(&file, path)?;
    if !info.complete {
        fail!(Incomplete, "{} is not a complete snapshot (interrupted or still being written)", path.display());
    }
    let page = u64::from(info.page_size);
    let mut targets = Vec::with_capacity(info.blocks.len());
    for e in &info.blocks {
        let Some(b) = blocks.iter().find(|b| b.name() == e.name) else {
            fail!(BlockMismatch, "the snapshot has block {:?}, which was not given", e.name);
        };
        if b.len() != e.len || u64::from(b.page_size()) != page {
            fail!(BlockMismatch, "block {:?} is {} bytes with {}-byte pages in the snapshot, {} bytes with {}-byte pages here", e.name, e.len, page, b.len(), b.page_size());
        }
        targets.push(b.clone());
    }
    if blocks.len() != targets.len() {
        fail!(BlockMismatch, "{} block(s) given, the snapshot has {}", blocks.len(), targets.len());
    }
    progress.total.store(info.blocks.iter().map(|e| e.pages_present * page).sum(), Ordering::Relaxed);
    let readers = (0..channels.max(1)).map(|_| File::open(path).map_err(|e| os_error(format_args!("open {}", path.display()), e))).collect::<Result<Vec<_>>>()?;
    let prefetch = Prefetch::default();
    let read = |r: usize, run: Run| {
        let (b, e) = (&targets[run.block], &info.blocks[run.block]);
        let (at, len) = (run.first * page, run.count * page);
        let from = e.layout.pages_offset + at;
        progress.read_ahead.fetch_add(prefetch.ahead_of(&readers[r], from), Ordering::Relaxed);
        if b.reserve(at, len)? {
            positioned_all(&readers[r], Direction::Read, b.memory().iovec(at, len as usize), from, path).map_err(|e| b.explain(e, false))?;
        } else {
            // No `fallocate` on the target's filesystem: through a buffer and its descriptor.
            let mut buf = vec![0u8; len as usize];
            readers[r].read_exact_at(&mut buf, from).map_err(|e| os_error(format_args!("read pages from {}", path.display()), e))?;
            b.store(at, &buf)?;
        }
        b.check_faults(false)?;
        progress.bytes.fetch_add(run.count * page, Ordering::Relaxed);
        progress.pages_written.fetch_add(run.count, Ordering::Relaxed);
        Ok(())
    };
    let mut runs = VecDeque::new();
    for (i, (e, b)) in info.blocks.iter().zip(&targets).enumerate() {
        Bitmap { file: &file, path, offset: e.layout.bitmap_offset, pages: b.pages() as u64 }.runs(|first, count, present| {
            if !present {
                // Absent pages must read as zero: cleared (punched out of a file) unless the
                // memory is fresh zero anyway, so they stay holes.
                return b.zero_range(first * page, count * page);
            }
            cut(i, std::iter::once((first, count)), &mut runs);
            if runs.len() >= RESTORE_BATCH {
                parallel(channels, std::mem::take(&mut runs), read)?;
            }
            Ok(())
        })?;
    }
    parallel(channels, runs, read)?;
    for b in &targets {
        b.mark_written();
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_keeps_a_window_ahead_in_steps_and_asks_for_each_byte_once() {
        const MIB: u64 = 1 << 20;
        let p = Prefetch::default();
        // The first read queues a whole window from where it reads.
        assert_eq!(p.claim(MIB), Some((MIB, PREFETCH_WINDOW)));
        // Reads inside the queued window, or behind it (other readers), ask for nothing
        // until the window has run short by a step.
        assert_eq!(p.claim(2 * MIB), None);
        assert_eq!(p.claim(0), None);
        assert_eq!(p.claim(MIB + PREFETCH_STEP - 1), None);
        // Then only the part not queued yet, which continues the previous request.
        assert_eq!(p.claim(MIB + PREFETCH_STEP), Some((MIB + PREFETCH_WINDOW, PREFETCH_STEP)));
        // A reader that jumps past the window (absent pages) starts a new one where it reads.
        let far = 10 * PREFETCH_WINDOW;
        assert_eq!(p.claim(far), Some((far, PREFETCH_WINDOW)));
        assert_eq!(p.claim(far + MIB), None);
    }
}
