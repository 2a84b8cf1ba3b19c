//! RAM blocks: named, page-aligned memory owned by Rust and shared with channel threads and
//! JavaScript through `Arc`.
//!
//! Memory model: like guest RAM in QEMU, a block's bytes may be written by the application
//! while a channel thread reads them to send. That race is by design: a page changed during a
//! send is dirty again and goes out in the next round. The bytes are only ever touched through
//! [`crate::memory`], whose safety argument covers every access.
//!
//! Outputs that are files (a received block, a restore target) obey two rules here, once:
//! - **A full disk is an error, not a signal.** Before any byte of a page range of a
//!   file-backed block is written (by `readv`, a copy, or `preadv`), the range is reserved with
//!   `fallocate(fd, 0, ...)` ([`RamBlock::reserve`], once per run of pages; a bitmap remembers
//!   what is reserved, so a page written again costs nothing), which fails with ENOSPC instead
//!   of a later SIGBUS. Where the filesystem has no `fallocate` (EOPNOTSUPP), the block's
//!   writes go through its file descriptor instead (`pwrite`, one copy through a buffer),
//!   which reports ENOSPC as well.
//! - **Holes stay holes.** A file we created or extended from nothing starts as one hole:
//!   zero and absent pages that were never written are skipped; a page that held data and
//!   becomes zero is punched out (`FALLOC_FL_PUNCH_HOLE`, or zeros written where punching is
//!   not supported).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::bitmap::AtomicBitmap;
use crate::error::{Error, ErrorCode, Result, fail, os_error};
use crate::memory::Mapping;
use crate::wire::{Geometry, MAX_BLOCK_NAME};

/// Where a block's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory, zero when allocated.
    Anonymous,
    /// A file mapped MAP_SHARED (e.g. a VM memory image in /dev/shm): writes reach the file.
    File,
}

/// The file under a file-backed block.
#[derive(Debug)]
struct BackingFile {
    file: File,
    path: PathBuf,
    /// Pages whose disk space is reserved (or written through the descriptor) in this process.
    reserved: AtomicBitmap,
    /// The filesystem refused `fallocate` mode 0: writes go through the descriptor.
    no_fallocate: AtomicBool,
    /// The filesystem refused to punch holes: zero pages over data are written as zeros.
    no_punch: AtomicBool,
}

/// A named memory region moved page by page.
#[derive(Debug)]
pub struct RamBlock {
    name: String,
    geometry: Geometry,
    memory: Mapping,
    file: Option<BackingFile>,
    /// Pages written since the last round (source side).
    pub dirty: AtomicBitmap,
    /// Pages received in this session (destination side): a zero page only needs writing
    /// where data may already be.
    pub received: AtomicBitmap,
    /// True while the block is known to be all zero: fresh anonymous memory, or a file we
    /// created or extended from empty, never written since.
    known_zero: AtomicBool,
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_BLOCK_NAME || name.as_bytes().contains(&0) {
        fail!(InvalidArgument, "block name must be 1 to {MAX_BLOCK_NAME} bytes without NUL, got {} bytes", name.len());
    }
    Ok(())
}

fn check_len(name: &str, len: u64, geometry: Geometry) -> Result<usize> {
    let page = u64::from(geometry.page_size());
    if len == 0 || !len.is_multiple_of(page) {
        fail!(InvalidArgument, "block {name:?}: length {len} must be a positive multiple of the page size {page}");
    }
    usize::try_from(len).map_err(|_| Error::new(ErrorCode::InvalidArgument, format!("block {name:?}: length {len} does not fit in memory")))
}

/// `fallocate`, retried on EINTR.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    loop {
        // SAFETY: fallocate on a descriptor we own; it touches no memory of ours.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

/// Calls `f(first, count)` for each run of consecutive page offsets in `offsets` (in order).
fn page_runs(offsets: &[u64], page: u64, mut f: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
    let mut i = 0;
    while i < offsets.len() {
        let start = offsets[i];
        let mut n = 1;
        while i + (n as usize) < offsets.len() && offsets[i + n as usize] == start + n * page {
            n += 1;
        }
        f(start, n * page)?;
        i += n as usize;
    }
    Ok(())
}

impl RamBlock {
    /// Anonymous memory of `len` bytes. With `prefault`, every page is faulted in now
    /// (MAP_POPULATE), so a later transfer does not pay for first touches.
    pub fn allocate(name: &str, len: u64, page_size: u32, prefault: bool) -> Result<Self> {
        check_name(name)?;
        let geometry = Geometry::new(page_size)?;
        let len = check_len(name, len, geometry)?;
        let memory = Mapping::anonymous(len, prefault).map_err(|e| e.context(format!("block {name:?}")))?;
        Ok(Self::new(name, geometry, memory, None, true))
    }

    /// Maps `path` MAP_SHARED. With `len`, the file is created or resized to it (extended with
    /// `ftruncate`, never filled: a new file is one hole); without, the file's current size is
    /// the block's length.
    pub fn map_file(name: &str, path: &Path, page_size: u32, len: Option<u64>, prefault: bool) -> Result<Self> {
        check_name(name)?;
        let geometry = Geometry::new(page_size)?;
        let at = |what: &str| format!("{what} {}", path.display());
        let file = OpenOptions::new().read(true).write(true).create(len.is_some()).truncate(false).open(path).map_err(|e| os_error(at("open"), e))?;
        let meta = file.metadata().map_err(|e| os_error(at("stat"), e))?;
        let device = meta.file_type().is_block_device();
        if !meta.is_file() && !device {
            fail!(InvalidArgument, "{} is neither a regular file nor a block device; blocks map only those", path.display());
        }
        // A block device has a fixed size (its metadata says 0): it is mapped as it is, never
        // resized, and never assumed to be zero.
        let before = if device { (&file).seek(SeekFrom::End(0)).map_err(|e| os_error(at("size"), e))? } else { meta.len() };
        let len = match len {
            Some(l) if device => {
                if l > before {
                    fail!(NoSpace, "block device {} holds {before} bytes, block {name:?} needs {l}", path.display());
                }
                l
            }
            Some(l) => {
                file.set_len(l).map_err(|e| os_error(at("resize"), e))?;
                l
            }
            None => before,
        };
        let len = check_len(name, len, geometry)?;
        let memory = Mapping::shared_file(file.as_raw_fd(), len, prefault).map_err(|e| e.context(format!("block {name:?} on {}", path.display())))?;
        let pages = len / geometry.page_size() as usize;
        let backing = BackingFile { file, path: path.to_path_buf(), reserved: AtomicBitmap::new(pages), no_fallocate: AtomicBool::new(false), no_punch: AtomicBool::new(false) };
        Ok(Self::new(name, geometry, memory, Some(backing), !device && before == 0))
    }

    fn new(name: &str, geometry: Geometry, memory: Mapping, file: Option<BackingFile>, known_zero: bool) -> Self {
        let pages = memory.len() / geometry.page_size() as usize;
        RamBlock {
            name: name.to_string(),
            geometry,
            memory,
            file,
            dirty: AtomicBitmap::new(pages),
            received: AtomicBitmap::new(pages),
            known_zero: AtomicBool::new(known_zero),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> u64 {
        self.memory.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    /// Whether the block's memory is the file at `path` (same device and inode, links followed):
    /// writing that path would write the block.
    pub fn is_backed_by(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(backing) = &self.file else { return false };
        match (backing.file.metadata(), std::fs::metadata(path)) {
            (Ok(ours), Ok(theirs)) => ours.dev() == theirs.dev() && ours.ino() == theirs.ino(),
            _ => false,
        }
    }

    pub fn page_size(&self) -> u32 {
        self.geometry.page_size()
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn pages(&self) -> usize {
        self.memory.len() / self.geometry.page_size() as usize
    }

    pub fn backing(&self) -> Backing {
        if self.file.is_some() { Backing::File } else { Backing::Anonymous }
    }

    /// The file under a file-backed block.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// The block's bytes; see [`crate::memory`] for how they may be touched.
    pub fn memory(&self) -> &Mapping {
        &self.memory
    }

    /// Base address, for the JavaScript view.
    pub fn as_ptr(&self) -> *mut u8 {
        self.memory.as_ptr()
    }

    fn check_page(&self, offset: u64) {
        let page = self.page_size() as u64;
        assert!(offset.is_multiple_of(page) && offset + page <= self.len(), "page 0x{offset:x} outside block {:?}", self.name);
    }

    /// Whether the page at `offset` is all zero (volatile reads; see [`crate::memory`]).
    pub fn is_zero_page(&self, offset: u64) -> bool {
        self.check_page(offset);
        self.memory.is_zero(offset, self.page_size() as usize)
    }

    /// Appends the page at `offset` to `iov` for the kernel (merged with a contiguous last
    /// iovec at or after index `from`).
    pub fn push_page(&self, iov: &mut Vec<libc::iovec>, from: usize, offset: u64) {
        self.check_page(offset);
        self.memory.push_iovec(iov, from, offset, self.page_size() as usize);
    }

    /// A copy of `len` bytes at `offset` (tests and tools; the data path copies into its own
    /// buffers with [`Mapping::copy_to`]).
    pub fn read_vec(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.memory.copy_to(offset, &mut out);
        out
    }

    /// A copy of the page at `offset`.
    pub fn read_page(&self, offset: u64) -> Vec<u8> {
        self.check_page(offset);
        self.read_vec(offset, self.page_size() as usize)
    }

    /// Reserves disk space for `len` bytes at `offset` of a file-backed block before they are
    /// written through the mapping. `Ok(true)`: the mapping may be written now (always for
    /// anonymous memory). `Ok(false)`: the filesystem cannot reserve (no `fallocate`), so
    /// write with [`RamBlock::store`] (through the descriptor) instead. A full filesystem is
    /// `ERR_MULTIFD_NO_SPACE` naming the file.
    pub fn reserve(&self, offset: u64, len: u64) -> Result<bool> {
        let Some(f) = &self.file else { return Ok(true) };
        if f.no_fallocate.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let page = self.page_size() as u64;
        let (first, count) = ((offset / page) as usize, len.div_ceil(page) as usize);
        if f.reserved.is_range_set(first, count) {
            return Ok(true);
        }
        match fallocate(&f.file, 0, offset, len) {
            Ok(()) => {
                f.reserved.set_range(first, count)?;
                // The pages exist now; map them too, so the write that follows (a `readv`,
                // a copy, a `preadv`) takes no page fault per page. A hint, see there.
                let _ = self.memory.populate_write(offset, len as usize);
                Ok(true)
            }
            Err(e) if unsupported(&e) => {
                f.no_fallocate.store(true, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(os_error(format_args!("reserve {len} bytes at offset {offset} of {} for block {:?}", f.path.display(), self.name), e)),
        }
    }

    /// [`RamBlock::reserve`] for the pages at `offsets` (one `fallocate` per run of
    /// consecutive pages not reserved yet). `Ok(false)`: write them with `store`.
    pub fn reserve_pages(&self, offsets: &[u64]) -> Result<bool> {
        if self.file.is_none() {
            return Ok(true);
        }
        let mut mapped = true;
        page_runs(offsets, self.page_size() as u64, |off, len| {
            mapped &= self.reserve(off, len)?;
            Ok(())
        })?;
        Ok(mapped)
    }

    /// Writes `data` at `offset`: reserved and copied in for anonymous memory and files with
    /// `fallocate`, written through the descriptor otherwise. Errors name the file.
    pub fn store(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.reserve(offset, data.len() as u64)? {
            self.memory.copy_from(offset, data);
            return Ok(());
        }
        let f = self.file.as_ref().expect("only file-backed blocks write through the descriptor");
        f.file.write_all_at(data, offset).map_err(|e| os_error(format_args!("write {} bytes at offset {offset} of {} for block {:?}", data.len(), f.path.display(), self.name), e))?;
        let page = self.page_size() as u64;
        f.reserved.set_range((offset / page) as usize, (data.len() as u64).div_ceil(page) as usize)
    }

    /// Behaves from now on as on a filesystem without `fallocate` (writes go through the file
    /// descriptor): for tests of that path on filesystems that have it.
    #[doc(hidden)]
    pub fn emulate_no_fallocate(&self) {
        if let Some(f) = &self.file {
            f.no_fallocate.store(true, Ordering::Relaxed);
        }
    }

    /// Fills `len` bytes at `offset` with `byte` (tests and tools), reserving space first.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<()> {
        if self.reserve(offset, len)? {
            self.memory.fill(offset, len as usize, byte);
            return Ok(());
        }
        self.store(offset, &vec![byte; len as usize])
    }

    /// Makes the pages at `offsets` (one packet's zero pages) read as zero, touching only
    /// pages that may hold data: received before in this session, or in a block not known to
    /// be all zero. File-backed pages are punched out, so they take no space.
    pub fn zero_pages_at(&self, offsets: &[u64]) -> Result<()> {
        let page = self.page_size() as u64;
        let fresh = self.known_zero.load(Ordering::Relaxed);
        let mut run: Option<(u64, u64)> = None;
        for &o in offsets {
            self.check_page(o);
            let had_data = self.received.test_and_set((o / page) as usize);
            if !had_data && fresh {
                continue;
            }
            run = match run {
                Some((start, len)) if start + len == o => Some((start, len + page)),
                Some((start, len)) => {
                    self.clear(start, len)?;
                    Some((o, page))
                }
                None => Some((o, page)),
            };
        }
        match run {
            Some((start, len)) => self.clear(start, len),
            None => Ok(()),
        }
    }

    /// Zeroes `len` bytes at `offset` (whole pages), unless the block is still known to be all
    /// zero, in which case nothing is touched (nothing is faulted in or allocated).
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if self.known_zero.load(Ordering::Relaxed) || len == 0 {
            return Ok(());
        }
        let page = self.page_size() as u64;
        assert!(offset.is_multiple_of(page) && len.is_multiple_of(page) && offset + len <= self.len(), "range {offset}+{len} outside block");
        self.clear(offset, len)
    }

    /// Zeroes whole pages: a hole punched in a file, zeros written in anonymous memory.
    fn clear(&self, offset: u64, len: u64) -> Result<()> {
        let Some(f) = &self.file else {
            self.memory.fill(offset, len as usize, 0);
            return Ok(());
        };
        if !f.no_punch.load(Ordering::Relaxed) {
            match fallocate(&f.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len) {
                Ok(()) => {
                    let page = self.page_size() as u64;
                    return f.reserved.clear_range((offset / page) as usize, (len / page) as usize);
                }
                Err(e) if unsupported(&e) => f.no_punch.store(true, Ordering::Relaxed),
                Err(e) => return Err(os_error(format_args!("punch {len} bytes at offset {offset} of {} for block {:?}", f.path.display(), self.name), e)),
            }
        }
        self.fill(offset, len, 0)
    }

    /// Makes what was written to a file-backed block durable: its changed pages are written
    /// back (`msync`) and the file's data synced (`fdatasync`, which also covers pages written
    /// through the descriptor). Nothing to do for anonymous memory.
    pub fn flush(&self) -> Result<()> {
        let Some(f) = &self.file else { return Ok(()) };
        let what = |step: &str| format!("{step} block {:?} to {}", self.name, f.path.display());
        self.memory.sync().map_err(|e| os_error(what("write back"), e))?;
        f.file.sync_data().map_err(|e| os_error(what("sync"), e))
    }

    /// Records that the application (or a restore) may have written the block, so zero pages
    /// must be written explicitly from now on.
    pub fn mark_written(&self) {
        self.known_zero.store(false, Ordering::Relaxed);
    }

    /// Marks the pages of byte range `offset..offset+len` dirty (rounded out to whole pages).
    pub fn mark_dirty(&self, offset: u64, len: u64) -> Result<()> {
        let page = self.page_size() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= self.len());
        let Some(end) = end else {
            fail!(InvalidArgument, "range {offset}+{len} is outside block {:?} of {} bytes", self.name, self.len());
        };
        self.mark_written();
        if len == 0 {
            return Ok(());
        }
        let first = offset / page;
        self.dirty.set_range(first as usize, (end.div_ceil(page) - first) as usize)
    }

    /// Fails if a page of this block could not be read (`reading`: a source file truncated
    /// while it was read) or written: the SIGBUS guard replaced it with zeros. One atomic load;
    /// called once per packet.
    pub fn check_faults(&self, reading: bool) -> Result<()> {
        if self.memory.faulted() { Err(self.fault_error(reading)) } else { Ok(()) }
    }

    /// What an OS error on a transfer from or to this block's memory means: the kernel
    /// returns EFAULT where user space would have had SIGBUS, which says nothing about the
    /// file. For a file-backed block that faulted or whose file is now shorter than the
    /// block, the block's own error; otherwise `e`.
    pub fn explain(&self, e: Error, reading: bool) -> Error {
        let Some(f) = &self.file else { return e };
        let shorter = f.file.metadata().is_ok_and(|m| m.len() < self.len());
        if shorter || self.memory.faulted() { self.fault_error(reading) } else { e }
    }

    fn fault_error(&self, reading: bool) -> Error {
        let Some(f) = &self.file else {
            return Error::new(ErrorCode::Io, format!("a page of block {:?} could not be accessed", self.name));
        };
        let now = f.file.metadata().map(|m| m.len());
        match now {
            Ok(n) if n < self.len() && reading => Error::new(
                ErrorCode::SourceTruncated,
                format!("{} (block {:?}) was truncated to {n} bytes while it was read; the block is {} bytes", f.path.display(), self.name, self.len()),
            ),
            Ok(n) if n < self.len() => Error::new(
                ErrorCode::Io,
                format!("{} (block {:?}) was truncated to {n} bytes by someone else while it was written; the block is {} bytes", f.path.display(), self.name, self.len()),
            ),
            _ if reading => Error::new(ErrorCode::Io, format!("a page of {} (block {:?}) could not be read (SIGBUS)", f.path.display(), self.name)),
            _ => Error::new(ErrorCode::NoSpace, format!("the filesystem of {} could not back a page of block {:?} (no space left?)", f.path.display(), self.name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_is_zero_and_writable() {
        let b = RamBlock::allocate("t", 64 << 10, 4096, true).unwrap();
        assert_eq!(b.pages(), 16);
        assert!(b.is_zero_page(4096));
        b.store(8192, &[7]).unwrap();
        assert_eq!(b.read_page(8192)[0], 7);
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert_eq!(RamBlock::allocate("", 4096, 4096, false).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(RamBlock::allocate("a", 4097, 4096, false).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(RamBlock::allocate("a", 0, 4096, false).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(RamBlock::allocate(&"x".repeat(256), 4096, 4096, false).unwrap_err().code, ErrorCode::InvalidArgument);
    }

    #[test]
    fn dirty_ranges_round_out_to_pages() {
        let b = RamBlock::allocate("d", 16 * 4096, 4096, false).unwrap();
        b.mark_dirty(4095, 2).unwrap();
        assert_eq!(b.dirty.runs().collect::<Vec<_>>(), vec![(0, 2)]);
        b.mark_dirty(15 * 4096, 4096).unwrap();
        assert_eq!(b.mark_dirty(15 * 4096, 4097).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(b.mark_dirty(u64::MAX, 2).unwrap_err().code, ErrorCode::InvalidArgument);
        assert_eq!(b.dirty.count(), 3);
    }

    #[test]
    fn zero_page_skips_untouched_pages() {
        let b = RamBlock::allocate("z", 4 * 4096, 4096, false).unwrap();
        b.zero_pages_at(&[0]).unwrap();
        assert!(b.received.test(0));
        b.store(4096, &[1]).unwrap();
        b.mark_written();
        b.zero_pages_at(&[4096]).unwrap();
        assert_eq!(b.read_page(4096)[0], 0);
    }

    #[test]
    fn file_mapping_is_shared_with_the_file() {
        let dir = std::env::temp_dir().join(format!("multifd-block-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        {
            let b = RamBlock::map_file("img", &path, 4096, Some(8192), false).unwrap();
            b.store(4096, &[0x5a]).unwrap();
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(bytes[4096], 0x5a);
        let again = RamBlock::map_file("img", &path, 4096, None, false).unwrap();
        assert_eq!(again.len(), 8192);
        assert_eq!(again.read_page(4096)[0], 0x5a);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Minor page faults this thread has taken so far.
    fn thread_minor_faults() -> i64 {
        // SAFETY: an all-zero rusage is valid.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes into the struct we own.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) }, 0);
        u.ru_minflt
    }

    #[test]
    fn reserved_file_pages_are_written_without_a_fault_each() {
        let dir = std::env::temp_dir().join(format!("multifd-block-populate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let b = RamBlock::map_file("img", &dir.join("img"), 4096, Some(1 << 20), false).unwrap();
        if b.memory().populate_write(0, 0).is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL)) {
            eprintln!("skipped: this kernel has no MADV_POPULATE_WRITE (5.14+)");
            return;
        }
        assert!(b.reserve(0, 1 << 20).unwrap());
        // What a receiving channel does next: write the reserved pages through the mapping.
        let data = vec![0x5a; 1 << 20];
        let before = thread_minor_faults();
        b.memory().copy_from(0, &data);
        let faults = thread_minor_faults() - before;
        assert!(faults < 16, "{faults} page faults writing 256 reserved pages");
        assert_eq!(b.read_page(255 * 4096)[4095], 0x5a);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
