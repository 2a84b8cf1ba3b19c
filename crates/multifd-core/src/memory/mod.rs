//! Block memory: the one module that touches the bytes of a RAM block.
//!
//! # Safety argument (written once, for every access below)
//!
//! A block is an `mmap`ed region that JavaScript (through an external `Uint8Array`), worker
//! threads, other processes (a shared file) and the kernel (`readv`, `preadv`) write at any
//! time, while channel threads read it to send. Those writers are outside Rust's view, so a
//! `&[u8]` or `&mut [u8]` over the region would promise something false: that nothing else
//! changes the bytes while the reference lives. A data race through a reference is undefined
//! behaviour whatever the element type, so this module never makes one. Instead:
//!
//! - **Kernel I/O** gets raw `iovec`s ([`Mapping::iovec`]). The kernel copies to or from the
//!   region itself; Rust never reads the bytes.
//! - **Copies** move bytes between the region and a private buffer with
//!   `ptr::copy_nonoverlapping` on raw pointers ([`Mapping::copy_to`], [`Mapping::copy_from`],
//!   [`Mapping::fill`]). Rust then inspects only the private copy, which nothing else
//!   writes; what the copy holds when another writer raced it is unspecified but always some
//!   bytes (every bit pattern is a valid `u8`). This is the rule rust-vmm's `vm-memory` applies
//!   to guest memory (its `VolatileSlice::copy_to`/`copy_from` use `copy_nonoverlapping` for
//!   anything longer than a machine word).
//! - **Inspection in place** (the zero-page scan) reads with `ptr::read_volatile`, word by
//!   word, into registers: each read is a single load the compiler may not merge, repeat or
//!   assume anything about.
//! - **Decoders** write a packet's pages through a [`WriteTarget`]: raw `iovec`s from
//!   `push_page`, handed to C code as an output pointer (zstd's `ZSTD_outBuffer`, which zstd
//!   fills with `memcpy` from its own window in its default buffered-output mode and never
//!   reads back) or filled with [`WriteTarget::copy_in`]. It is the same kind of write as
//!   [`Mapping::copy_from`], bounded by the packet's pages.
//! - **Compressors** read a packet's pages through a [`ReadSource`]: zstd gets the raw pointers
//!   as its `ZSTD_inBuffer` and `memcpy`s them into its own window before looking at them
//!   (buffered-input mode), the same kind of read as [`Mapping::copy_to`]; zlib copies them
//!   out with [`ReadSource::copy_out`] first. A payload that carries pages as they are (zstd's
//!   raw frames) hands them to the kernel as iovecs ([`ReadSource::push_iovecs`]), as the
//!   uncompressed path does, and its decoder copies them in with [`WriteTarget::copy_in_at`].
//! - **Digests** read in place with aligned `read_volatile` SIMD loads into registers
//!   ([`Mapping::xxh3_runs`], [`Mapping::xxh3_pages`], kernels in [`xxh3`]), the same rule as
//!   the zero scan, wider; when a digest must match compressed bytes, compression and digest
//!   read one private copy.
//!
//! Bounds are checked here, once, against the mapping's length; the mapping lives as long as
//! its owner (a `RamBlock` of `block.rs`, held by `Arc` by every thread and JavaScript view that
//! uses it), and is only unmapped in `Drop`, when nothing refers to it any more.
//!
//! Reading a file mapping past the file's end raises SIGBUS, and so does writing a page the
//! filesystem cannot back. [`guard`] turns both into a flag on the mapping instead of a dead
//! process; writers reserve space with `fallocate` first (see `block.rs`), so a full disk is an
//! `ERR_MULTIFD_NO_SPACE`, not a signal.
//!
//! ## Why not `vm-memory`
//! rust-vmm's `vm-memory` (`VolatileSlice`, `ReadVolatile`/`WriteVolatile`) implements the same
//! rules and is what Cloud Hypervisor and Firecracker use. We do not depend on it because what
//! it would save here is about a hundred lines (this module without its SIGBUS guard), while its
//! API is built around guest address spaces (`GuestMemory`, `GuestAddress`, regions): our data
//! path needs scatter/gather `readv`/`writev` over many pages of one block in one call, which
//! its `ReadVolatile`/`WriteVolatile` (one slice per call) do not offer, and it has no answer to
//! SIGBUS on file mappings, which we need anyway. The module keeps its vocabulary (`copy_to`,
//! `copy_from`, volatile reads) so that adopting it later is a local change.
//!
//! ## Costs
//! The uncompressed send and receive paths stay copy-free (iovecs). A zero scan is one
//! volatile 8-byte load per 8 bytes, four independent OR chains (about 4 KiB in 0.1-0.2 us for
//! a zero page; data pages usually stop in the first 32 bytes). A digest is one pass of xxh3
//! over the bytes where they lie (AVX2 when the CPU has it, else SSE2), no copy.
//! zstd compresses from and decodes into the pages in place (the only copy is zstd's own,
//! between its window and the pages); packets that do not compress go out as raw frames
//! straight from the pages (no copy in user space) and are copied into the pages once; zlib copies each packet's pages into a per-channel
//! buffer to compress, and decodes into one and copies that in (flate2 only takes slices).
//! With integrity on, compression reads one private copy and the digest is taken from it, so it
//! always matches the compressed bytes. TLS sends by copying the pages once into the
//! plaintext of the records it then seals in place (`tls/record.rs`), and receives by copying
//! each record it opened in place once into the pages ([`copy_in_raw`]), the one write into
//! block memory that the plaintext path's `readv` also makes.

pub mod guard;
mod xxh3;

use std::ptr::NonNull;

use crate::error::Result;

/// An iovec for `len` bytes at `ptr`.
pub fn iovec(ptr: *const u8, len: usize) -> libc::iovec {
    libc::iovec { iov_base: ptr as *mut libc::c_void, iov_len: len }
}

/// Appends `len` bytes at `ptr` to `iov`, extending the last iovec when the bytes follow it
/// (contiguous pages travel as one iovec). With `from`, iovecs before that index are never
/// extended (e.g. a packet header in front of the pages).
pub fn push_merged(iov: &mut Vec<libc::iovec>, from: usize, ptr: *const u8, len: usize) {
    if iov.len() > from
        && let Some(last) = iov.last_mut()
        && last.iov_base.cast::<u8>().cast_const().wrapping_add(last.iov_len) == ptr
    {
        last.iov_len += len;
        return;
    }
    iov.push(iovec(ptr, len));
}

/// One mmap'ed region, owned: unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
    /// Registered with the SIGBUS guard (file mappings).
    guard: Option<guard::Registration>,
}

// SAFETY: the region belongs to this value until drop and is only ever accessed through raw
// pointers as the module documentation describes, from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: no method hands out a reference to the bytes.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous memory, zero-filled. `prefault` faults every page in now.
    pub fn anonymous(len: usize, prefault: bool) -> Result<Mapping> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | if prefault { libc::MAP_POPULATE } else { 0 };
        Self::map(len, flags, -1).map_err(|e| crate::error::os_error(format!("mmap of {len} anonymous bytes"), e))
    }

    /// The first `len` bytes of the open file `fd`, MAP_SHARED, guarded against SIGBUS.
    pub fn shared_file(fd: std::os::fd::RawFd, len: usize, prefault: bool) -> Result<Mapping> {
        let flags = libc::MAP_SHARED | if prefault { libc::MAP_POPULATE } else { 0 };
        let mut m = Self::map(len, flags, fd).map_err(|e| crate::error::os_error(format!("mmap of {len} bytes of a file"), e))?;
        m.guard = Some(guard::register(m.base.as_ptr() as usize, len)?);
        Ok(m)
    }

    fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> std::io::Result<Mapping> {
        // SAFETY: a fresh mapping at an address the kernel chooses; no existing memory is
        // affected. The mapping of a file stays valid after its descriptor is closed.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { base: NonNull::new(ptr.cast()).expect("mmap never returns null on success"), len, guard: None })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Base address, for the JavaScript view (which JavaScript reads and writes on its own
    /// terms) and for pointer arithmetic; never dereferenced outside this module.
    pub fn as_ptr(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// True once the SIGBUS guard replaced one of this mapping's pages with zeros: a read past
    /// the end of a truncated file, or a write the filesystem could not back.
    pub fn faulted(&self) -> bool {
        self.guard.as_ref().is_some_and(guard::Registration::faulted)
    }

    /// The address `offset` bytes in, after checking `offset..offset + len` lies inside.
    fn at(&self, offset: u64, len: usize) -> *mut u8 {
        let end = offset.checked_add(len as u64);
        assert!(end.is_some_and(|e| e <= self.len as u64), "range 0x{offset:x}+{len} outside a mapping of {} bytes", self.len);
        // SAFETY: offset + len <= self.len, so the result stays inside the mapping.
        unsafe { self.base.as_ptr().add(offset as usize) }
    }

    /// An iovec over `len` bytes at `offset`, for the kernel to read or write (`readv`,
    /// `writev`, `preadv`, `pwritev`, `sendmsg`). Panics outside the mapping.
    pub fn iovec(&self, offset: u64, len: usize) -> libc::iovec {
        iovec(self.at(offset, len), len)
    }

    /// Appends the bytes at `offset..offset + len` to `iov`, merged with the last iovec when
    /// contiguous (see [`push_merged`]).
    pub fn push_iovec(&self, iov: &mut Vec<libc::iovec>, from: usize, offset: u64, len: usize) {
        push_merged(iov, from, self.at(offset, len), len);
    }

    /// Maps `len` bytes at `offset` writable now (`madvise(MADV_POPULATE_WRITE)`), so the
    /// bytes written into them next take no page fault each: one call instead of a fault per
    /// page. For a file mapping the pages must already be backed (`fallocate`): a page that
    /// cannot be stops the call with an error instead of a SIGBUS. A hint: on error (or a
    /// kernel before 5.14) nothing is lost, the writes fault the pages in as before.
    pub fn populate_write(&self, offset: u64, len: usize) -> std::io::Result<()> {
        let at = self.at(offset, len);
        // SAFETY: madvise on a range inside this mapping, which stays mapped while `self`
        // lives; it only maps pages, whose contents it leaves as they are, and reads or
        // writes no byte through Rust.
        if unsafe { libc::madvise(at.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Writes the mapping's changed pages back to the file it maps and waits for the writes
    /// (`msync(MS_SYNC)`); anonymous memory has nothing to write back.
    pub fn sync(&self) -> std::io::Result<()> {
        // SAFETY: msync on exactly this mapping's range, which stays mapped while `self`
        // lives; it reads no byte through Rust and changes no memory.
        if unsafe { libc::msync(self.base.as_ptr().cast(), self.len, libc::MS_SYNC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Copies `out.len()` bytes at `offset` out of the mapping.
    pub fn copy_to(&self, offset: u64, out: &mut [u8]) {
        let src = self.at(offset, out.len());
        // SAFETY: `at` checked the source range; `out` is a private buffer that cannot overlap
        // the mapping (it is a Rust allocation); see the module's safety argument.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn copy_from(&self, offset: u64, data: &[u8]) {
        let dst = self.at(offset, data.len());
        // SAFETY: `at` checked the target range; `data` is a private buffer, no overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
    }

    /// Writes `byte` over `len` bytes at `offset`.
    pub fn fill(&self, offset: u64, len: usize, byte: u8) {
        let dst = self.at(offset, len);
        // SAFETY: `at` checked the range.
        unsafe { std::ptr::write_bytes(dst, byte, len) }
    }

    /// True when every byte of `offset..offset + len` is zero, read with volatile loads.
    pub fn is_zero(&self, offset: u64, len: usize) -> bool {
        let p = self.at(offset, len);
        // Scalar volatile loads are about as fast as a vectorised scan once the page comes from
        // memory rather than L1 (`examples/codec_bench.rs` measures both).
        // Page offsets are multiples of the page size (at least 512), so the words are aligned;
        // anything else takes the byte loop.
        let (chunks, tail) = if (p as usize).is_multiple_of(CHUNK) { (len / CHUNK, len % CHUNK) } else { (0, len) };
        let c = p.cast::<u64>();
        let mut i = 0;
        // Machine words; four independent OR chains over 256 bytes, checked once per 256 bytes, so a data page
        // usually stops after its first block.
        const CHUNK: usize = 8;
        const PER_BLOCK: usize = 256 / CHUNK;
        while i + PER_BLOCK <= chunks {
            let mut acc = [0u64; 4];
            for k in 0..PER_BLOCK {
                // SAFETY: i + k < chunks, so the aligned chunk lies inside the checked range.
                acc[k % 4] |= unsafe { std::ptr::read_volatile(c.add(i + k)) };
            }
            if acc != [0; 4] {
                return false;
            }
            i += PER_BLOCK;
        }
        while i < chunks {
            // SAFETY: i < chunks.
            if unsafe { std::ptr::read_volatile(c.add(i)) } != 0 {
                return false;
            }
            i += 1;
        }
        let bytes = p.wrapping_add(chunks * CHUNK);
        // SAFETY: the last `tail` bytes of the checked range.
        (0..tail).all(|k| unsafe { std::ptr::read_volatile(bytes.add(k)) } == 0)
    }
}

impl Mapping {
    /// xxh3-64 (seed 0) of the bytes of `runs` (`(offset, length)`), taken in order: read in
    /// place when every run is 32-byte aligned with a length that is a multiple of 64 and the
    /// runs exceed 240 bytes (pages always do), through a private copy otherwise.
    pub fn xxh3_runs(&self, runs: &[(u64, usize)]) -> u64 {
        let raw: Vec<(*const u8, usize)> = runs.iter().map(|&(o, n)| (self.at(o, n).cast_const(), n)).collect();
        let total: usize = runs.iter().map(|r| r.1).sum();
        if total > 240 && raw.iter().all(|&(p, n)| xxh3::fits(p, n)) {
            // SAFETY: `at` checked every run against the mapping, which outlives this call;
            // `fits` checked their shape, and `total` is their sum.
            return unsafe { xxh3::digest(&raw, total) };
        }
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = [0u8; 4096];
        for &(offset, len) in runs {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(buf.len());
                self.copy_to(offset + at as u64, &mut buf[..n]);
                h.update(&buf[..n]);
                at += n;
            }
        }
        h.digest()
    }

    /// The xxh3-64 of the `page`-byte pages at `offsets`, taken in order (what
    /// [`Mapping::xxh3_runs`] returns for them), and each page's own xxh3-64 in `out`, in one
    /// pass over the bytes where page sizes allow it (multiples of 1 KiB, so always for 4 KiB
    /// pages), in two otherwise.
    pub fn xxh3_pages(&self, offsets: &[u64], page: usize, out: &mut Vec<u64>) -> u64 {
        out.clear();
        let raw: Vec<*const u8> = offsets.iter().map(|&o| self.at(o, page).cast_const()).collect();
        if !raw.is_empty() && page > 240 && xxh3::fits_pages(page) && raw.iter().all(|&p| xxh3::fits(p, page)) {
            out.resize(raw.len(), 0);
            // SAFETY: `at` checked every page against the mapping, which outlives this call;
            // `fits` and `fits_pages` checked their shape; `raw` is not empty.
            return unsafe { xxh3::digest_pages(&raw, page, out) };
        }
        out.extend(offsets.iter().map(|&o| self.xxh3_runs(&[(o, page)])));
        let runs: Vec<(u64, usize)> = offsets.iter().map(|&o| (o, page)).collect();
        self.xxh3_runs(&runs)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Unregister first, so the guard never matches an address that is being unmapped.
        self.guard.take();
        // SAFETY: unmapping the mapping this value created; its owner is gone, so no thread
        // and no JavaScript view refers to it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Copies bytes out of the raw memory an iovec describes (TLS encrypts from such a copy).
///
/// # Safety
/// `src` must be readable for `out.len()` bytes for the duration of the call (a live iovec).
pub unsafe fn copy_out_raw(src: *const u8, out: &mut [u8]) {
    // SAFETY: forwarded from the caller; `out` is a private buffer.
    unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
}

/// Copies `data` into the raw memory an iovec describes (TLS copies each record it opened in
/// place in).
///
/// On x86-64, a copy of a page or more writes its 64-byte-aligned middle with non-temporal
/// stores: received pages are not read again soon, and streaming them past the cache skips the
/// read of every destination line that a cached store makes first. Measured on the EPYC
/// development machine, 16 KiB copies into 1 GiB of cold, populated pages: 0.042 CPU-s/GiB
/// against 0.086 for `copy_nonoverlapping`; copying a 512 KiB packet and then reading it all
/// back (as a digest does): 0.073 against 0.097.
///
/// # Safety
/// `dst` must be writable for `data.len()` bytes for the duration of the call.
pub unsafe fn copy_in_raw(dst: *mut u8, data: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if data.len() >= 4096 {
        // SAFETY: forwarded from the caller.
        return unsafe { stream_in(dst, data) };
    }
    // SAFETY: forwarded from the caller; `data` is a private buffer.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
}

/// [`copy_in_raw`] with SSE2 (every x86-64 has it) non-temporal stores for the aligned middle.
///
/// # Safety
/// As for [`copy_in_raw`].
#[cfg(target_arch = "x86_64")]
unsafe fn stream_in(dst: *mut u8, data: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let head = dst.align_offset(64).min(data.len());
    let body = (data.len() - head) & !63;
    let src = data.as_ptr();
    // SAFETY: the caller makes `dst..dst + data.len()` writable; every access below stays
    // within it and within `data`: the head and the tail with `copy_nonoverlapping`, the middle
    // 16 bytes at a time with unaligned loads from `data` and aligned (dst + head is 64-byte
    // aligned) non-temporal stores into `dst`. The stores write bytes the copy would have
    // written, only bypassing the cache; `sfence` orders them before whatever this thread
    // stores next (the caller's progress flags), as a plain copy's stores would be.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        let mut at = head;
        while at < head + body {
            for lane in 0..4 {
                let v = _mm_loadu_si128(src.add(at + 16 * lane).cast::<__m128i>());
                _mm_stream_si128(dst.add(at + 16 * lane).cast::<__m128i>(), v);
            }
            at += 64;
        }
        _mm_sfence();
        std::ptr::copy_nonoverlapping(src.add(at), dst.add(at), data.len() - at);
    }
}

/// Memory a compressor reads: one packet's pages as raw `iovec`s, or private slices. Nothing
/// makes a Rust slice over block memory; compressors read it through [`Self::regions`] (an input
/// pointer for C code that only copies it into its own window) or [`Self::copy_out`].
pub struct ReadSource<'a>(Source<'a>);

enum Source<'a> {
    Pages(&'a [libc::iovec]),
    Slices(&'a [&'a [u8]]),
}

impl<'a> ReadSource<'a> {
    /// Block pages.
    ///
    /// # Safety
    /// Every iovec must be readable for its length while the source lives (from
    /// `RamBlock::push_page`, on a block the caller holds).
    pub unsafe fn pages(iov: &'a [libc::iovec]) -> Self {
        ReadSource(Source::Pages(iov))
    }

    /// Private slices.
    pub fn slices(s: &'a [&'a [u8]]) -> Self {
        ReadSource(Source::Slices(s))
    }

    /// The private slices, for compressors that only read slices (block pages are never).
    pub fn as_slices(&self) -> Option<&'a [&'a [u8]]> {
        match self.0 {
            Source::Pages(_) => None,
            Source::Slices(s) => Some(s),
        }
    }

    /// The regions in order, as raw pointers and lengths, each readable while `self` lives.
    pub fn regions(&self) -> impl Iterator<Item = (*const u8, usize)> + '_ {
        let (iov, slices): (&[libc::iovec], &[&[u8]]) = match self.0 {
            Source::Pages(iov) => (iov, &[]),
            Source::Slices(s) => (&[], s),
        };
        iov.iter().map(|v| (v.iov_base.cast_const().cast::<u8>(), v.iov_len)).chain(slices.iter().map(|s| (s.as_ptr(), s.len())))
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.regions().map(|(_, n)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every region, in order, in `out` (resized to fit).
    pub fn copy_out(&self, out: &mut Vec<u8>) {
        out.resize(self.len(), 0);
        let mut at = 0;
        for (p, n) in self.regions() {
            // SAFETY: the constructors guarantee each region is readable for its length; `out`
            // is a private buffer of `len()` bytes, so no overlap and `at + n <= out.len()`.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().add(at), n) };
            at += n;
        }
    }

    /// Appends a copy of bytes `at..at + len` of the regions taken in order to `out`. Panics
    /// when the range is outside.
    pub fn extend_out(&self, at: usize, len: usize, out: &mut Vec<u8>) {
        let mut iov = Vec::new();
        self.push_iovecs(&mut iov, 0, at, len);
        out.reserve(len);
        for v in iov {
            // SAFETY: `push_iovecs` gave sub-ranges of the regions, readable while the source
            // lives; `out` is a private buffer with room reserved for them, so no overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>().cast_const(), out.as_mut_ptr().add(out.len()), v.iov_len);
                out.set_len(out.len() + v.iov_len);
            }
        }
    }

    /// Appends iovecs over bytes `at..at + len` of the regions taken in order, for the kernel
    /// to send (a payload that carries pages as they are); iovecs before index `from` are
    /// never extended (see [`push_merged`]). Panics when the range is outside.
    pub fn push_iovecs(&self, iov: &mut Vec<libc::iovec>, from: usize, mut at: usize, mut len: usize) {
        for (p, n) in self.regions() {
            if len == 0 {
                break;
            }
            if at >= n {
                at -= n;
                continue;
            }
            let k = (n - at).min(len);
            push_merged(iov, from, p.wrapping_add(at), k);
            (at, len) = (0, len - k);
        }
        assert_eq!(len, 0, "range outside a read source");
    }
}

/// Memory a decoder fills: one packet's pages as raw `iovec`s, or a private buffer. Nothing
/// makes a Rust slice over it; decoders write through [`Self::regions`] (an output pointer for
/// C code that only writes there) or [`Self::copy_in`].
pub struct WriteTarget<'a>(Target<'a>);

enum Target<'a> {
    Pages(&'a [libc::iovec]),
    Buffer(libc::iovec, std::marker::PhantomData<&'a mut [u8]>),
}

impl<'a> WriteTarget<'a> {
    /// Block pages.
    ///
    /// # Safety
    /// Every iovec must be writable for its length while the target lives (from
    /// `RamBlock::push_page`, on a block the caller holds), and none may overlap memory Rust
    /// holds a reference to.
    pub unsafe fn pages(iov: &'a [libc::iovec]) -> Self {
        WriteTarget(Target::Pages(iov))
    }

    /// A private buffer, borrowed for the target's life.
    pub fn buffer(buf: &'a mut [u8]) -> Self {
        WriteTarget(Target::Buffer(iovec(buf.as_mut_ptr(), buf.len()), std::marker::PhantomData))
    }

    /// The regions to fill, in order: each writable for `iov_len` bytes while `self` lives.
    pub fn regions(&self) -> &[libc::iovec] {
        match &self.0 {
            Target::Pages(iov) => iov,
            Target::Buffer(one, _) => std::slice::from_ref(one),
        }
    }

    /// The private buffer, for decoders that only write slices (block pages are never one).
    pub fn as_buffer(&mut self) -> Option<&mut [u8]> {
        match &self.0 {
            Target::Pages(_) => None,
            // SAFETY: made by `buffer` from a `&'a mut [u8]` that `self` still borrows
            // exclusively, and reborrowed here for no longer than `&mut self`.
            Target::Buffer(v, _) => Some(unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) }),
        }
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.regions().iter().map(|v| v.iov_len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills the regions in order with `data`, which must be exactly [`Self::len`] bytes.
    pub fn copy_in(&self, data: &[u8]) {
        assert_eq!(data.len(), self.len(), "a write target is filled exactly");
        self.copy_in_at(0, data);
    }

    /// Copies `data` over bytes `at..at + data.len()` of the regions taken in order (a
    /// decoder that fills the target piece by piece). Panics when the range is outside.
    pub fn copy_in_at(&self, mut at: usize, mut data: &[u8]) {
        for v in self.regions() {
            if data.is_empty() {
                break;
            }
            if at >= v.iov_len {
                at -= v.iov_len;
                continue;
            }
            let k = (v.iov_len - at).min(data.len());
            // SAFETY: the constructors guarantee each region is writable for its length, and
            // `at + k <= iov_len`; `data` is a private buffer, so no overlap.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), v.iov_base.cast::<u8>().add(at), k) };
            (at, data) = (0, &data[k..]);
        }
        assert!(data.is_empty(), "range outside a write target");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_scan_finds_any_set_byte() {
        let m = Mapping::anonymous(65536, false).unwrap();
        for len in [1usize, 7, 8, 255, 256, 257, 4096, 65536] {
            assert!(m.is_zero(0, len));
            for at in [0, len / 2, len - 1] {
                m.copy_from(at as u64, &[0x80]);
                assert!(!m.is_zero(0, len), "len {len} at {at}");
                m.fill(at as u64, 1, 0);
            }
        }
        m.copy_from(3, &[1]);
        assert!(!m.is_zero(1, 8), "unaligned start");
        assert!(m.is_zero(4, 8));
    }

    #[test]
    fn copies_round_trip_and_iovecs_merge() {
        let m = Mapping::anonymous(3 * 4096, false).unwrap();
        m.copy_from(4096, &[7u8; 4096]);
        let mut out = [0u8; 4096];
        m.copy_to(4096, &mut out);
        assert!(out.iter().all(|&b| b == 7));
        let mut iov = Vec::new();
        m.push_iovec(&mut iov, 0, 0, 4096);
        m.push_iovec(&mut iov, 0, 4096, 4096);
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_len, 2 * 4096);
        // Iovecs before `from` (a header) are never extended.
        m.push_iovec(&mut iov, 1, 8192, 4096);
        assert_eq!(iov.len(), 2);
    }

    #[test]
    fn copy_in_writes_exactly_its_bytes_at_any_alignment_and_length() {
        let m = Mapping::anonymous(8 * 4096, false).unwrap();
        let data: Vec<u8> = (0..5 * 4096 + 200).map(|i| (i * 7 + 1) as u8).collect();
        for start in [0usize, 1, 15, 16, 63, 64, 65, 4095] {
            for len in [0usize, 1, 63, 4095, 4096, 4097, 4096 + 63, 4096 + 64, 16384 + 5, data.len()] {
                m.fill(0, m.len(), 0xee);
                // SAFETY: start + len stays inside the mapping, which lives for the call.
                unsafe { copy_in_raw(m.as_ptr().add(start), &data[..len]) };
                let mut out = vec![0u8; m.len()];
                m.copy_to(0, &mut out);
                assert!(out[..start].iter().all(|&b| b == 0xee), "before, start {start} len {len}");
                assert!(out[start..start + len] == data[..len], "copied, start {start} len {len}");
                assert!(out[start + len..].iter().all(|&b| b == 0xee), "after, start {start} len {len}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "outside a mapping")]
    fn out_of_bounds_panics() {
        Mapping::anonymous(4096, false).unwrap().iovec(4096, 1);
    }
}
