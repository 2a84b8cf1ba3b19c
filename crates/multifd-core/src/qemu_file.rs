//! Reader for the files QEMU writes with `migrate file:PATH` and the `mapped-ram` capability
//! (with or without multifd): finds every RAM block's mapped-ram header and bitmap and
//! extracts a block's contents. Spec §9; the device state after the RAM section is not read.
//!
//! The layout, as QEMU 10.0 writes it (all integers big-endian):
//!
//! ```text
//! be32 0x5145564D 'QEVM', be32 3
//! 0x07 QEMU_VM_CONFIGURATION: be32 len + machine type ("pc-i440fx-10.0"), then vmstate
//!      subsections, each 0x05, u8 len + name, be32 version (1), then its fields:
//!        "configuration/target-page-bits"  be32 bits            (variable page size targets)
//!        "configuration/capabilities"      be32 count, count x (u8 len + name)
//!        "configuration/uuid"              16 bytes              (validate-uuid)
//!      No terminator and no footer: the configuration ends at the first byte that is not 0x05.
//! 0x01 QEMU_VM_SECTION_START: be32 section id, u8 len + "ram", be32 instance, be32 version 4
//!      be64 total_ram_bytes | 0x04 (RAM_SAVE_FLAG_MEM_SIZE)
//!      per block: u8 len + idstr, be64 used_length, [be64 addr with x-ignore-shared],
//!                 the 28-byte MappedRamHeader, then (out of band) bitmap and pages region;
//!                 the next block starts at pages_offset + used_length
//!      be64 0x10 (RAM_SAVE_FLAG_EOS), 0x7E footer + be32 section id
//! RAM PART (0x02) and END (0x03) sections holding only flags, QEMU_VM_COMMANDs (0x08),
//! device sections, 0x00 QEMU_VM_EOF, 0x06 + be32 len + JSON vmdesc.
//! ```
//!
//! Every length and offset read from the file is bounded and overflow-checked, nothing is
//! read outside the file, and memory use does not depend on the file's claims (bitmaps and
//! pages are streamed in chunks).

use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorCode, Result, fail, os_error};
use crate::mapped_ram::{self, BlockHeader, HEADER_LEN};

/// `QEMU_VM_FILE_MAGIC`, "QEVM".
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION`.
pub const FILE_VERSION: u32 = 3;
/// Version of the "ram" section.
pub const RAM_SECTION_VERSION: u32 = 4;
/// Most RAM blocks a file may list.
pub const MAX_BLOCKS: usize = 4096;
/// Largest block accepted (64 TiB).
pub const MAX_USED_LEN: u64 = 1 << 46;
/// Largest total RAM accepted (1 PiB).
pub const MAX_TOTAL_RAM: u64 = 1 << 50;

const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const COMMAND: u8 = 0x08;
const SECTION_FOOTER: u8 = 0x7e;

const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
const RAM_SAVE_FLAG_EOS: u64 = 0x10;
const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;
/// The flags live below the smallest target page (1 KiB).
const RAM_FLAGS_MASK: u64 = 0x3ff;

const MAX_MACHINE_LEN: u32 = 256;
const MAX_CAPABILITIES: u32 = 256;
const MAX_SUBSECTIONS: usize = 16;
/// Largest single read of pages (`MAPPED_RAM_LOAD_BUF_SIZE`).
const CHUNK: u64 = 1 << 20;
/// Bitmap bytes read at a time (a multiple of 8).
const BITMAP_CHUNK: u64 = 64 << 10;
/// Bounds for the walk over the RAM PART/END sections that decides [`QemuFile::is_complete`].
const MAX_TRAILER_STEPS: usize = 1 << 16;

/// One RAM block of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuBlock {
    /// The RAMBlock idstr, e.g. `pc.ram`, `mem` (a memory backend's id) or `/rom@etc/acpi/tables`.
    pub name: String,
    /// Bytes of guest RAM in the block.
    pub used_len: u64,
    pub header: BlockHeader,
    /// Pages whose bit is set: the pages whose data is in the file. With zero-page detection
    /// on (QEMU's default) zero pages are left clear, so for a completed save this is the
    /// count of non-zero pages; with `zero-page-detection=none` every page is present.
    pub pages_present: u64,
    /// The block's guest address, written only with the x-ignore-shared capability.
    pub addr: Option<u64>,
    /// The block was skipped by x-ignore-shared (shared memory, QEMU 11.0+): its header has
    /// zero offsets and the file holds neither bitmap nor pages for it.
    pub ignored: bool,
}

impl QemuBlock {
    pub fn pages(&self) -> u64 {
        self.used_len / self.header.page_size
    }
}

/// A QEMU mapped-ram migration file, parsed up to the end of its RAM block list.
#[derive(Debug)]
pub struct QemuFile {
    file: File,
    path: PathBuf,
    file_len: u64,
    machine: String,
    capabilities: Vec<String>,
    blocks: Vec<QemuBlock>,
    complete: bool,
}

/// Reads exactly `buf.len()` bytes at `off`, refusing anything past `file_len`.
fn read_at(file: &File, file_len: u64, buf: &mut [u8], off: u64, what: impl fmt::Display) -> Result<()> {
    let len = buf.len() as u64;
    if off.checked_add(len).is_none_or(|end| end > file_len) {
        fail!(Truncated, "{what}: {len} bytes at offset {off} lie past the end of the file ({file_len} bytes)");
    }
    file.read_exact_at(buf, off).map_err(|e| os_error(format_args!("{what}: reading {len} bytes at offset {off}"), e))
}

/// Sequential reads of the stream part of the file.
struct Cursor<'a> {
    file: &'a File,
    len: u64,
    pos: u64,
}

impl Cursor<'_> {
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        read_at(self.file, self.len, &mut b, self.pos, what)?;
        self.pos += N as u64;
        Ok(b)
    }

    /// `n` bytes; callers bound `n` (at most a few KiB).
    fn vec(&mut self, n: usize, what: &str) -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        read_at(self.file, self.len, &mut b, self.pos, what)?;
        self.pos += n as u64;
        Ok(b)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn peek_u8(&self, what: &str) -> Result<u8> {
        let mut b = [0u8; 1];
        read_at(self.file, self.len, &mut b, self.pos, what)?;
        Ok(b[0])
    }

    fn be16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn be32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn be64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.len => {
                self.pos = end;
                Ok(())
            }
            _ => fail!(Truncated, "{what}: {n} bytes at offset {} lie past the end of the file ({} bytes)", self.pos, self.len),
        }
    }

    /// A string of `n` bytes that must be UTF-8.
    fn string(&mut self, n: usize, what: &str) -> Result<String> {
        let at = self.pos;
        String::from_utf8(self.vec(n, what)?).map_err(|_| Error::new(ErrorCode::FileFormat, format!("{what} at offset {at} is not UTF-8")))
    }

    /// QEMU's idstr: a u8 length (not 0) and that many bytes.
    fn idstr(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let n = self.u8(what)?;
        if n == 0 {
            fail!(FileFormat, "{what} at offset {at} has length 0");
        }
        self.string(n.into(), what)
    }
}

/// What the configuration section says.
struct Configuration {
    machine: String,
    capabilities: Vec<String>,
    page_size: Option<u64>,
}

fn parse_configuration(cur: &mut Cursor) -> Result<Configuration> {
    let at = cur.pos;
    let kind = cur.u8("section type")?;
    if kind != CONFIGURATION {
        fail!(FileFormat, "expected the configuration section (type 0x07) at offset {at}, found type {kind:#04x}; without it the file cannot be checked for mapped-ram");
    }
    let len = cur.be32("machine type length")?;
    if len == 0 || len > MAX_MACHINE_LEN {
        fail!(FileFormat, "machine type length {len} at offset {} is outside 1..={MAX_MACHINE_LEN}", at + 1);
    }
    let machine = cur.string(len as usize, "machine type")?;
    let mut config = Configuration { machine, capabilities: Vec::new(), page_size: None };
    let mut seen: Vec<String> = Vec::new();
    while cur.peek_u8("section type")? == SUBSECTION {
        if seen.len() == MAX_SUBSECTIONS {
            fail!(FileFormat, "more than {MAX_SUBSECTIONS} configuration subsections");
        }
        let at = cur.pos;
        cur.pos += 1;
        let name = cur.idstr("configuration subsection name")?;
        if seen.contains(&name) {
            fail!(FileFormat, "configuration subsection '{name}' at offset {at} appears twice");
        }
        let version = cur.be32("configuration subsection version")?;
        if version != 1 {
            fail!(BadVersion, "configuration subsection '{name}' at offset {at} has version {version}, this reader knows 1");
        }
        match name.as_str() {
            "configuration/target-page-bits" => {
                let bits = cur.be32("target page bits")?;
                if !(9..=21).contains(&bits) {
                    fail!(FileFormat, "target page bits {bits} at offset {at} are outside 9..=21");
                }
                config.page_size = Some(1 << bits);
            }
            "configuration/capabilities" => {
                let count = cur.be32("capability count")?;
                if count > MAX_CAPABILITIES {
                    fail!(FileFormat, "{count} capabilities at offset {at}, at most {MAX_CAPABILITIES} accepted");
                }
                for _ in 0..count {
                    config.capabilities.push(cur.idstr("capability name")?);
                }
            }
            "configuration/uuid" => {
                cur.skip(16, "VM UUID")?;
            }
            _ => fail!(FileFormat, "unknown configuration subsection '{name}' at offset {at}"),
        }
        seen.push(name);
    }
    Ok(config)
}

/// The header of an x-ignore-shared block that is not in the file (both offsets 0): checked
/// like any other except for the offsets.
fn ignored_header(raw: &[u8; HEADER_LEN], used_len: u64, expect_page_size: Option<u64>) -> Result<BlockHeader> {
    let version = u32::from_be_bytes(raw[0..4].try_into().unwrap());
    if version != mapped_ram::HEADER_VERSION {
        fail!(BadVersion, "mapped-ram header version {version}, expected {}", mapped_ram::HEADER_VERSION);
    }
    let page_size = u64::from_be_bytes(raw[4..12].try_into().unwrap());
    if !page_size.is_power_of_two() || !(512..=(1 << 21)).contains(&page_size) || expect_page_size.is_some_and(|p| p != page_size) || !used_len.is_multiple_of(page_size) {
        fail!(FileFormat, "mapped-ram page size {page_size} does not fit a block of {used_len} bytes (expected page size {expect_page_size:?})");
    }
    Ok(BlockHeader { page_size, bitmap_offset: 0, pages_offset: 0 })
}

/// Reads the section header that must open the RAM section; returns its section id.
fn parse_ram_section_header(cur: &mut Cursor) -> Result<u32> {
    let at = cur.pos;
    let kind = cur.u8("section type")?;
    if kind != SECTION_START && kind != SECTION_FULL {
        fail!(FileFormat, "unexpected section type {kind:#04x} at offset {at} before the RAM section (expected QEMU_VM_SECTION_START 0x01)");
    }
    let id = cur.be32("section id")?;
    let name = cur.idstr("section name")?;
    if name != "ram" {
        fail!(FileFormat, "section '{name}' at offset {at} comes before the RAM section and cannot be skipped");
    }
    let _instance = cur.be32("section instance id")?;
    let version = cur.be32("section version")?;
    if version != RAM_SECTION_VERSION {
        fail!(BadVersion, "RAM section version {version} at offset {at}, this reader knows {RAM_SECTION_VERSION}");
    }
    Ok(id)
}

/// Calls `visit(first_page, word)` for each bitmap word of `pages` pages, bits past the last
/// page cleared. Reads the bitmap in chunks.
fn visit_bitmap(file: &File, file_len: u64, h: &BlockHeader, pages: u64, mut visit: impl FnMut(u64, u64) -> Result<()>) -> Result<()> {
    let total = mapped_ram::bitmap_len(pages);
    let mut buf = vec![0u8; total.min(BITMAP_CHUNK) as usize];
    let mut done = 0u64;
    while done < total {
        let n = (total - done).min(BITMAP_CHUNK) as usize;
        read_at(file, file_len, &mut buf[..n], h.bitmap_offset + done, "mapped-ram bitmap")?;
        for (k, word) in mapped_ram::bitmap_words(&buf[..n]).into_iter().enumerate() {
            let first = (done / 8 + k as u64) * 64;
            let valid = (pages - first).min(64);
            let mask = if valid == 64 { u64::MAX } else { (1u64 << valid) - 1 };
            visit(first, word & mask)?;
        }
        done += n as u64;
    }
    Ok(())
}

/// Calls `emit(first_page, end_page, present)` for the maximal runs of present and of absent
/// pages, in order; together they cover `0..pages`. Runs within a word come from
/// [`crate::bitmap::word_runs`]; runs that continue across words are joined here.
fn for_each_run(file: &File, file_len: u64, h: &BlockHeader, pages: u64, mut emit: impl FnMut(u64, u64, bool) -> Result<()>) -> Result<()> {
    // The run being built: (first page, end page, present).
    let mut open: Option<(u64, u64, bool)> = None;
    let mut extend = |start: u64, end: u64, present: bool, emit: &mut dyn FnMut(u64, u64, bool) -> Result<()>| -> Result<()> {
        match open {
            Some((first, last, p)) if p == present && last == start => open = Some((first, end, p)),
            Some((first, last, p)) => {
                emit(first, last, p)?;
                open = Some((start, end, present));
            }
            None => open = Some((start, end, present)),
        }
        Ok(())
    };
    visit_bitmap(file, file_len, h, pages, |first, word| {
        let n = (pages - first).min(64) as usize;
        let mut at = 0;
        for (s, c) in crate::bitmap::word_runs(&[word], n, true) {
            if s > at {
                extend(first + at as u64, first + s as u64, false, &mut emit)?;
            }
            extend(first + s as u64, first + (s + c) as u64, true, &mut emit)?;
            at = s + c;
        }
        if at < n {
            extend(first + at as u64, first + n as u64, false, &mut emit)?;
        }
        Ok(())
    })?;
    match open {
        Some((first, end, present)) => emit(first, end, present),
        None => Ok(()),
    }
}

/// Where [`QemuFile::extract`] puts the bytes.
enum Sink<'a> {
    /// A seekable file: positioned writes from `start`; ranges of zeros at or past the file's
    /// original end are left as holes.
    At { out: &'a File, start: u64, orig_len: u64 },
    /// A pipe or other stream: everything written in order.
    Stream { out: &'a mut File },
}

impl Sink<'_> {
    fn data(&mut self, off: u64, buf: &[u8]) -> Result<()> {
        let r = match self {
            Sink::At { out, start, .. } => out.write_all_at(buf, *start + off),
            Sink::Stream { out } => out.write_all(buf),
        };
        r.map_err(|e| os_error("writing the extracted block", e))
    }

    /// `zeros` is a buffer of zeros at least `len` long (up to [`CHUNK`]).
    fn zeros(&mut self, off: u64, len: u64, zeros: &[u8]) -> Result<()> {
        match self {
            Sink::At { start, orig_len, .. } => {
                // Only the part over existing bytes must be written; past the end is a hole.
                let begin = *start + off;
                let stop = (begin + len).min(*orig_len);
                if stop > begin {
                    self.data(off, &zeros[..(stop - begin) as usize])?;
                }
                Ok(())
            }
            Sink::Stream { .. } => self.data(off, &zeros[..len as usize]),
        }
    }
}

impl QemuFile {
    /// Opens a file that QEMU wrote from its beginning (`file:PATH`).
    pub fn open(path: &Path) -> Result<QemuFile> {
        QemuFile::open_at(path, 0)
    }

    /// Opens a file that QEMU wrote at `offset` (`file:PATH,offset=OFFSET`). The offsets in
    /// the mapped-ram headers are absolute, so nothing else changes.
    pub fn open_at(path: &Path, offset: u64) -> Result<QemuFile> {
        let file = File::open(path).map_err(|e| os_error(format_args!("opening {}", path.display()), e))?;
        let meta = file.metadata().map_err(|e| os_error(format_args!("stat {}", path.display()), e))?;
        if !meta.is_file() {
            fail!(InvalidArgument, "{} is not a regular file", path.display());
        }
        let file_len = meta.len();
        let mut cur = Cursor { file: &file, len: file_len, pos: offset };

        let magic = cur.be32("file magic")?;
        if magic != FILE_MAGIC {
            fail!(BadMagic, "not a QEMU migration file: magic {magic:#010x} at offset {offset}, expected {FILE_MAGIC:#010x} ('QEVM')");
        }
        let version = cur.be32("file version")?;
        if version != FILE_VERSION {
            fail!(BadVersion, "QEMU migration file version {version}, this reader knows {FILE_VERSION}");
        }
        let config = parse_configuration(&mut cur)?;
        if !config.capabilities.iter().any(|c| c == "mapped-ram") {
            fail!(FileFormat, "not a mapped-ram file: the configuration lists the capabilities [{}]", config.capabilities.join(", "));
        }
        let ignore_shared = config.capabilities.iter().any(|c| c == "x-ignore-shared");
        let ram_id = parse_ram_section_header(&mut cur)?;

        let at = cur.pos;
        let word = cur.be64("RAM size")?;
        let (flags, total) = (word & RAM_FLAGS_MASK, word & !RAM_FLAGS_MASK);
        if flags != RAM_SAVE_FLAG_MEM_SIZE {
            fail!(FileFormat, "the RAM section at offset {at} starts with flags {flags:#x}, expected RAM_SAVE_FLAG_MEM_SIZE (0x4)");
        }
        if total == 0 || total > MAX_TOTAL_RAM {
            fail!(FileFormat, "total RAM {total} at offset {at} is outside 1..={MAX_TOTAL_RAM}");
        }

        let mut blocks: Vec<QemuBlock> = Vec::new();
        let mut page_size = config.page_size;
        let mut remaining = total;
        while remaining > 0 {
            if blocks.len() == MAX_BLOCKS {
                fail!(FileFormat, "more than {MAX_BLOCKS} RAM blocks");
            }
            let at = cur.pos;
            let name = cur.idstr("RAM block name")?;
            if blocks.iter().any(|b| b.name == name) {
                fail!(DuplicateBlock, "RAM block '{name}' at offset {at} appears twice");
            }
            let used_len = cur.be64("RAM block length")?;
            if used_len == 0 || used_len > MAX_USED_LEN {
                fail!(FileFormat, "RAM block '{name}' at offset {at} has length {used_len}, outside 1..={MAX_USED_LEN}");
            }
            if used_len > remaining {
                fail!(FileFormat, "RAM block '{name}' at offset {at} has {used_len} bytes but only {remaining} of the {total} bytes of RAM are left");
            }
            let addr = if ignore_shared { Some(cur.be64("RAM block address")?) } else { None };
            let header_offset = cur.pos;
            let raw: [u8; HEADER_LEN] = cur.array("mapped-ram header")?;
            let block = if ignore_shared && raw[12..].iter().all(|&b| b == 0) {
                let h = ignored_header(&raw, used_len, page_size).map_err(|e| e.context(format_args!("RAM block '{name}'")))?;
                page_size = Some(h.page_size);
                cur.pos = header_offset + HEADER_LEN as u64;
                QemuBlock { name, used_len, header: h, pages_present: 0, addr, ignored: true }
            } else {
                let h = BlockHeader::decode(&raw, header_offset, used_len, file_len, page_size).map_err(|e| e.context(format_args!("RAM block '{name}'")))?;
                page_size = Some(h.page_size);
                let pages = used_len / h.page_size;
                let mut present = 0u64;
                let mut last = None;
                visit_bitmap(&file, file_len, &h, pages, |first, word| {
                    if word != 0 {
                        present += u64::from(word.count_ones());
                        last = Some(first + 63 - u64::from(word.leading_zeros()));
                    }
                    Ok(())
                })
                .map_err(|e| e.context(format_args!("RAM block '{name}'")))?;
                if let Some(last) = last {
                    // decode() checked that the pages region does not overflow.
                    let end = h.pages_offset + (last + 1) * h.page_size;
                    if end > file_len {
                        fail!(Truncated, "RAM block '{name}': page {last} is marked present but ends at offset {end}, past the end of the file ({file_len} bytes)");
                    }
                }
                cur.pos = h.end(used_len);
                QemuBlock { name, used_len, header: h, pages_present: present, addr, ignored: false }
            };
            remaining -= used_len;
            blocks.push(block);
        }

        // Anything wrong in the rest only makes the file incomplete.
        let complete = ram_section_completes(&mut cur, ram_id).unwrap_or(false);
        Ok(QemuFile { file, path: path.to_path_buf(), file_len, machine: config.machine, capabilities: config.capabilities, blocks, complete })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The machine type from the configuration section, e.g. `pc-i440fx-10.0`.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The migration capabilities the source announced (those QEMU validates: `mapped-ram`,
    /// `x-ignore-shared`); multifd is not among them.
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    pub fn blocks(&self) -> &[QemuBlock] {
        &self.blocks
    }

    pub fn block(&self, name: &str) -> Option<&QemuBlock> {
        self.blocks.iter().find(|b| b.name == name)
    }

    /// Whether the RAM section runs on to its END part. QEMU writes the bitmaps only when the
    /// save completes, so an interrupted save has clear bitmaps and extracts as zeros; the
    /// format has no other completion marker.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    fn extractable(&self, name: &str) -> Result<&QemuBlock> {
        let Some(b) = self.block(name) else {
            fail!(UnknownBlock, "no RAM block '{name}' in {} (blocks: {})", self.path.display(), self.blocks.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", "));
        };
        if b.ignored {
            fail!(InvalidArgument, "RAM block '{name}' was skipped by x-ignore-shared; its contents are not in the file");
        }
        Ok(b)
    }

    /// Calls `f(block_offset, len, present)` for the block in pieces of at most [`CHUNK`]
    /// bytes, in order, covering the whole block.
    fn walk(&self, b: &QemuBlock, mut f: impl FnMut(u64, u64, bool) -> Result<()>) -> Result<()> {
        let ps = b.header.page_size;
        for_each_run(&self.file, self.file_len, &b.header, b.pages(), |first, end, present| {
            let (mut off, stop) = (first * ps, end * ps);
            while off < stop {
                let n = (stop - off).min(CHUNK);
                f(off, n, present)?;
                off += n;
            }
            Ok(())
        })
        .map_err(|e| e.context(format_args!("RAM block '{}'", b.name)))
    }

    fn read_pages(&self, b: &QemuBlock, off: u64, buf: &mut [u8]) -> Result<()> {
        read_at(&self.file, self.file_len, buf, b.header.pages_offset + off, "pages")
    }

    /// Writes the block's `used_len` bytes to `out` from its current position and leaves the
    /// position after them. Pages absent from the bitmap are zeros: over existing bytes of
    /// `out` they are written, past its end they are left as holes (the file is extended to
    /// the full length). Works on pipes too (then everything is written). `out` must not be
    /// in append mode. Returns the bytes of the block (`used_len`).
    pub fn extract(&self, name: &str, out: &mut File) -> Result<u64> {
        let b = self.extractable(name)?;
        let mut buf = vec![0u8; b.used_len.min(CHUNK) as usize];
        let zeros = vec![0u8; buf.len()];
        let (mut sink, end) = match out.stream_position() {
            Ok(start) => {
                let orig_len = out.metadata().map_err(|e| os_error("stat of the output", e))?.len();
                let Some(end) = start.checked_add(b.used_len) else {
                    fail!(InvalidArgument, "the output position {start} leaves no room for {} bytes", b.used_len);
                };
                (Sink::At { out: &*out, start, orig_len }, Some(end))
            }
            Err(e) if e.raw_os_error() == Some(libc::ESPIPE) => (Sink::Stream { out: &mut *out }, None),
            Err(e) => return Err(os_error("position of the output", e)),
        };
        self.walk(b, |off, n, present| {
            if present {
                let data = &mut buf[..n as usize];
                self.read_pages(b, off, data)?;
                sink.data(off, data)
            } else {
                sink.zeros(off, n, &zeros)
            }
        })?;
        if let Some(end) = end {
            let len = out.metadata().map_err(|e| os_error("stat of the output", e))?.len();
            if len < end {
                out.set_len(end).map_err(|e| os_error("extending the output", e))?;
            }
            out.seek(SeekFrom::Start(end)).map_err(|e| os_error("seeking the output", e))?;
        }
        Ok(b.used_len)
    }

    /// Same as [`QemuFile::extract`], into `buf`, which must be exactly `used_len` bytes.
    pub fn extract_into(&self, name: &str, buf: &mut [u8]) -> Result<()> {
        let b = self.extractable(name)?;
        if buf.len() as u64 != b.used_len {
            fail!(InvalidArgument, "RAM block '{name}' has {} bytes, the buffer {}", b.used_len, buf.len());
        }
        // Every offset below is inside `buf`, so it fits in usize.
        self.walk(b, |off, n, present| {
            let dst = &mut buf[off as usize..(off + n) as usize];
            if present { self.read_pages(b, off, dst) } else { dst.fill(0); Ok(()) }
        })
    }
}

/// Follows the RAM section from the end of its block list to its END part: the rest of the
/// START part's flags, then PART/END parts of the same section (flags only with mapped-ram)
/// and QEMU_VM_COMMANDs between them. `Ok(false)` on anything else.
fn ram_section_completes(cur: &mut Cursor, ram_id: u32) -> Result<bool> {
    let mut is_end = false;
    for _ in 0..MAX_TRAILER_STEPS {
        // Flags up to EOS (pages never appear in the stream with mapped-ram).
        let mut flushes = 0;
        loop {
            match cur.be64("RAM flags")? {
                RAM_SAVE_FLAG_EOS => break,
                RAM_SAVE_FLAG_MULTIFD_FLUSH if flushes < 16 => flushes += 1,
                _ => return Ok(false),
            }
        }
        if cur.peek_u8("section footer")? == SECTION_FOOTER {
            cur.pos += 1;
            if cur.be32("section footer id")? != ram_id {
                return Ok(false);
            }
        }
        if is_end {
            return Ok(true);
        }
        let mut commands = 0;
        loop {
            match cur.u8("section type")? {
                COMMAND if commands < 16 => {
                    commands += 1;
                    let _cmd = cur.be16("command")?;
                    let len = cur.be16("command length")?;
                    cur.skip(len.into(), "command")?;
                }
                kind @ (SECTION_PART | SECTION_END) => {
                    if cur.be32("section id")? != ram_id {
                        return Ok(false);
                    }
                    is_end = kind == SECTION_END;
                    break;
                }
                _ => return Ok(false),
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const P: u64 = 4096;

    /// A temp file removed on drop.
    struct Tmp(PathBuf);

    impl Tmp {
        fn new(bytes: &[u8]) -> Tmp {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!("multifd-qemufile-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
            std::fs::write(&path, bytes).unwrap();
            Tmp(path)
        }

        fn open(&self) -> Result<QemuFile> {
            QemuFile::open(&self.0)
        }

        fn code(&self) -> ErrorCode {
            self.open().unwrap_err().code
        }

        fn patch(&self, off: u64, bytes: &[u8]) {
            std::fs::OpenOptions::new().write(true).open(&self.0).unwrap().write_all_at(bytes, off).unwrap();
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    struct Blk {
        name: &'static str,
        pages: u64,
        present: Vec<u64>,
        /// An x-ignore-shared block with zero offsets (QEMU 11.0+).
        ignored: bool,
    }

    struct Spec {
        caps: Vec<&'static str>,
        page_bits: Option<u32>,
        uuid: bool,
        blocks: Vec<Blk>,
        /// Added to the total RAM size.
        total_delta: i64,
        /// Bytes before the stream (`file:PATH,offset=N`).
        prefix: usize,
    }

    impl Spec {
        fn two_blocks() -> Spec {
            Spec {
                caps: vec!["mapped-ram"],
                page_bits: None,
                uuid: false,
                blocks: vec![
                    Blk { name: "pc.ram", pages: 16, present: vec![1, 2, 5, 15], ignored: false },
                    Blk { name: "pc.bios", pages: 2, present: vec![1], ignored: false },
                ],
                total_delta: 0,
                prefix: 0,
            }
        }
    }

    /// Where things are in a built file.
    struct Built {
        bytes: Vec<u8>,
        /// Offset of the be64 total RAM word.
        total_at: u64,
        /// Per block: offset of its idstr length byte, of its mapped-ram header.
        block_at: Vec<(u64, u64)>,
        headers: Vec<BlockHeader>,
        /// End of the block list (start of the EOS after it).
        list_end: u64,
        contents: Vec<Vec<u8>>,
    }

    fn page_content(block: usize, page: u64) -> Vec<u8> {
        (0..P).map(|i| (block as u64 * 131 + page * 17 + i * 7 + 1) as u8 | 1).collect()
    }

    fn put(v: &mut Vec<u8>, at: u64, bytes: &[u8]) {
        let at = at as usize;
        if v.len() < at + bytes.len() {
            v.resize(at + bytes.len(), 0);
        }
        v[at..at + bytes.len()].copy_from_slice(bytes);
    }

    /// A mapped-ram file laid out as QEMU 10.0 writes it (see the module docs).
    fn build(spec: &Spec) -> Built {
        let mut v = vec![0x33; spec.prefix];
        v.extend_from_slice(b"QEVM\0\0\0\x03\x07");
        let machine = b"pc-i440fx-10.0";
        v.extend_from_slice(&(machine.len() as u32).to_be_bytes());
        v.extend_from_slice(machine);
        let sub = |v: &mut Vec<u8>, name: &str| {
            v.push(SUBSECTION);
            v.push(name.len() as u8);
            v.extend_from_slice(name.as_bytes());
            v.extend_from_slice(&1u32.to_be_bytes());
        };
        if let Some(bits) = spec.page_bits {
            sub(&mut v, "configuration/target-page-bits");
            v.extend_from_slice(&bits.to_be_bytes());
        }
        sub(&mut v, "configuration/capabilities");
        v.extend_from_slice(&(spec.caps.len() as u32).to_be_bytes());
        for c in &spec.caps {
            v.push(c.len() as u8);
            v.extend_from_slice(c.as_bytes());
        }
        if spec.uuid {
            sub(&mut v, "configuration/uuid");
            v.extend_from_slice(&[0x5a; 16]);
        }
        v.extend_from_slice(b"\x01\0\0\0\x01\x03ram\0\0\0\0\0\0\0\x04");
        let total_at = v.len() as u64;
        let total: u64 = spec.blocks.iter().map(|b| b.pages * P).sum();
        v.extend_from_slice(&((total as i64 + spec.total_delta) as u64 | RAM_SAVE_FLAG_MEM_SIZE).to_be_bytes());
        let ignore_shared = spec.caps.contains(&"x-ignore-shared");
        let (mut block_at, mut headers, mut contents) = (Vec::new(), Vec::new(), Vec::new());
        let mut pos = v.len() as u64;
        for (k, b) in spec.blocks.iter().enumerate() {
            let start = pos;
            let used = b.pages * P;
            put(&mut v, pos, &[b.name.len() as u8]);
            put(&mut v, pos + 1, b.name.as_bytes());
            pos += 1 + b.name.len() as u64;
            put(&mut v, pos, &used.to_be_bytes());
            pos += 8;
            if ignore_shared {
                put(&mut v, pos, &(0x1000_0000 * k as u64).to_be_bytes());
                pos += 8;
            }
            let mut content = vec![0u8; used as usize];
            if b.ignored {
                let h = BlockHeader { page_size: P, bitmap_offset: 0, pages_offset: 0 };
                put(&mut v, pos, &h.encode());
                block_at.push((start, pos));
                headers.push(h);
                pos += HEADER_LEN as u64;
            } else {
                let h = BlockHeader::layout(pos, used, P).unwrap();
                put(&mut v, pos, &h.encode());
                let mut words = vec![0u64; b.pages.div_ceil(64) as usize];
                for &p in &b.present {
                    words[(p / 64) as usize] |= 1 << (p % 64);
                    let data = page_content(k, p);
                    put(&mut v, h.pages_offset + p * P, &data);
                    content[(p * P) as usize..((p + 1) * P) as usize].copy_from_slice(&data);
                }
                put(&mut v, h.bitmap_offset, &mapped_ram::bitmap_bytes(&words));
                block_at.push((start, pos));
                headers.push(h);
                pos = h.end(used);
            }
            contents.push(content);
        }
        let list_end = pos;
        // EOS + footer, a PART with EOS, a command, the END with EOS, then a device section and EOF.
        let mut tail = Vec::new();
        tail.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        tail.extend_from_slice(b"\x7e\0\0\0\x01\x02\0\0\0\x01");
        tail.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        tail.extend_from_slice(b"\x7e\0\0\0\x01\x08\0\x0b\0\0\x03\0\0\0\x01");
        tail.extend_from_slice(&RAM_SAVE_FLAG_MULTIFD_FLUSH.to_be_bytes());
        tail.extend_from_slice(&RAM_SAVE_FLAG_EOS.to_be_bytes());
        tail.extend_from_slice(b"\x7e\0\0\0\x01\x04\0\0\0\x02\x05timer\0\0\0\0\0\0\0\x02\x7e\0\0\0\x02\x00");
        put(&mut v, pos, &tail);
        Built { bytes: v, total_at, block_at, headers, list_end, contents }
    }

    fn check_contents(f: &QemuFile, built: &Built, spec: &Spec) {
        for (k, b) in spec.blocks.iter().enumerate().filter(|(_, b)| !b.ignored) {
            let mut buf = vec![0xeeu8; (b.pages * P) as usize];
            f.extract_into(b.name, &mut buf).unwrap();
            assert!(buf == built.contents[k], "block {}", b.name);
        }
    }

    #[test]
    fn parses_and_extracts_a_sparse_file() {
        let spec = Spec::two_blocks();
        let built = build(&spec);
        let t = Tmp::new(&built.bytes);
        let f = t.open().unwrap();
        assert_eq!(f.machine(), "pc-i440fx-10.0");
        assert_eq!(f.capabilities(), ["mapped-ram"]);
        assert!(f.is_complete());
        assert_eq!(f.blocks().len(), 2);
        let ram = f.block("pc.ram").unwrap();
        assert_eq!((ram.used_len, ram.pages_present, ram.addr, ram.ignored), (16 * P, 4, None, false));
        assert_eq!(ram.header, built.headers[0]);
        assert_eq!(ram.header.pages_offset, PAGES);
        let bios = f.block("pc.bios").unwrap();
        assert_eq!((bios.used_len, bios.pages_present), (2 * P, 1));
        assert_eq!(bios.header.pages_offset, 2 * PAGES);
        check_contents(&f, &built, &spec);

        // Into a fresh file: holes past the end, right length.
        let out_path = Tmp::new(b"");
        let mut out = File::options().read(true).write(true).open(&out_path.0).unwrap();
        assert_eq!(f.extract("pc.ram", &mut out).unwrap(), 16 * P);
        assert_eq!(std::fs::read(&out_path.0).unwrap(), built.contents[0]);
        // Appended at the current position of a file full of garbage: zeros are written.
        let junk = vec![0xa5u8; 40 * P as usize];
        let out_path = Tmp::new(&junk);
        let mut out = File::options().read(true).write(true).open(&out_path.0).unwrap();
        out.seek(SeekFrom::Start(100)).unwrap();
        f.extract("pc.bios", &mut out).unwrap();
        f.extract("pc.ram", &mut out).unwrap();
        assert_eq!(out.stream_position().unwrap(), 100 + 18 * P);
        let got = std::fs::read(&out_path.0).unwrap();
        assert_eq!(got.len(), junk.len());
        assert_eq!(got[..100], junk[..100]);
        assert!(got[100..100 + 2 * P as usize] == built.contents[1]);
        assert!(got[100 + 2 * P as usize..100 + 18 * P as usize] == built.contents[0]);
        assert_eq!(got[100 + 18 * P as usize..], junk[100 + 18 * P as usize..]);
        // A garbage file shorter than the block: zeros over it, holes past it.
        let out_path = Tmp::new(&junk[..(3 * P + 7) as usize]);
        let mut out = File::options().read(true).write(true).open(&out_path.0).unwrap();
        f.extract("pc.ram", &mut out).unwrap();
        assert_eq!(std::fs::read(&out_path.0).unwrap(), built.contents[0]);
    }

    const PAGES: u64 = mapped_ram::PAGES_ALIGN;

    #[test]
    fn opens_at_an_offset() {
        let mut spec = Spec::two_blocks();
        spec.prefix = 5000;
        let built = build(&spec);
        let t = Tmp::new(&built.bytes);
        assert_eq!(t.code(), ErrorCode::BadMagic);
        let f = QemuFile::open_at(&t.0, 5000).unwrap();
        assert!(f.is_complete());
        // Offsets are absolute: the prefix counts.
        assert_eq!(f.block("pc.ram").unwrap().header, built.headers[0]);
        assert!(built.headers[0].bitmap_offset > 5000);
        check_contents(&f, &built, &spec);
        assert_eq!(QemuFile::open_at(&t.0, 4999).unwrap_err().code, ErrorCode::BadMagic);
        assert_eq!(QemuFile::open_at(&t.0, u64::MAX - 2).unwrap_err().code, ErrorCode::Truncated);
    }

    #[test]
    fn extracts_into_a_pipe() {
        let spec = Spec::two_blocks();
        let built = build(&spec);
        let t = Tmp::new(&built.bytes);
        let f = t.open().unwrap();
        let (mut r, w) = std::io::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut r, &mut v).unwrap();
            v
        });
        let mut out = File::from(OwnedFd::from(w));
        assert_eq!(f.extract("pc.ram", &mut out).unwrap(), 16 * P);
        drop(out);
        assert_eq!(reader.join().unwrap(), built.contents[0]);
    }

    #[test]
    fn extract_errors() {
        let built = build(&Spec::two_blocks());
        let t = Tmp::new(&built.bytes);
        let f = t.open().unwrap();
        assert_eq!(f.extract_into("nope", &mut [0u8; 4096]).unwrap_err().code, ErrorCode::UnknownBlock);
        assert_eq!(f.extract_into("pc.bios", &mut [0u8; 4096]).unwrap_err().code, ErrorCode::InvalidArgument);
        let out_path = Tmp::new(b"");
        let mut out = File::options().write(true).open(&out_path.0).unwrap();
        assert_eq!(f.extract("nope", &mut out).unwrap_err().code, ErrorCode::UnknownBlock);
    }

    #[test]
    fn optional_configuration_parts() {
        let mut spec = Spec::two_blocks();
        spec.page_bits = Some(12);
        spec.uuid = true;
        spec.caps = vec!["x-ignore-shared", "mapped-ram"];
        spec.blocks.insert(1, Blk { name: "shared", pages: 8, present: vec![], ignored: true });
        let built = build(&spec);
        let t = Tmp::new(&built.bytes);
        let f = t.open().unwrap();
        assert!(f.is_complete());
        assert_eq!(f.capabilities(), ["x-ignore-shared", "mapped-ram"]);
        assert_eq!(f.blocks().iter().map(|b| b.addr).collect::<Vec<_>>(), [Some(0), Some(0x1000_0000), Some(0x2000_0000)]);
        let shared = f.block("shared").unwrap();
        assert!(shared.ignored && shared.pages_present == 0);
        assert_eq!(f.extract_into("shared", &mut vec![0u8; 8 * P as usize]).unwrap_err().code, ErrorCode::InvalidArgument);
        check_contents(&f, &built, &spec);

        // Target page bits that disagree with the headers.
        spec.page_bits = Some(13);
        assert_eq!(Tmp::new(&build(&spec).bytes).code(), ErrorCode::FileFormat);
        spec.page_bits = Some(40);
        assert_eq!(Tmp::new(&build(&spec).bytes).code(), ErrorCode::FileFormat);
    }

    #[test]
    fn bad_stream_headers() {
        let built = build(&Spec::two_blocks());
        let t = Tmp::new(&built.bytes);
        let with = |off: u64, bytes: &[u8]| {
            let t = Tmp::new(&built.bytes);
            t.patch(off, bytes);
            t.code()
        };
        assert!(t.open().is_ok());
        assert_eq!(with(0, b"QEVN"), ErrorCode::BadMagic);
        assert_eq!(with(4, &2u32.to_be_bytes()), ErrorCode::BadVersion);
        // Not a configuration section, or an unknown section type where the RAM section belongs.
        assert_eq!(with(8, &[0x01]), ErrorCode::FileFormat);
        let sec = built.total_at - 17;
        assert_eq!(with(sec, &[0x09]), ErrorCode::FileFormat);
        assert_eq!(with(sec, &[0x02]), ErrorCode::FileFormat);
        // A section other than "ram" first; a RAM section of another version.
        assert_eq!(with(sec + 6, b"rom"), ErrorCode::FileFormat);
        assert_eq!(with(sec + 13, &5u32.to_be_bytes()), ErrorCode::BadVersion);
        // Machine type length 0 and huge.
        assert_eq!(with(9, &0u32.to_be_bytes()), ErrorCode::FileFormat);
        assert_eq!(with(9, &u32::MAX.to_be_bytes()), ErrorCode::FileFormat);
        // The subsection name, version and capability list.
        assert_eq!(with(0x1d, b"C"), ErrorCode::FileFormat);
        assert_eq!(with(0x37, &2u32.to_be_bytes()), ErrorCode::BadVersion);
        assert_eq!(with(0x3b, &u32::MAX.to_be_bytes()), ErrorCode::FileFormat);
        assert_eq!(with(0x3f, &[0]), ErrorCode::FileFormat);
        assert_eq!(with(0x40, b"M"), ErrorCode::FileFormat); // "Mapped-ram": not mapped-ram
        // Flags other than MEM_SIZE, a zero or huge total.
        let total = u64::from_be_bytes(built.bytes[built.total_at as usize..][..8].try_into().unwrap());
        assert_eq!(with(built.total_at, &(total | 0x10).to_be_bytes()), ErrorCode::FileFormat);
        assert_eq!(with(built.total_at, &4u64.to_be_bytes()), ErrorCode::FileFormat);
        assert_eq!(with(built.total_at, &(!0x3ffu64 | 4).to_be_bytes()), ErrorCode::FileFormat);
    }

    #[test]
    fn bad_block_list() {
        let built = build(&Spec::two_blocks());
        let with = |off: u64, bytes: &[u8]| {
            let t = Tmp::new(&built.bytes);
            t.patch(off, bytes);
            t.open().map(|_| ()).map_err(|e| e.code)
        };
        let (b0, h0) = built.block_at[0];
        let (b1, h1) = built.block_at[1];
        // idstr length 0, and lengths that swallow the fields after the name.
        assert_eq!(with(b0, &[0]), Err(ErrorCode::FileFormat));
        assert_eq!(with(b1, &[0]), Err(ErrorCode::FileFormat));
        for n in [7, 8, 20, 255] {
            let r = with(b0, &[n]);
            assert!(matches!(r, Err(ErrorCode::FileFormat | ErrorCode::Truncated)), "length {n}: {r:?}");
        }
        // A duplicate name.
        assert_eq!(with(b1, b"\x06pc.ram"), Err(ErrorCode::DuplicateBlock));
        // Block lengths: zero, huge, not page multiples, more than the total.
        assert_eq!(with(b0 + 7, &0u64.to_be_bytes()), Err(ErrorCode::FileFormat));
        assert_eq!(with(b0 + 7, &u64::MAX.to_be_bytes()), Err(ErrorCode::FileFormat));
        assert_eq!(with(b0 + 7, &(16 * P + 1).to_be_bytes()), Err(ErrorCode::FileFormat));
        assert_eq!(with(b1 + 8, &(3 * P).to_be_bytes()), Err(ErrorCode::FileFormat));
        // Used lengths that do not add up to the total, either way.
        let total = (18 * P) | 4;
        assert_eq!(with(built.total_at, &(total + P).to_be_bytes()), Err(ErrorCode::FileFormat));
        assert_eq!(with(built.total_at, &(total - P).to_be_bytes()), Err(ErrorCode::FileFormat));
        assert_eq!(with(built.total_at, &(total - 16 * P).to_be_bytes()), Err(ErrorCode::FileFormat));
        // Mapped-ram headers: version, page size, bitmap offset, pages offset.
        assert_eq!(with(h0, &2u32.to_be_bytes()), Err(ErrorCode::BadVersion));
        assert_eq!(with(h1 + 4, &8192u64.to_be_bytes()), Err(ErrorCode::FileFormat));
        assert_eq!(with(h0 + 12, &(h0 + 27).to_be_bytes()), Err(ErrorCode::FileFormat));
        assert_eq!(with(h0 + 20, &(PAGES + 1).to_be_bytes()), Err(ErrorCode::FileFormat));
        assert_eq!(with(h0 + 20, &(!(P - 1)).to_be_bytes()), Err(ErrorCode::FileFormat));
        // A pages region moved so that the next block's header is elsewhere.
        let r = with(h0 + 20, &(PAGES + P).to_be_bytes());
        assert!(matches!(r, Err(ErrorCode::FileFormat | ErrorCode::Truncated)), "{r:?}");
        // The last block's pages moved past the end of the file: its present page is there.
        assert_eq!(with(h1 + 20, &(64 * PAGES).to_be_bytes()), Err(ErrorCode::Truncated));
        // Stray bits past the last page are ignored.
        let t = Tmp::new(&built.bytes);
        t.patch(built.headers[0].bitmap_offset + 2, &[0xff]);
        t.patch(built.headers[1].bitmap_offset + 7, &[0x80]);
        let f = t.open().unwrap();
        assert_eq!(f.block("pc.ram").unwrap().pages_present, 4);
        assert_eq!(f.block("pc.bios").unwrap().pages_present, 1);
    }

    #[test]
    fn truncated_anywhere() {
        let spec = Spec::two_blocks();
        let built = build(&spec);
        let t = Tmp::new(&built.bytes);
        let (h0, h1) = (&built.headers[0], &built.headers[1]);
        let mut cuts: Vec<u64> = (0..h0.bitmap_offset + 8).collect();
        cuts.extend((0..=16).map(|p| h0.pages_offset + p * P));
        cuts.extend([h0.pages_offset + 2 * P + 1, h0.pages_offset + 16 * P - 1]);
        cuts.extend(built.block_at[1].0..h1.bitmap_offset + 8);
        cuts.extend([h1.pages_offset, h1.pages_offset + P, h1.pages_offset + 2 * P - 1, h1.pages_offset + 2 * P]);
        cuts.extend(built.list_end..built.bytes.len() as u64);
        cuts.sort_unstable();
        cuts.dedup();
        let file = File::options().write(true).open(&t.0).unwrap();
        for &cut in cuts.iter().rev() {
            file.set_len(cut).unwrap();
            match t.open() {
                Err(e) => {
                    assert!(cut < built.list_end, "cut at {cut}: {e}");
                    // A bitmap past the end is FileFormat (mapped_ram::BlockHeader::decode).
                    let in_bitmap = [h0, h1].iter().any(|h| cut >= h.bitmap_offset && cut < h.bitmap_offset + 8);
                    let want = if in_bitmap { ErrorCode::FileFormat } else { ErrorCode::Truncated };
                    assert_eq!(e.code, want, "cut at {cut}: {e}");
                }
                Ok(f) => {
                    assert!(cut >= built.list_end, "cut at {cut} opened");
                    // The RAM section's tail is 62 bytes (see build()); complete once its END footer is in.
                    assert_eq!(f.is_complete(), cut >= built.list_end + 62, "cut at {cut}");
                    check_contents(&f, &built, &spec);
                }
            }
        }
    }

    /// Each block is an ignored x-ignore-shared one: small, so the block count bound is reachable.
    #[test]
    fn block_count_is_bounded() {
        let mut spec = Spec::two_blocks();
        spec.caps.push("x-ignore-shared");
        spec.blocks = Vec::new();
        let names: Vec<&'static str> = (0..=MAX_BLOCKS).map(|i| &*format!("b{i}").leak()).collect();
        spec.blocks = names.iter().map(|&name| Blk { name, pages: 1, present: vec![], ignored: true }).collect();
        assert_eq!(Tmp::new(&build(&spec).bytes).code(), ErrorCode::FileFormat);
        spec.blocks.pop();
        let f = Tmp::new(&build(&spec).bytes).open().unwrap();
        assert_eq!(f.blocks().len(), MAX_BLOCKS);
    }

    /// Random byte changes in the stream and header areas: errors or a file whose blocks
    /// extract, never a panic.
    #[test]
    fn random_corruption_never_panics() {
        let built = build(&Spec::two_blocks());
        let t = Tmp::new(&built.bytes);
        let f = File::options().write(true).open(&t.0).unwrap();
        let (b1, _) = built.block_at[1];
        let areas = [(0, built.headers[0].bitmap_offset + 8), (b1, built.headers[1].bitmap_offset + 8), (built.list_end, built.bytes.len() as u64)];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rng = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let (lo, hi) = areas[(rng() % 3) as usize];
            let off = lo + rng() % (hi - lo);
            let old = built.bytes[off as usize];
            let new = match rng() % 4 {
                0 => 0,
                1 => 0xff,
                2 => old ^ (1 << (rng() % 8)),
                _ => rng() as u8,
            };
            f.write_all_at(&[new], off).unwrap();
            if let Ok(q) = t.open() {
                for b in q.blocks().iter().filter(|b| !b.ignored && b.used_len <= 1 << 24) {
                    let mut buf = vec![0u8; b.used_len as usize];
                    let _ = q.extract_into(&b.name, &mut buf);
                }
            }
            f.write_all_at(&[old], off).unwrap();
        }
        assert!(t.open().is_ok());
    }
}
