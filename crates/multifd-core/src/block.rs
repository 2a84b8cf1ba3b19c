//! RAM blocks: named, page-aligned memory owned by Rust and shared with channel threads and
//! JavaScript through `Arc`.
//!
//! Memory model: like guest RAM in QEMU, a block's bytes may be written by the application
//! while a channel thread reads them to send. That race is by design: a page changed during a
//! send is dirty again and goes out in the next round. So page data is only ever touched
//! through raw pointers handed to the kernel (`writev`, `readv`) or through the short-lived
//! slices made in [`RamBlock::page`] / [`RamBlock::zero_page`]; nothing holds a long-lived
//! Rust reference to it.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use crate::bitmap::AtomicBitmap;
use crate::error::{Error, ErrorCode, Result, fail};
use crate::wire::{Geometry, MAX_BLOCK_NAME};

/// Where a block's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory, zero when allocated.
    Anonymous,
    /// A file mapped MAP_SHARED (e.g. a VM memory image in /dev/shm): writes reach the file.
    File,
}

/// A named memory region moved page by page.
#[derive(Debug)]
pub struct RamBlock {
    name: String,
    geometry: Geometry,
    base: NonNull<u8>,
    len: usize,
    backing: Backing,
    /// Pages written since the last round (source side).
    pub dirty: AtomicBitmap,
    /// Pages received in this session (destination side): a zero page only needs writing
    /// where data may already be.
    pub received: AtomicBitmap,
    /// True while the block is known to be all zero (fresh anonymous memory never written).
    known_zero: std::sync::atomic::AtomicBool,
}

// SAFETY: `base` points to a mapping owned by this value for its whole life and never
// remapped; all access to the bytes goes through raw pointers or short-lived slices whose
// races are part of the documented memory model above. The bitmaps are atomics.
unsafe impl Send for RamBlock {}
// SAFETY: as for Send; no method hands out a reference that outlives the call.
unsafe impl Sync for RamBlock {}

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

fn os_error(what: &str) -> Error {
    Error::new(ErrorCode::Io, format!("{what}: {}", std::io::Error::last_os_error()))
}

impl RamBlock {
    /// Anonymous memory of `len` bytes. With `prefault`, every page is faulted in now
    /// (MAP_POPULATE), so a later transfer does not pay for first touches.
    pub fn allocate(name: &str, len: u64, page_size: u32, prefault: bool) -> Result<Self> {
        check_name(name)?;
        let geometry = Geometry::new(page_size)?;
        let len = check_len(name, len, geometry)?;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | if prefault { libc::MAP_POPULATE } else { 0 };
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(os_error(&format!("mmap of {len} bytes for block {name:?}")));
        }
        Ok(Self::from_mapping(name, geometry, ptr, len, Backing::Anonymous, true))
    }

    /// Maps `path` MAP_SHARED. With `len`, the file is created or resized to it; without,
    /// the file's current size is the block's length.
    pub fn map_file(name: &str, path: &Path, page_size: u32, len: Option<u64>, prefault: bool) -> Result<Self> {
        check_name(name)?;
        let geometry = Geometry::new(page_size)?;
        let io = |what: &str, e: std::io::Error| Error::new(ErrorCode::Io, format!("{what} {}: {e}", path.display()));
        let file = OpenOptions::new().read(true).write(true).create(len.is_some()).truncate(false).open(path).map_err(|e| io("open", e))?;
        let len = match len {
            Some(l) => {
                file.set_len(l).map_err(|e| io("resize", e))?;
                l
            }
            None => file.metadata().map_err(|e| io("stat", e))?.len(),
        };
        let len = check_len(name, len, geometry)?;
        let flags = libc::MAP_SHARED | if prefault { libc::MAP_POPULATE } else { 0 };
        // SAFETY: maps an open file we own the descriptor of; the mapping stays valid after the
        // descriptor is closed.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(os_error(&format!("mmap of {} for block {name:?}", path.display())));
        }
        Ok(Self::from_mapping(name, geometry, ptr, len, Backing::File, false))
    }

    fn from_mapping(name: &str, geometry: Geometry, ptr: *mut libc::c_void, len: usize, backing: Backing, known_zero: bool) -> Self {
        let pages = len / geometry.page_size() as usize;
        RamBlock {
            name: name.to_string(),
            geometry,
            base: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            len,
            backing,
            dirty: AtomicBitmap::new(pages),
            received: AtomicBitmap::new(pages),
            known_zero: std::sync::atomic::AtomicBool::new(known_zero),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn page_size(&self) -> u32 {
        self.geometry.page_size()
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    pub fn pages(&self) -> usize {
        self.len / self.geometry.page_size() as usize
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Base address, for building iovecs and for the JavaScript view.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Address of the page at byte `offset`. Panics unless the whole page is inside the block:
    /// callers pass offsets the wire validator or the page batcher already checked.
    pub fn page_ptr(&self, offset: u64) -> *mut u8 {
        let page = self.page_size() as u64;
        assert!(offset.is_multiple_of(page) && offset + page <= self.len as u64, "page 0x{offset:x} outside block {:?}", self.name);
        // SAFETY: offset + page <= len, so the result stays inside the mapping.
        unsafe { self.base.as_ptr().add(offset as usize) }
    }

    /// The page at `offset`, for a quick look (zero detection, hashing). Its bytes may change
    /// under the caller if the application writes concurrently; callers only use the slice
    /// within one call and treat what they see as a snapshot.
    pub fn page(&self, offset: u64) -> &[u8] {
        // SAFETY: page_ptr checked bounds; u8 has no invalid values, so a racing writer can
        // make the contents stale but not invalid.
        unsafe { std::slice::from_raw_parts(self.page_ptr(offset), self.page_size() as usize) }
    }

    /// Makes the page at `offset` zero, skipping the write (and the page fault) when the page
    /// cannot hold data: never received in this session of a block known to be all zero.
    pub fn zero_page(&self, offset: u64) {
        let index = (offset / self.page_size() as u64) as usize;
        let had_data = self.received.test_and_set(index);
        if had_data || !self.known_zero.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: page_ptr checked bounds; writing bytes into our own mapping.
            unsafe { std::ptr::write_bytes(self.page_ptr(offset), 0, self.page_size() as usize) }
        }
    }

    /// Zeroes `len` bytes at `offset` (whole pages), unless the block is still fresh zero
    /// memory, in which case nothing is touched (and nothing is faulted in).
    pub fn zero_pages(&self, offset: u64, len: u64) {
        if self.known_zero.load(std::sync::atomic::Ordering::Relaxed) || len == 0 {
            return;
        }
        let page = self.page_size() as u64;
        assert!(offset.is_multiple_of(page) && len.is_multiple_of(page) && offset + len <= self.len as u64, "range {offset}+{len} outside block");
        // SAFETY: the range was checked to lie inside the mapping.
        unsafe { std::ptr::write_bytes(self.page_ptr(offset), 0, len as usize) }
    }

    /// Records that the application (or a restore) may have written the block, so zero pages
    /// must be written explicitly from now on.
    pub fn mark_written(&self) {
        self.known_zero.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Marks the pages of byte range `offset..offset+len` dirty (rounded out to whole pages).
    pub fn mark_dirty(&self, offset: u64, len: u64) -> Result<()> {
        let page = self.page_size() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= self.len as u64);
        let Some(end) = end else {
            fail!(InvalidArgument, "range {offset}+{len} is outside block {:?} of {} bytes", self.name, self.len);
        };
        self.mark_written();
        if len == 0 {
            return Ok(());
        }
        let first = offset / page;
        self.dirty.set_range(first as usize, (end.div_ceil(page) - first) as usize)
    }
}

impl Drop for RamBlock {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this value created; the last Arc is gone, so no thread
        // and no JavaScript view refers to it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_is_zero_and_writable() {
        let b = RamBlock::allocate("t", 64 << 10, 4096, true).unwrap();
        assert_eq!(b.pages(), 16);
        assert!(b.page(4096).iter().all(|&x| x == 0));
        // SAFETY: test-only write inside the block.
        unsafe { *b.page_ptr(8192) = 7 };
        assert_eq!(b.page(8192)[0], 7);
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
        b.zero_page(0);
        assert!(b.received.test(0));
        // SAFETY: test-only write inside the block.
        unsafe { *b.page_ptr(4096) = 1 };
        b.mark_written();
        b.zero_page(4096);
        assert_eq!(b.page(4096)[0], 0);
    }

    #[test]
    fn file_mapping_is_shared_with_the_file() {
        let dir = std::env::temp_dir().join(format!("multifd-block-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        {
            let b = RamBlock::map_file("img", &path, 4096, Some(8192), false).unwrap();
            // SAFETY: test-only write inside the block.
            unsafe { *b.page_ptr(4096) = 0x5a };
        }
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(bytes[4096], 0x5a);
        let again = RamBlock::map_file("img", &path, 4096, None, false).unwrap();
        assert_eq!(again.len(), 8192);
        assert_eq!(again.page(4096)[0], 0x5a);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
